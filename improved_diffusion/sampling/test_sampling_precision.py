"""How sampling calls the network (run.prepare_model): batched by default, per video with
batch_invariant, at bf16 / fp16 through autocast, and compiled.

A tiny UNet with every weight random (the zero-initialised output layers would make every
sample trivial) runs on one thread. torch.compile is never run with inductor here (minutes on a
small CPU): compile_model is replaced by a spy, so the tests check the plumbing and the order
of the wrappers, not the compiler.
"""

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.errors import ConfigError
from improved_diffusion.models import UNetVideoModel
from improved_diffusion.sampling import run as sampling_run
from improved_diffusion.sampling.request import SchemeRequest
from improved_diffusion.sampling.run import SampleOptions
from improved_diffusion.sampling.sampler import sample_with_scheme, video_generator
from improved_diffusion.sampling.scheme import Scheme
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, create_diffusion, create_model

H, T, K, N_OBS, STEPS = 16, 6, 4, 2, 4  # autoreg: 2 stages of 2 new frames, 4 (respaced) steps each
NFE = 2 * STEPS  # network evaluations per video


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, diffusion, scheme, checkpoint path) of a tiny random UNet."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(image_size=H, num_channels=32, channel_mult="1,2", attention_resolutions="8")
    model = create_model(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    model.eval()
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig(diffusion_steps=100)),
              "dataset": "bouncing_balls", "T": T, "max_frames": K}
    path = tmp_path_factory.mktemp("run") / "ema_0.9999_000000.pt"
    torch.save({"config": config, "state_dict": model.state_dict(), "step": 0}, path)
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100), str(STEPS))
    scheme = Scheme.from_preset("autoreg", T=T, max_frames=K, n_obs=N_OBS, timestep_respacing=str(STEPS))
    return model, diffusion, scheme, str(path)


