"""TrainLoop: microbatches, non-finite losses, keep_last, exact resume, conditions reaching the model.

Run as a script, this file is a worker that runs scripts/video_train.py and kills itself
with SIGKILL halfway through writing the checkpoint file named by --kill_at, or sends
itself SIGTERM (as Slurm does before pre-emption) during step --signal_at.
"""

import argparse
import csv
import math
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.checkpoints import read_checkpoint_file
from improved_diffusion.training import checkpoint_io
from improved_diffusion.errors import TrainingError
from improved_diffusion.logger import Logger
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, UserError, create_diffusion, create_model
from improved_diffusion.training.batches import training_batch
from improved_diffusion.training.config import TrainConfig
from improved_diffusion.training.ema import update_ema
from improved_diffusion.training.gradients import grads_finite
from improved_diffusion.training.train_loop import TrainLoop
from improved_diffusion.data.batches import train_batches
from improved_diffusion.data.datasets import get_dataset

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "bouncing_balls", "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "8",
        "--num_heads", "2", "--T", "10", "--max_frames", "4", "--diffusion_steps", "50"]
# Everything that draws random numbers: dropout, mixed noise levels, microbatches, an lr schedule.
RUN = TINY + ["--batch_size", "2", "--microbatch", "1", "--dropout", "0.1", "--noise_mode", "mixed",
              "--lr_anneal_steps", "10", "--ema_rate", "0.9,0.99", "--save_interval", "2", "--log_interval", "1",
              "--num_workers", "0"]
STEP_NAMES = ["ema_0.9_000004.pt", "ema_0.99_000004.pt", "model000004.pt", "opt000004.pt"]


# ----------------------------------------------------------------------------- TrainLoop in this process


