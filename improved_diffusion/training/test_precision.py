"""Training in bf16 and fp16 (autocast, fp16 loss scaling), torch.compile and activation checkpointing.

The tiny model of test_train_loop trains on CPU. fp16 convolutions have no fast CPU kernels
(about 10x slower than float32), so the fp16 runs use 8x8 frames and batch 1. Compiling uses
the aot_eager backend through the `compile_network` seam (static shapes, as the product):
inductor, the product's backend, takes 2-4 minutes per model on a 2-core CPU.

Run as a script under mpiexec, this file is a worker that trains with scripts/video_train.py,
compiling with that test backend, and writes each rank's parameters to --dump_dir.
"""

import argparse
import csv
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.checkpoints import read_checkpoint_file
from improved_diffusion.errors import ConfigError, TrainingError
from improved_diffusion.training import gradients, train_loop
from improved_diffusion.training.config import TrainConfig
from improved_diffusion.training.gradients import grad_scaler
from improved_diffusion.training.test_train_loop import (
    TINY,
    flat,
    only_run,
    script_env,
    tiny_loop,
)
from improved_diffusion.training.train_loop import TrainLoop

REPO = Path(__file__).resolve().parents[2]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def compile_for_tests(model):
    """What the tests compile with: aot_eager (forward and backward graphs, run eagerly), static shapes
    as the product's compile_network."""
    return torch.compile(model, backend="aot_eager", dynamic=False)


def pure_data(image_size, batch_size):
    """data(step) as a pure function of the step (2B random videos), for exact-resume comparisons."""
    def data(step):
        gen = torch.Generator().manual_seed(1000 + step)
        return torch.rand(2 * batch_size, 10, 3, image_size, image_size, generator=gen) * 2 - 1
    return data


def train_steps(loop, n):
    """Run n steps by hand; returns what run_step returned for each."""
    losses = []
    for _ in range(n):
        losses.append(loop.run_step())
        loop.step += 1
    return losses


def float_tensors(obj):
    return {k: v for k, v in flat(obj).items() if v.is_floating_point()}


def is_power_of_two(x):
    return x > 0 and math.frexp(x)[0] == 0.5


# ----------------------------------------------------------------------------- flags


def test_precision_flags_are_checked():
    with pytest.raises(ConfigError, match="--precision must be one of fp32, bf16, fp16"):
        TrainConfig(dataset="bouncing_balls", precision="fp8").validate()
    with pytest.raises(ConfigError, match="--use_fp16 True means --precision fp16"):
        TrainConfig(dataset="bouncing_balls", use_fp16=True, precision="bf16").validate()
    for use_fp16, precision, expected in [(True, "fp32", "fp16"), (True, "fp16", "fp16"), (False, "bf16", "bf16")]:
        cfg = TrainConfig(dataset="bouncing_balls", use_fp16=use_fp16, precision=precision)
        cfg.validate()
        assert cfg.training_precision() == expected


def test_fp16_scale_growth_sets_the_steps_between_doublings():
    # FDM: log2(scale) += fp16_scale_growth per step, so 1e-3 doubles the scale every 1000 steps.
    assert grad_scaler("cpu", "fp16", 1e-3).get_growth_interval() == 1000
    assert grad_scaler("cpu", "fp16", 0.3).get_growth_interval() == 3
    assert grad_scaler("cpu", "fp16", 0.0).get_growth_interval() >= 2 ** 30  # never grows
    assert not grad_scaler("cpu", "bf16", 1e-3).is_enabled() and not grad_scaler("cpu", "fp32", 1e-3).is_enabled()


# ----------------------------------------------------------------------------- bf16