@contextmanager
def network_batches():
    """The batch size of every UNetVideoModel call made inside the block, in order."""
    sizes = []

    def hook(module, args):
        if isinstance(module, UNetVideoModel):
            sizes.append(int(args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield sizes
    finally:
        handle.remove()


def sample(setup, videos=2, **wrapping):
    """Samples [videos x T x C x H x W] (float) of random given frames, the model wrapped by prepare_model."""
    model, diffusion, scheme, _ = setup
    given = torch.rand(videos, T, 3, H, H, generator=torch.Generator().manual_seed(1)) * 2 - 1
    wrapped = sampling_run.prepare_model(model, "cpu", **wrapping)
    return sample_with_scheme(wrapped, diffusion, scheme, given, [video_generator(0, 0, i) for i in range(videos)])


def generated_deviation(a, b):
    """Mean absolute difference of the generated frames (pixels in [-1, 1])."""
    return (a[:, N_OBS:] - b[:, N_OBS:]).abs().mean().item()


def test_sample_dataset_calls_the_model_once_per_batch_by_default(setup, tmp_path, one_thread):
    """Default: one call per row of the plan carrying both videos; batch_invariant: one call per video."""
    checkpoint = setup[3]
    request = SchemeRequest("autoreg", T=T, n_obs=N_OBS, timestep_respacing=str(STEPS))
    options = SampleOptions(stop_index=2, batch_size=2, device="cpu")
    with network_batches() as batched:
        sampling_run.sample_dataset(checkpoint, request, replace(options, eval_dir=tmp_path / "batched"))
    with network_batches() as per_video:
        sampling_run.sample_dataset(checkpoint, request, replace(options, eval_dir=tmp_path / "per_video",
                                                                 batch_invariant=True))
    assert batched == [2] * NFE
    assert per_video == [1] * (2 * NFE)
    for name in ("sample_0000-0.npy", "sample_0001-0.npy"):
        a = np.load(tmp_path / "batched" / "samples" / name).astype(int)
        b = np.load(tmp_path / "per_video" / "samples" / name).astype(int)
        # Batched kernels may round differently in the last float bits, which can move a pixel across a
        # uint8 rounding boundary: at most one level.
        assert np.abs(a - b).max() <= 1 and a[N_OBS:].std() > 0


def test_batched_samples_are_close_to_per_video_samples(setup, one_thread):
    # Only float32 rounding separates the two; kernels that pick another summation order for
    # another batch size, amplified over a rollout's many steps, stay well under 1e-3.
    batched, per_video = sample(setup), sample(setup, batch_invariant=True)
    assert torch.allclose(batched, per_video, rtol=0, atol=1e-3)
    assert not torch.equal(batched[0, N_OBS:], batched[1, N_OBS:])


def test_bf16_samples_match_fp32_within_tolerance(setup, one_thread):
    """bf16 runs the network in 16 bits and hands back float32; the samples stay close to fp32's.

    bf16 keeps 8 significant bits (rounding 2^-9 = 0.2 % per operation); through the UNet the
    network's output ends up with about 2 % relative RMS error. The sampler turns it into x0 =
    (x - sqrt(1 - abar) eps) / sqrt(abar), which at the noisiest steps multiplies the error by
    1 / sqrt(abar) >> 1 before clipping to [-1, 1], so single pixels of this random model can move
    by up to ~1 (measured max 0.99-1.06 over three seeds): the mean is the stable measure.
    Measured mean absolute deviation of the generated frames: 0.0083 here, 0.008-0.011 over three
    seeds (model and data); the tolerance, 0.03, is about 3x the largest, and far below the 0.9
    between the two videos' samples (checked below, so a broken comparison cannot pass).
    """
    fp32, bf16 = sample(setup), sample(setup, precision="bf16")
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    deviation = generated_deviation(bf16, fp32)
    assert 0 < deviation < 0.03, deviation  # > 0: the network really ran in bf16
    assert torch.equal(bf16[:, :N_OBS], fp32[:, :N_OBS])  # given frames pass through bit for bit
    unrelated = generated_deviation(fp32, fp32.flip(0))  # the other video's sample
    assert unrelated > 0.3, unrelated


def test_fp16_sampling_runs_and_is_finite(setup, one_thread):
    # fp16 kernels are slow on a CPU (~1 s per call of this model): one video.
    fp32, fp16 = sample(setup, videos=1), sample(setup, videos=1, precision="fp16")
    assert fp16.dtype == torch.float32 and torch.isfinite(fp16).all()
    assert 0 < generated_deviation(fp16, fp32) < 0.03  # measured 0.0011: fp16 has 11 significant bits


def test_prepare_model_compiles_then_sets_precision_then_splits_videos(setup, monkeypatch):
    """compile_model gets the nn.Module itself; the compiled network runs under autocast, per video."""
    model = setup[0]
    compiled, calls = [], []

    def spy_compile(module):
        compiled.append(module)

        def network(x, t, **kwargs):
            calls.append((x.shape[0], torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return x * 2

        return network

    monkeypatch.setattr(sampling_run, "compile_model", spy_compile)
    x = torch.randn(3, K, 3, H, H)
    wrapped = sampling_run.prepare_model(model, "cpu", batch_invariant=True, precision="bf16", compile=True)
    out = wrapped(x, torch.zeros(3, K, dtype=torch.long), frame_indices=torch.zeros(3, K, dtype=torch.long))
    assert compiled == [model]
    assert calls == [(1, True, torch.bfloat16)] * 3
    assert out.dtype == torch.float32 and out.shape == x.shape

    # The defaults leave the network as it is: no compilation, no wrapper.
    assert sampling_run.prepare_model(model, "cpu") is model and len(compiled) == 1


def test_sample_dataset_passes_precision_and_compile_to_prepare_model(setup, tmp_path, monkeypatch, one_thread):
    """...and records them in sampling_config.json, which Scheme.from_dict still reads."""
    seen = []
    real = sampling_run.prepare_model

    def spy(model, device, **wrapping):
        seen.append(wrapping)
        return real(model, device, **{**wrapping, "compile": False})  # the plumbing, not the compiler

    monkeypatch.setattr(sampling_run, "prepare_model", spy)
    request = SchemeRequest("autoreg", T=T, n_obs=N_OBS, timestep_respacing="2")
    sampling_run.sample_dataset(setup[3], request, SampleOptions(stop_index=1, eval_dir=tmp_path, device="cpu",
                                                                 precision="bf16", compile=True))
    assert seen == [dict(batch_invariant=False, precision="bf16", compile=True, kv_cache=None)]
    config = json.loads((tmp_path / "sampling_config.json").read_text())
    assert (config["precision"], config["compiled"], config["batch_invariant"]) == ("bf16", True, False)
    assert Scheme.from_dict(config).plan == "autoreg"

    # Samples of one precision are not resumed at another (one sentence, before the model is loaded).
    with pytest.raises(ConfigError, match="made with --precision bf16, not fp32"):
        sampling_run.sample_dataset(setup[3], request, SampleOptions(stop_index=2, eval_dir=tmp_path, device="cpu"))


def test_16_bit_samples_go_to_their_own_folder_by_default(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    request = SchemeRequest("autoreg", T=T, n_obs=N_OBS)
    fp32 = sampling_run.sample_dataset(setup[3], request, SampleOptions(just_visualise=True))
    bf16 = sampling_run.sample_dataset(setup[3], request, SampleOptions(just_visualise=True, precision="bf16"))
    assert Path(bf16).parent.name == Path(fp32).parent.name + "_bf16"


def test_only_existing_samples_pin_a_folders_precision(tmp_path):
    config = tmp_path / "sampling_config.json"
    config.write_text(json.dumps({"precision": "bf16"}))
    sampling_run.check_same_settings(tmp_path, precision="fp32")  # no samples/ folder yet
    (tmp_path / "samples").mkdir()
    sampling_run.check_same_settings(tmp_path, precision="fp32")  # nothing sampled yet
    np.save(tmp_path / "samples" / "sample_0000-0.npy", np.zeros(1, np.uint8))
    sampling_run.check_same_settings(tmp_path, precision="bf16")
    with pytest.raises(ConfigError, match="made with --precision bf16, not fp32"):
        sampling_run.check_same_settings(tmp_path, precision="fp32")
    config.write_text(json.dumps({"seed": 0}))  # written before precision was recorded: fp32
    sampling_run.check_same_settings(tmp_path, precision="fp32")
    with pytest.raises(ConfigError, match="made with --precision fp32, not fp16"):
        sampling_run.check_same_settings(tmp_path, precision="fp16")