def tiny_loop(tmp_path, monkeypatch, diffusion_cfg=None, image_size=16, use_checkpoint=False, dropout=0.0,
              **overrides):
    """A TrainLoop of the tiny model on bouncing_balls; `overrides` are TrainConfig fields."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    values = dict(batch_size=2, max_frames=4, T=10, save_interval=1000, log_interval=1, ema_rate="0.9", max_steps=4)
    cfg = TrainConfig(**{**values, **overrides})
    model_cfg = ModelConfig(image_size=image_size, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                            attention_resolutions="8", num_heads=2, use_checkpoint=use_checkpoint, dropout=dropout)
    torch.manual_seed(0)
    model = create_model(model_cfg)
    diffusion = create_diffusion(diffusion_cfg or DiffusionConfig(diffusion_steps=50))
    batches = train_batches(get_dataset("bouncing_balls", T=10, image_size=image_size), 2 * cfg.batch_size, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(log_dir=str(run_dir), rank=0)
    return TrainLoop(model=model, diffusion=diffusion, data=lambda step: next(batches), config=cfg,
                     run_dir=str(run_dir), saved_config={"ema_rate": "0.9"}, logger=logger)


def test_microbatches_give_the_full_batch_gradient(tmp_path, monkeypatch, one_thread):
    grads = []
    for microbatch in (-1, 1):
        loop = tiny_loop(tmp_path, monkeypatch, microbatch=microbatch)
        loop.run_step()
        grads.append([p.grad.clone() for p in loop.params])
    for full, accumulated in zip(*grads):
        torch.testing.assert_close(accumulated, full, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_nonfinite_losses_skip_steps_then_stop_with_the_last_checkpoint_intact(tmp_path, monkeypatch, one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, save_interval=3, max_nonfinite_steps=3, max_steps=20)
    loop.model.register_forward_hook(lambda module, inputs, output: output * float("nan") if loop.step >= 3 else None)
    with pytest.raises(TrainingError) as info:
        loop.run()
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "3 consecutive non-finite losses at step 5" in message and "last checkpoint: step 3" in message
    assert checkpoint_io.complete_steps(loop.run_dir, [0.9]) == [3]
    saved = read_checkpoint_file(os.path.join(loop.run_dir, "model000003.pt"))["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    # The skipped steps changed nothing: the weights are still those of the checkpoint.
    assert all(torch.equal(p, saved[name]) for name, p in loop.model.named_parameters())
    with open(os.path.join(loop.run_dir, "progress.csv")) as f:
        skipped = [row["nonfinite_skipped"] for row in csv.DictReader(f)]
    assert skipped == ["0", "0", "0", "1", "2"]  # the third skip raises before its row is written


def test_keep_last_keeps_the_newest_complete_steps(tmp_path, monkeypatch, one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, save_interval=1, keep_last=2, max_steps=4)
    loop.run()
    assert checkpoint_io.complete_steps(loop.run_dir, [0.9]) == [3, 4]
    assert sorted(n for n in os.listdir(loop.run_dir) if n.endswith(".pt")) == [
        "ema_0.9_000003.pt", "ema_0.9_000004.pt", "model000003.pt", "model000004.pt", "opt000003.pt", "opt000004.pt"]


def test_warmup_is_linear_from_the_first_step_and_composes_with_annealing(tmp_path, monkeypatch):
    loop = tiny_loop(tmp_path, monkeypatch, lr=1e-3, warmup_steps=4)
    # DF's rule from step 1 on (lr * k / warmup); step 0 as step 1.
    expected = [0.25e-3, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3]
    assert [loop.lr_at(k) for k in range(7)] == pytest.approx(expected, rel=1e-12)
    both = tiny_loop(tmp_path, monkeypatch, lr=1e-3, warmup_steps=4, lr_anneal_steps=10)
    assert both.lr_at(2) == pytest.approx(1e-3 * 0.5 * 0.8) and both.lr_at(6) == pytest.approx(1e-3 * 0.4)


def test_grad_clip_bounds_the_global_gradient_norm_and_adam_betas_reach_the_optimizer(tmp_path, monkeypatch,
                                                                                      one_thread):
    norms = []
    for clip in (0.0, 1e-3):
        loop = tiny_loop(tmp_path, monkeypatch, grad_clip=clip, adam_betas="0.8,0.95")
        assert loop.opt.param_groups[0]["betas"] == (0.8, 0.95)
        loop.run_step()
        norms.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in loop.params)))
    assert norms[0] > 1e-2  # unclipped, the gradient is far larger than the bound
    assert norms[1] == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("noise_mode", ["fdm", "mixed", "diffusion_forcing"])
def test_training_weights_frames_by_the_fused_snr_of_the_example(tmp_path, monkeypatch, noise_mode):
    """The loop's wiring: clean observed frames are known, padding frames are outside the running SNR."""
    cfg = DiffusionConfig(diffusion_steps=50, predict_v=True, noise_schedule="sigmoid", loss_weighting="fused_snr",
                          cum_snr_decay=0.9)
    loop = tiny_loop(tmp_path, monkeypatch, diffusion_cfg=cfg, noise_mode=noise_mode, batch_size=4)
    videos = torch.rand(8, 10, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = training_batch(videos[:4], videos[4:], first_index=0, seed=5, step=0, max_frames=4,
                           noise_mode=noise_mode, num_timesteps=50)
    seen = {}
    training_losses = loop.diffusion.training_losses

    def spy(*args, **kwargs):
        seen["weights"] = kwargs["frame_weights"]
        return training_losses(*args, **kwargs)

    monkeypatch.setattr(loop.diffusion, "training_losses", spy)
    loop.microbatch_loss(batch, 0, 4)
    abar = np.cumprod(1 - loop.diffusion.betas)
    B, K = batch["x"].shape[:2]
    t = batch["t"] if batch["t"].dim() == 2 else batch["t"][:, None].expand(B, K)
    obs, latent = batch["obs_mask"].view(B, K) > 0, batch["latent_mask"].view(B, K) > 0
    noisy_obs = batch["noisy_obs"].view(B, K) > 0
    for b in range(B):
        weights, running, started = [], 0.0, False
        for k in range(K):
            known = bool(obs[b, k] and not noisy_obs[b, k])
            snr = 5.0 if known else abar[t[b, k]] / (1 - abar[t[b, k]])
            s = min(snr, 5.0) / 5.0
            in_sequence = bool(obs[b, k] or latent[b, k])
            context = 0.9 * running if in_sequence else 0.0
            if in_sequence:
                running, started = (0.9 * running + 0.1 * s if started else s), True
            clipped = 1 - (1 - context) * (1 - s)
            fused = 1 - (1 - context) * (1 - snr / 5.0)
            weights.append(0.0 if known else clipped * 5.0 / (fused * 5.0 + 1))
        np.testing.assert_allclose(seen["weights"][b].numpy(), weights, rtol=1e-5, atol=1e-7)
    # The example covers each rule: clean observed, noisy observed (mixed) and padding frames (fdm).
    if noise_mode == "fdm":
        assert obs.any() and (~(obs | latent)).any()
    if noise_mode == "mixed":
        assert noisy_obs.any() and (obs & ~noisy_obs).any()


# ----------------------------------------------------------------------------- the script: exact resume


def script_env(tmp_path, wandb_mode="disabled"):
    return dict(os.environ, WANDB_MODE=wandb_mode, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path))