def test_bf16_training_follows_the_float32_loss_curve(tmp_path, monkeypatch, one_thread):
    """50 steps at lr 1e-3 (the loss falls from 1.0 to about 0.1), same seed, data, noise and timesteps.

    Tolerance: every step's loss within 10% of float32's, and the 10-step moving average within 3%.
    bf16 keeps 8 significant bits (rounding error 2**-9, 0.2%, per operation); through the network
    a step's loss moves by about 1%, and the two weight trajectories drift apart slowly, most
    visibly late in the run where the loss is small. Measured: at most 3.4% on single steps and
    1.1% on the moving average, so the bounds are about 3x the measurement. A bf16 run that
    diverged, lost its weight updates or stopped learning misses them by far.
    """
    curves, dtypes = {}, set()
    for precision in ("fp32", "bf16"):
        loop = tiny_loop(tmp_path / precision, monkeypatch, precision=precision, lr=1e-3, max_steps=50)
        conv = loop.model.input_blocks[0][0]
        conv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        losses = train_steps(loop, 50)
        assert all(loss is not None and math.isfinite(loss) for loss in losses), losses
        assert loop.nonfinite_in_a_row == 0
        curves[precision] = np.array(losses)
        # Master weights, gradients, optimizer state and EMA stay float32.
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in loop.params)
        assert all(v.dtype == torch.float32 for v in float_tensors(loop.opt.state_dict()).values())
        assert all(e.dtype == torch.float32 for e in loop.ema_params[0])
    assert dtypes == {torch.float32, torch.bfloat16}  # the bf16 run's convolutions really ran in bf16
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-10:].mean() < 0.3 * fp32[:10].mean()  # a learning curve, not a flat line
    relative = np.abs(bf16 - fp32) / fp32
    smooth = np.convolve(bf16 - fp32, np.ones(10) / 10, "valid") / np.convolve(fp32, np.ones(10) / 10, "valid")
    print(f"bf16 vs fp32: max per-step deviation {relative.max():.4f}, moving average {np.abs(smooth).max():.4f}")
    assert relative.max() < 0.10, relative
    assert np.abs(smooth).max() < 0.03, smooth


# ----------------------------------------------------------------------------- fp16


def test_fp16_loss_scaling_skips_overflows_without_counting_them_as_nonfinite_steps(tmp_path, monkeypatch,
                                                                                   one_thread):
    """50 steps; the scale doubles after every 10 overflow-free steps (fp16_scale_growth 0.1) and halves
    on the two steps whose gradient is made infinite, which change no weight and, unlike a
    non-finite loss, do not stop training even with max_nonfinite_steps 1."""
    loop = tiny_loop(tmp_path, monkeypatch, image_size=8, batch_size=1, lr=1e-3, precision="fp16",
                     fp16_scale_growth=0.1, max_nonfinite_steps=1, max_steps=50)
    inf_steps = {20, 21}
    loop.params[0].register_hook(lambda g: g * float("inf") if loop.step in inf_steps else g)
    overflows, scales, weights = set(), [], {}
    skip_overflow = loop.skip_overflow

    def spy(loss):
        overflows.add(loop.step)
        return skip_overflow(loss)

    monkeypatch.setattr(loop, "skip_overflow", spy)
    assert loop.scaler.get_scale() == 2.0 ** 16
    for step in range(50):
        weights[step] = [p.detach().clone() for p in loop.params]
        loss = loop.run_step()
        assert loss is not None and math.isfinite(loss), (step, loss)
        scales.append(loop.scaler.get_scale())
        loop.step += 1
    assert inf_steps <= overflows
    for step in inf_steps:  # a skipped step leaves the weights as they were
        assert all(torch.equal(a, b) for a, b in zip(weights[step], weights[step + 1]))
    # GradScaler's documented rule, replayed: halve on an overflow, double after 10 clean steps in a row.
    expected, scale, clean = [], 2.0 ** 16, 0
    for step in range(50):
        if step in overflows:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == 10:
                scale, clean = scale * 2, 0
        expected.append(scale)
    assert scales == expected
    assert all(is_power_of_two(s) for s in scales) and max(scales) > 2.0 ** 16
    # A non-finite loss is still a non-finite step in fp16.
    loop.model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(TrainingError, match="1 consecutive non-finite losses"):
        loop.run_step()


def test_an_infinite_gradient_stops_a_float32_run_with_max_nonfinite_steps_1(tmp_path, monkeypatch, one_thread):
    """The control for the fp16 test above: without loss scaling the same gradient is a non-finite step."""
    loop = tiny_loop(tmp_path, monkeypatch, image_size=8, batch_size=1, max_nonfinite_steps=1)
    loop.params[0].register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingError, match="1 consecutive non-finite losses"):
        loop.run_step()


