"""Data-parallel training and sampling under mpiexec (gloo, 2 CPU ranks).

Run as a script, this file is a worker that runs scripts/video_train.py with test-only
changes: --global_data feeds every rank the videos of the global examples it
holds (so 1 and 2 ranks see the same examples), --dump writes each rank's parameters
after training, --die_rank/--die_step make one rank vanish mid-run.
"""

import argparse
import csv
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.training.test_train_loop import flat

REPO = Path(__file__).resolve().parents[2]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TINY = ["--dataset", "bouncing_balls", "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "8",
        "--num_heads", "2", "--T", "10", "--max_frames", "4", "--diffusion_steps", "50", "--log_interval", "1"]

needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the Python executable")


def subprocess_env(tmp_path, **extra):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path))
    env.update(extra)
    return env


def run(cmd, env, timeout=180):
    start = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - start


def worker(args, tmp_path, ranks=None, env=None, timeout=180):
    """Run this file as the training worker, under `mpiexec -n ranks` when ranks is given."""
    cmd = [sys.executable, __file__, *args]
    if ranks is not None:
        cmd = [MPIEXEC, "-n", ranks, *cmd]
    return run(cmd, env or subprocess_env(tmp_path), timeout)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """2 ranks x batch 2 (microbatch 1) and 1 rank x batch 4 on the same global examples, 3 steps."""
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec beside the Python executable")
    tmp = tmp_path_factory.mktemp("ddp")
    common = TINY + ["--noise_mode", "mixed", "--lr", "1e-3", "--ema_rate", "0.5", "--max_steps", "3",
                     "--save_interval", "100", "--checkpoint_dir", tmp / "ckpt", "--val_interval", "1",
                     "--val_videos", "3"]
    two, _ = worker(["--global_data", "--dump", tmp / "two", "--", *common, "--batch_size", "2",
                     "--microbatch", "1"], tmp, ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one, _ = worker(["--global_data", "--dump", tmp / "one", "--", *common, "--batch_size", "4"], tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp


@needs_mpiexec
def test_ranks_hold_identical_parameters_after_training(ddp_runs):
    rank0 = torch.load(ddp_runs / "two" / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_runs / "two" / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2
    for key in ("params", "ema"):
        a, b = flat(rank0[key]), flat(rank1[key])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{key} differ between ranks"


@needs_mpiexec
def test_two_ranks_equal_one_rank_with_twice_the_batch(ddp_runs):
    two = torch.load(ddp_runs / "two" / "rank0.pt", weights_only=True)
    one = torch.load(ddp_runs / "one" / "rank0.pt", weights_only=True)
    assert one["world_size"] == 1
    # The averaged gradient of the first step is the same up to float rounding.
    assert len(two["first_grads"]) == len(one["first_grads"]) > 0
    for g2, g1 in zip(two["first_grads"], one["first_grads"]):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7)
    # After 3 steps. Adam divides by sqrt(v) + 1e-8, so for gradients near zero it turns
    # rounding noise into steps of up to a few percent of lr; a wrong example would give
    # differences of the order of lr itself.
    lr = 1e-3
    for key in ("params", "ema"):
        a, b, start = flat(two[key]), flat(one[key]), flat(one["initial"])
        moved = max((b[k] - start[k]).abs().max().item() for k in b)
        gap = max((a[k] - b[k]).abs().max().item() for k in b)
        assert moved > 1e-4, "training did not change the parameters"
        assert gap < 0.2 * lr, f"{key}: 2 ranks x 2 and 1 rank x 4 differ by {gap} (training moved them {moved})"


@needs_mpiexec
def test_validation_gives_the_same_figures_on_one_and_two_ranks(ddp_runs):
    """The 3 validation clips split 1 + 2 over two ranks; the gathered per-clip losses make the same figures."""
    figures = {}
    for run_dir in (ddp_runs / "ckpt").iterdir():
        world_size = json.loads((run_dir / "config.json").read_text())["world_size"]
        with open(run_dir / "progress.csv") as f:
            figures[world_size] = [{k: float(v) for k, v in row.items() if k.startswith("val_loss") and v}
                                   for row in csv.DictReader(f)]
    assert len(figures[1]) == len(figures[2]) == 3
    for one, two in zip(figures[1], figures[2]):
        assert one.keys() == two.keys() and "val_loss" in one
        for key in one:  # the weights themselves differ by float rounding (see above)
            assert two[key] == pytest.approx(one[key], rel=1e-5), key


@needs_mpiexec
def test_rank_0_alone_writes_checkpoints(ddp_runs):
    runs = list((ddp_runs / "ckpt").iterdir())
    assert len(runs) == 2  # one run per launch, not one per rank
    for run_dir in runs:
        names = sorted(p.name for p in run_dir.iterdir())
        assert "model000003.pt" in names and "opt000003.pt" in names
        assert not [n for n in names if n.startswith(".tmp-")]


@needs_mpiexec
@pytest.mark.parametrize("launcher_options, exit_code", [([], 1), (["-disable-auto-cleanup"], 0)])
def test_dead_rank_ends_the_job(tmp_path, launcher_options, exit_code):
    """Rank 1 vanishes mid-run; the job must fail within a bounded time, not hang.

    Plain mpiexec kills the job itself when a rank dies (and then returns that rank's exit
    code, 0 included). With -disable-auto-cleanup it leaves rank 0 running, as srun does
    without --kill-on-bad-exit: rank 0 must notice on its own and end the job.
    """
    args = TINY + ["--batch_size", "1", "--max_steps", "50", "--save_interval", "100",
                   "--checkpoint_dir", tmp_path / "ckpt"]
    cmd = [MPIEXEC, *launcher_options, "-n", "2", sys.executable, __file__, "--die_rank", "1",
           "--die_step", "2", "--die_code", exit_code, "--", *args]
    proc, seconds = run(cmd, subprocess_env(tmp_path, DIST_TIMEOUT_S="20"), timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to notice the dead rank"


# ----------------------------------------------------------------------------- sampling


@needs_mpiexec
def test_sampling_splits_videos_across_ranks(ddp_runs, tmp_path):
    run_dir = next((ddp_runs / "ckpt").iterdir())
    args = [REPO / "scripts" / "video_sample.py", run_dir / "ema_0.5_000003.pt", "--sampling_scheme", "autoreg",
            "--T", "6", "--n_obs", "2", "--batch_size", "2", "--timestep_respacing", "2"]
    env = subprocess_env(tmp_path)
    single, _ = run([sys.executable, *args, "--stop_index", "5", "--eval_dir", tmp_path / "one"], env)
    assert single.returncode == 0, single.stderr[-3000:]
    double, _ = run([MPIEXEC, "-n", "2", sys.executable, *args, "--stop_index", "5", "--eval_dir", tmp_path / "two"],
                    env)
    assert double.returncode == 0, double.stderr[-3000:]
    one = sorted(p.name for p in (tmp_path / "one" / "samples").iterdir())
    two = sorted(p.name for p in (tmp_path / "two" / "samples").iterdir())
    assert one == [f"sample_{i:04d}-0.npy" for i in range(5)]
    assert two == one
    assert "rank 1: 2 of 2 videos" in double.stderr  # rank 1 did its share
    # FDM's Slurm arrays: without --stop_index, array task i samples the i-th batch of videos.
    array, _ = run([MPIEXEC, "-n", "2", sys.executable, *args, "--eval_dir", tmp_path / "array"],
                   subprocess_env(tmp_path, SLURM_ARRAY_TASK_ID="1"))
    assert array.returncode == 0, array.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "array" / "samples").iterdir()) == ["sample_0002-0.npy",
                                                                                  "sample_0003-0.npy"]


# ----------------------------------------------------------------------------- dist_util


def test_single_process_needs_no_process_group(monkeypatch):
    from improved_diffusion import dist_util

    for name in dist_util.MPI_ENV_VARS + ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dist_util.setup_dist() == (0, 1)
    assert not torch.distributed.is_initialized()
    assert dist_util.broadcast_object({"a": 1}) == {"a": 1}
    assert dist_util.all_ranks_agree(True) and not dist_util.all_ranks_agree(False)


def test_timeout_comes_from_the_environment(monkeypatch):
    from improved_diffusion import dist_util
    from improved_diffusion.script_util import UserError

    monkeypatch.setenv(dist_util.TIMEOUT_ENV, "7.5")
    assert dist_util.timeout_s() == 7.5
    monkeypatch.delenv(dist_util.TIMEOUT_ENV)
    assert dist_util.timeout_s() == dist_util.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(dist_util.TIMEOUT_ENV, "ten")
    with pytest.raises(UserError):
        dist_util.timeout_s()


# ----------------------------------------------------------------------------- the worker


def global_batches(dataset, batch_size, seed, rank=0, world_size=1, start_step=0, num_workers=0, with_actions=False):
    """train_batches' stand-in: rank r's b = batch_size // 2 videos are those of global examples r*b .. r*b+b-1.

    The real train_batches reads each rank's own shard, so 1 and 2 ranks see different
    videos; here the videos depend on the global example index only, as the frame masks,
    timesteps and noise already do.
    """
    assert not with_actions, "the stand-in serves unconditional runs only"
    b = batch_size // 2
    step = start_step
    while True:
        examples = range(rank * b, rank * b + b)
        # The training videos, then their padding videos.
        videos = [dataset.video((step * 1009 + 2 * g + part) % len(dataset),
                                np.random.default_rng([seed, step, g, part])) for part in (0, 1) for g in examples]
        yield torch.stack(videos)
        step += 1


def worker_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--global_data", action="store_true")
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--die_rank", type=int, default=-1)
    parser.add_argument("--die_step", type=int, default=-1)
    parser.add_argument("--die_code", type=int, default=0)
    opts, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]

    from improved_diffusion.training import launch
    from improved_diffusion.training.train_loop import TrainLoop

    if opts.global_data:
        launch.train_batches = global_batches  # what launch.train reads the training videos with

    run_step, run_loop = TrainLoop.run_step, TrainLoop.run

    first_grads = []

    def run_step_or_die(self):
        if self.rank == opts.die_rank and self.step == opts.die_step:
            os._exit(opts.die_code)  # vanish without a word: no exception, no MPI_Abort
        loss = run_step(self)
        if not first_grads:
            first_grads.extend(p.grad.clone() for p in self.params)
        return loss

    def run_and_dump(self):
        initial = [p.detach().clone() for p in self.params]
        run_loop(self)
        if opts.dump:
            opts.dump.mkdir(parents=True, exist_ok=True)
            torch.save({"params": [p.detach() for p in self.params], "ema": self.ema_params[0], "initial": initial,
                        "first_grads": first_grads, "world_size": self.world_size}, opts.dump / f"rank{self.rank}.pt")

    TrainLoop.run_step, TrainLoop.run = run_step_or_die, run_and_dump
    script = REPO / "scripts" / "video_train.py"
    sys.argv = [str(script), *train_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    worker_main(sys.argv[1:])