def train(tmp_path, args, wandb_mode="disabled", worker_args=()):
    cmd = [sys.executable, REPO / "scripts" / "video_train.py", *args]
    if worker_args:
        cmd = [sys.executable, __file__, *worker_args, "--", *args]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=script_env(tmp_path, wandb_mode), capture_output=True,
                          text=True, timeout=180)
    return proc


def only_run(checkpoint_dir):
    (run_dir,) = list(Path(checkpoint_dir).iterdir())
    return run_dir


def assert_bitwise_equal(dir_a, dir_b):
    for name in STEP_NAMES:
        a = read_checkpoint_file(str(dir_a / name))
        b = read_checkpoint_file(str(dir_b / name))
        tensors_a, tensors_b = flat(a), flat(b)
        assert tensors_a.keys() == tensors_b.keys()
        different = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def flat(obj, prefix=""):
    """{path: tensor} of a nested dict/list (checkpoints), for comparing them tensor by tensor."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}/{k}"))
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps without interruption."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = train(tmp, RUN + ["--max_steps", "4", "--checkpoint_dir", tmp / "ckpt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(tmp / "ckpt")


def test_a_resumed_run_is_bitwise_the_same_run(straight_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, RUN + ["--max_steps", "2", "--checkpoint_dir", ckpt], wandb_mode="offline")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run(ckpt)
    # The new process is given only the run id (and a longer run), as after a pre-emption.
    second = train(tmp_path, ["--wandb_id", run_dir.name, "--max_steps", "4", "--checkpoint_dir", ckpt],
                   wandb_mode="offline")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming run {run_dir.name} from step 2" in second.stderr
    assert_bitwise_equal(straight_run, run_dir)
    with open(run_dir / "progress.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2, 3, 4]
    # wandb (offline) continued the same run id.
    segments = [p.name for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(segments) == 2 and all(s.endswith(run_dir.name) for s in segments)


# Diffusion Forcing's recipe: warm-up, gradient clipping, AdamW betas, fused SNR, clamped noise.
DF_RUN = RUN + ["--warmup_steps", "3", "--grad_clip", "0.05", "--adam_betas", "0.9,0.99", "--weight_decay", "0.002",
                "--loss_weighting", "fused_snr", "--cum_snr_decay", "0.9", "--snr_clip", "4", "--clip_noise", "1.5",
                "--predict_v", "True", "--noise_schedule", "sigmoid"]


def straight_and_resumed(tmp_path, flags):
    """Train `flags` 4 steps in one go, and 2 steps then 2 more after a resume; check both runs are bitwise the
    same and return their run dirs (straight, resumed)."""
    straight = train(tmp_path, flags + ["--max_steps", "4", "--checkpoint_dir", tmp_path / "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    first = train(tmp_path, flags + ["--max_steps", "2", "--checkpoint_dir", ckpt])
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run(ckpt)
    second = train(tmp_path, ["--wandb_id", run_dir.name, "--max_steps", "4", "--checkpoint_dir", ckpt])
    assert second.returncode == 0, second.stderr[-3000:]
    assert_bitwise_equal(only_run(tmp_path / "straight"), run_dir)
    return only_run(tmp_path / "straight"), run_dir


def test_a_resumed_diffusion_forcing_recipe_run_is_bitwise_the_same_run(tmp_path):
    _, run_dir = straight_and_resumed(tmp_path, DF_RUN)
    config = read_checkpoint_file(str(run_dir / "model000004.pt"))["config"]
    assert (config["warmup_steps"], config["grad_clip"], config["adam_betas"], config["loss_weighting"],
            config["clip_noise"]) == (3, 0.05, "0.9,0.99", "fused_snr", 1.5)
    groups = read_checkpoint_file(str(run_dir / "opt000004.pt"))["optimizer"]["param_groups"]
    # The last step (3) ran at the full lr: warm-up over, annealing at 3/10 (--lr_anneal_steps 10).
    assert tuple(groups[0]["betas"]) == (0.9, 0.99) and groups[0]["lr"] == pytest.approx(1e-4 * 0.7)
    with open(run_dir / "progress.csv") as f:
        assert all(float(row["grad_norm"]) > 0 for row in csv.DictReader(f))


def test_resume_checkpoint_starts_a_new_run_from_weights(straight_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = train(tmp_path, RUN + ["--max_steps", "6", "--checkpoint_dir", ckpt,
                                  "--resume_checkpoint", straight_run / "model000004.pt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run(ckpt)
    assert run_dir.name != straight_run.name
    assert checkpoint_io.complete_steps(str(run_dir), [0.9, 0.99]) == [6]  # counted on from step 4


@pytest.mark.parametrize("kill_at, resumes_from", [("ema_0.9_000002.pt", "step 0"),
                                                   ("opt000004.pt", "step 2")])
def test_kill_9_while_saving_then_resume(straight_run, tmp_path, kill_at, resumes_from):
    ckpt = tmp_path / "ckpt"
    killed = train(tmp_path, RUN + ["--max_steps", "4", "--checkpoint_dir", ckpt], worker_args=["--kill_at", kill_at])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = only_run(ckpt)
    names = os.listdir(run_dir)
    assert kill_at not in names and [n for n in names if n.startswith(checkpoint_io.TMP_PREFIX)]
    resumed = train(tmp_path, ["--wandb_id", run_dir.name, "--checkpoint_dir", ckpt])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if resumes_from == "step 0":  # killed before the first checkpoint: config.json restarts the run
        assert "resuming run" not in resumed.stderr
    else:
        assert f"resuming run {run_dir.name} from {resumes_from}" in resumed.stderr
    assert_bitwise_equal(straight_run, run_dir)
    assert not [n for n in os.listdir(run_dir) if n.startswith(checkpoint_io.TMP_PREFIX)]


def test_sigterm_saves_the_current_step_and_the_run_continues_from_it(straight_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    stopped = train(tmp_path, RUN + ["--max_steps", "4", "--checkpoint_dir", ckpt], worker_args=["--signal_at", "2"])
    run_dir = only_run(ckpt)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert f"Stopped by signal 15 at step 3, which is saved in {run_dir}" in stopped.stderr
    assert checkpoint_io.complete_steps(str(run_dir), [0.9, 0.99]) == [2, 3]
    resumed = train(tmp_path, ["--wandb_id", run_dir.name, "--checkpoint_dir", ckpt])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_dir.name} from step 3" in resumed.stderr
    assert_bitwise_equal(straight_run, run_dir)


def write_fdm_run(run_dir, step):
    """A run directory as FDM's train_util.TrainLoop.save writes it: model and EMA files of
    {"state_dict", "config": its argparse namespace, "step"}, the optimizer's bare state_dict,
    no config.json. Returns (model state, EMA state)."""
    config = dict(dataset="bouncing_balls", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
                  batch_size=1, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=50000,
                  resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3, resume_id="", num_workers=1,
                  pad_with_random_frames=True, max_frames=4, T=10, sample_interval=50000, image_size=16,
                  num_channels=32, num_res_blocks=1, num_heads=2, num_heads_upsample=-1, attention_resolutions="8",
                  dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False, diffusion_steps=50,
                  noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
                  rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
                  use_scale_shift_norm=True, use_rpe_net=True)
    torch.manual_seed(3)
    model = create_model(ModelConfig(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8",
                                     num_heads=2))  # FDM has no --channel_mult: 16 pixels give (1, 2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    model_state = model.state_dict()
    ema_state = {k: v + 0.5 for k, v in model_state.items()}
    run_dir.mkdir(parents=True)
    torch.save({"state_dict": model_state, "config": config, "step": step}, run_dir / f"model{step:06d}.pt")
    torch.save({"state_dict": ema_state, "config": config, "step": step}, run_dir / f"ema_0.9999_{step:06d}.pt")
    torch.save(opt.state_dict(), run_dir / f"opt{step:06d}.pt")
    return model_state, ema_state


def test_a_run_written_by_fdm_continues(tmp_path):
    run_dir = tmp_path / "ckpt" / "fdmrun"
    _, ema_state = write_fdm_run(run_dir, 5)
    proc = train(tmp_path, ["--resume_id", "fdmrun", "--checkpoint_dir", tmp_path / "ckpt", "--max_steps", "6",
                            "--num_workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming run fdmrun from step 5" in proc.stderr
    opt = read_checkpoint_file(str(run_dir / "opt000006.pt"))["optimizer"]
    assert all(int(state["step"]) == 2 for state in opt["state"].values())  # FDM's step, then ours
    model = read_checkpoint_file(str(run_dir / "model000006.pt"))["state_dict"]
    ema = read_checkpoint_file(str(run_dir / "ema_0.9999_000006.pt"))["state_dict"]
    name = "out.2.weight"
    torch.testing.assert_close(ema[name], 0.9999 * ema_state[name] + 0.0001 * model[name])


def test_a_new_run_can_be_named(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = train(tmp_path, TINY + ["--batch_size", "1", "--max_steps", "1", "--wandb_id", "myrun",
                                   "--checkpoint_dir", ckpt])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" not in proc.stderr
    assert checkpoint_io.complete_steps(str(ckpt / "myrun"), [0.9999]) == [1]


# ----------------------------------------------------------------------------- the worker


def worker_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill_at", help="checkpoint file name to die while writing")
    parser.add_argument("--signal_at", type=int, default=-1, help="step during which to receive SIGTERM")
    opts, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    write = checkpoint_io.atomic_write_bytes

    def write_or_die(data, path):
        if os.path.basename(path) != opts.kill_at:
            return write(data, path)
        # Die as kill -9 would, halfway through the temporary file.
        with open(os.path.join(os.path.dirname(path), checkpoint_io.TMP_PREFIX + "dying"), "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    run_step = TrainLoop.run_step

    def run_step_and_signal(self):
        if self.step == opts.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return run_step(self)

    checkpoint_io.atomic_write_bytes = write_or_die
    TrainLoop.run_step = run_step_and_signal
    script = REPO / "scripts" / "video_train.py"
    sys.argv = [str(script), *train_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    worker_main(sys.argv[1:])


def test_update_ema_is_the_convex_combination_of_old_average_and_new_weights():
    torch.manual_seed(0)
    ema = [torch.randn(3, 4), torch.randn(5)]
    params = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema, params)]
    update_ema(ema, params, 0.9)
    for got, want in zip(ema, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_gradient_element_is_found_among_huge_finite_ones(tmp_path, monkeypatch, bad):
    loop = tiny_loop(tmp_path, monkeypatch)
    for p in loop.params:
        p.grad = torch.full_like(p, 3e38)  # finite, but its 2-norm would overflow
    assert grads_finite(loop.params)
    loop.params[-1].grad.view(-1)[0] = bad
    assert not grads_finite(loop.params)


# ----------------------------------------------------------------------------- conditions


def test_the_train_loop_gives_the_model_the_conditions_of_its_examples(tmp_path, monkeypatch, one_thread):
    """Actions from bouncing_balls_actions reach the model gathered by frame index; labels and drop flags too."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = TrainConfig(batch_size=2, max_frames=4, T=10, save_interval=1000, log_interval=1, ema_rate="0.9",
                      max_steps=2)
    model = create_model(ModelConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                     attention_resolutions="8", num_heads=2, cond_dim=5, num_classes=3,
                                     cond_drop_prob=0.5))
    dataset = get_dataset("bouncing_balls_actions", T=10, image_size=16)
    batches = train_batches(dataset, 4, seed=0, with_actions=True)
    seen = {}

    def data(step):
        videos, actions = next(batches)
        seen[step] = (videos, actions)
        return videos, actions, torch.tensor([0, 2, 1, 1])

    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    loop = TrainLoop(model=model, diffusion=create_diffusion(DiffusionConfig(diffusion_steps=50)), data=data,
                     config=cfg, run_dir=str(tmp_path), saved_config={"ema_rate": "0.9"},
                     logger=Logger(log_dir=str(tmp_path), rank=0), cond_drop_prob=0.5)
    padding = 0
    for step in (0, 1, 2):
        loop.step = step
        loop.run_step()
        kwargs = calls[step]
        videos, actions = seen[step]
        expected = training_batch(videos[:2], videos[2:], first_index=0, seed=0, step=step, max_frames=4,
                                  noise_mode="fdm", num_timesteps=50, actions=actions[:2], pad_actions=actions[2:],
                                  labels=torch.tensor([0, 2]), cond_drop_prob=0.5)
        for key in ("cond", "y", "drop_cond", "frame_indices"):
            assert torch.equal(kwargs[key], expected[key]), key
        assert kwargs["cond"].shape == (2, 4, 5) and (kwargs["cond"].sum(-1) == 1).all()  # one-hot per slot
        padding += int((kwargs["obs_mask"] + kwargs["latent_mask"] == 0).sum())
    assert padding  # some slots hold frames of the padding videos, with those videos' actions
    # Once the zero-initialised layers after the embeddings have moved (two steps), every conditioning
    # weight learns: at step 2 one example keeps its conditions and one is dropped.
    assert calls[-1]["drop_cond"].tolist() == [False, True]
    for name, p in model.conditioning.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_resumed_conditional_run_is_bitwise_the_same_run(tmp_path):
    """Actions and conditions dropped at random (cond_drop_prob 0.5) repeat exactly after a resume."""
    cond_run = [a if a != "bouncing_balls" else "bouncing_balls_actions" for a in RUN] + [
        "--cond_dim", "-1", "--cond_drop_prob", "0.5"]
    _, run_dir = straight_and_resumed(tmp_path, cond_run)
    saved = read_checkpoint_file(str(run_dir / "ema_0.9_000004.pt"))
    assert (saved["config"]["cond_dim"], saved["config"]["cond_drop_prob"], saved["config"]["frame_skip"]) == (5, 0.5, 1)
    assert "conditioning.null_cond_emb" in saved["state_dict"]