def test_fp16_stops_when_no_loss_scale_makes_the_gradients_finite(tmp_path, monkeypatch, one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, image_size=8, batch_size=1, precision="fp16")
    loop.params[0].register_hook(lambda g: g * float("nan"))
    # As a resumed run that has halved its scale many times: the next overflow takes it below MIN_LOSS_SCALE.
    loop.scaler.load_state_dict({**loop.scaler.state_dict(), "scale": gradients.MIN_LOSS_SCALE})
    with pytest.raises(TrainingError, match="fp16 gradients stayed non-finite down to loss scale"):
        loop.run_step()


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path, monkeypatch, one_thread):
    settings = dict(image_size=8, batch_size=1, precision="fp16", fp16_scale_growth=0.5, save_interval=2, max_steps=4)
    straight = tiny_loop(tmp_path / "straight", monkeypatch, **settings)
    straight.data = pure_data(8, 1)
    straight.run()
    assert straight.scaler.get_scale() == 2.0 ** 18  # doubled every 2 steps
    opt_file = read_checkpoint_file(os.path.join(straight.run_dir, "opt000002.pt"))
    assert opt_file["grad_scaler"]["scale"] == 2.0 ** 17
    # A new loop in the same run directory continues from step 2 and rewrites step 4.
    resumed = tiny_loop(tmp_path / "straight", monkeypatch, **settings)
    resumed.data = pure_data(8, 1)
    assert resumed.load_newest_readable([2]) == 2 and resumed.scaler.get_scale() == 2.0 ** 17
    resumed.run()
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, straight.params))
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema_params[0], straight.ema_params[0]))
    a, b = flat(resumed.opt.state_dict()), flat(straight.opt.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("written_in", ["bf16", "fp16"])
def test_checkpoints_written_in_16_bits_are_float32_and_load_in_every_precision(tmp_path, monkeypatch, one_thread,
                                                                               written_in):
    loop = tiny_loop(tmp_path, monkeypatch, image_size=8, batch_size=1, precision=written_in, save_interval=2,
                     max_steps=2)
    loop.run()
    run_dir = Path(loop.run_dir)
    for name in ("model000002.pt", "ema_0.9_000002.pt", "opt000002.pt"):
        tensors = float_tensors(read_checkpoint_file(str(run_dir / name)))
        assert tensors and {v.dtype for v in tensors.values()} == {torch.float32}, name
    assert ("grad_scaler" in read_checkpoint_file(str(run_dir / "opt000002.pt"))) == (written_in == "fp16")
    saved = read_checkpoint_file(str(run_dir / "model000002.pt"))["state_dict"]
    for precision in ("fp32", "bf16", "fp16"):
        other = tiny_loop(tmp_path, monkeypatch, image_size=8, batch_size=1, precision=precision, max_steps=3)
        assert other.load_newest_readable([2]) == 2
        assert all(torch.equal(p, saved[n]) for n, p in other.model.named_parameters())
        assert all(torch.equal(e, p) for e, p in zip(other.ema_params[0], loop.ema_params[0]))
        (loss,) = train_steps(other, 1)
        assert loss is not None and math.isfinite(loss)


# ----------------------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_gives_the_same_gradients_and_trains_in_16_bits(tmp_path, monkeypatch, one_thread):
    grads = {}
    for use_checkpoint in (False, True):
        loop = tiny_loop(tmp_path, monkeypatch, use_checkpoint=use_checkpoint)
        loop.run_step()
        grads[use_checkpoint] = [p.grad.clone() for p in loop.params]
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)
    for precision in ("bf16", "fp16"):
        loop = tiny_loop(tmp_path, monkeypatch, image_size=8, batch_size=1, use_checkpoint=True, precision=precision)
        losses = train_steps(loop, 3)
        assert all(loss is not None and math.isfinite(loss) for loss in losses), (precision, losses)
        assert loop.nonfinite_in_a_row == 0 and all(torch.isfinite(p).all() for p in loop.params)


# ----------------------------------------------------------------------------- torch.compile


def test_compiled_training_agrees_with_eager_and_saves_plain_keys(tmp_path, monkeypatch, one_thread):
    """Float32, 2 steps: the compiled network (with activation checkpointing) against the eager one
    (without); then the compiled, checkpointed network in bf16 trains 2 finite steps."""
    compiled = []

    def seam(model):
        compiled.append(model)
        return compile_for_tests(model)

    monkeypatch.setattr(train_loop, "compile_network", seam)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = tiny_loop(tmp_path / "eager", monkeypatch, max_steps=2, save_interval=2)
    eager.data = pure_data(16, 2)
    eager_losses = train_steps(eager, 2)
    loop = tiny_loop(tmp_path / "compiled", monkeypatch, max_steps=2, save_interval=2, compile=True,
                     use_checkpoint=True)
    loop.data = pure_data(16, 2)
    assert compiled == [loop.model] and isinstance(loop.network.model, torch._dynamo.eval_frame.OptimizedModule)
    losses = train_steps(loop, 2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo did compile the network
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
    for a, b in zip(loop.params, eager.params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(loop.ema_params[0], eager.ema_params[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    loop.save()
    eager.save()
    keys = read_checkpoint_file(os.path.join(loop.run_dir, "model000002.pt"))["state_dict"].keys()
    assert keys == read_checkpoint_file(os.path.join(eager.run_dir, "model000002.pt"))["state_dict"].keys()
    assert not [k for k in keys if "_orig_mod" in k]
    ema_keys = read_checkpoint_file(os.path.join(loop.run_dir, "ema_0.9_000002.pt"))["state_dict"].keys()
    assert ema_keys == keys
    bf16 = tiny_loop(tmp_path / "bf16", monkeypatch, compile=True, use_checkpoint=True, precision="bf16")
    bf16.data = pure_data(16, 2)
    assert all(loss is not None and math.isfinite(loss) for loss in train_steps(bf16, 2))


# ----------------------------------------------------------------------------- the script


def train_script(tmp_path, args):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "video_train.py"), *map(str, args)], cwd=REPO,
                          env=script_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("flags, precision", [(["--precision", "bf16"], "bf16"), (["--use_fp16", "True"], "fp16")])
def test_the_script_trains_in_16_bits_with_float32_previews_and_checkpoints(tmp_path, flags, precision):
    proc = train_script(tmp_path, TINY + flags + ["--batch_size", "1", "--max_steps", "2", "--sample_interval", "2",
                                                "--num_workers", "0", "--checkpoint_dir", tmp_path / "ckpt"])
    assert f"precision {precision}" in proc.stderr
    run_dir = only_run(tmp_path / "ckpt")
    preview = np.load(run_dir / "previews" / "step000002.npy")
    assert preview.dtype == np.uint8 and preview.shape == (8, 3, 16, 16)
    model = read_checkpoint_file(str(run_dir / "model000002.pt"))
    assert {v.dtype for v in float_tensors(model["state_dict"]).values()} == {torch.float32}
    config = model["config"]
    assert (config["precision"], config["use_fp16"]) == (("bf16", False) if precision == "bf16" else ("fp32", True))
    assert ("grad_scaler" in read_checkpoint_file(str(run_dir / "opt000002.pt"))) == (precision == "fp16")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the Python executable")
def test_data_parallel_compiled_bf16_training_keeps_the_ranks_in_step(tmp_path):
    """2 ranks, DDP inside torch.compile, bf16: every rank ends with the same float32 weights."""
    dump = tmp_path / "dump"
    args = TINY + ["--batch_size", "1", "--max_steps", "2", "--num_workers", "0", "--sample_interval", "0",
                   "--log_interval", "1", "--compile", "True", "--precision", "bf16", "--checkpoint_dir",
                   tmp_path / "ckpt"]
    cmd = [MPIEXEC, "-n", "2", sys.executable, __file__, "--dump_dir", dump, "--", *args]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=script_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(rank["compiled_ddp"] for rank in ranks)
    assert all(p.dtype == torch.float32 for p in ranks[0]["params"])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    run_dir = only_run(tmp_path / "ckpt")
    state = read_checkpoint_file(str(run_dir / "model000002.pt"))["state_dict"]
    assert not [k for k in state if "_orig_mod" in k or k.startswith("module.")]
    with open(run_dir / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(row["loss"])) for row in rows)  # both steps taken
    assert [row["nonfinite_skipped"] for row in rows] == ["0", "0"]


def worker_main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump_dir", required=True)
    opts, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    train_loop.compile_network = compile_for_tests
    run = TrainLoop.run

    def run_and_dump(self):
        run(self)
        os.makedirs(opts.dump_dir, exist_ok=True)
        dump = {"params": [p.detach().cpu() for p in self.params],
                "compiled_ddp": isinstance(self.network.model, torch._dynamo.eval_frame.OptimizedModule)
                and isinstance(self.network.model._orig_mod, torch.nn.parallel.DistributedDataParallel)}
        torch.save(dump, os.path.join(opts.dump_dir, f"rank{self.rank}.pt"))

    TrainLoop.run = run_and_dump
    script = REPO / "scripts" / "video_train.py"
    sys.argv = [str(script), *train_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    worker_main(sys.argv[1:])
