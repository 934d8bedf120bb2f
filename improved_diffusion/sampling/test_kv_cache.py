"""The causal key/value cache: exact against the uncached network, and actually used.

The reference is always the same network called on all frames, without the cache. Exactness is
checked in float64 (where the two agree to rounding of 1e-10, so any wrong key, mask, index or
time embedding shows) and per call in float32 to the 1e-5 the sampler promises; whole float32
rollouts are not compared, because a random network amplifies the last-bit differences of a
different summation order along the chain.
"""

import pytest
import torch

from improved_diffusion.diffusion.build import DiffusionConfig, create_diffusion
from improved_diffusion.models.unet import UNetConfig, UNetVideoModel
from improved_diffusion.sampling.kv_cache import CausalCache, supports_cache
from improved_diffusion.sampling.run import prepare_model
from improved_diffusion.sampling.sampler import sample_video, video_generator
from improved_diffusion.sampling.scheme import PRESETS, Scheme

C, H = 3, 8


def random_unet(causal=True, dtype=torch.float32):
    """A tiny UNet with every weight random (zero-initialised output layers would hide the inputs)."""
    torch.manual_seed(0)
    model = UNetVideoModel(UNetConfig(image_size=H, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2),
                                      num_heads=2, causal=causal))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def unet64():
    return random_unet(dtype=torch.float64)


def call_inputs(dtype, T=7, seed=0):
    """Inputs of one model call with observed, latent and padding slots in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    B = 2
    x = torch.randn(B, T, C, H, H, generator=g, dtype=dtype)
    x0 = torch.randn(B, T, C, H, H, generator=g, dtype=dtype)
    frame_indices = torch.stack([torch.randperm(20, generator=g)[:T] for _ in range(B)])
    obs = (torch.rand(B, T, generator=g) < 0.5).to(dtype)
    latent = 1 - obs
    latent[1, 0] = 0  # video 1, slot 0: padding
    t = torch.randint(0, 1000, (B, T), generator=g)
    return x, t, {"x0": x0, "frame_indices": frame_indices, "obs_mask": obs.view(B, T, 1, 1, 1),
                  "latent_mask": latent.view(B, T, 1, 1, 1)}


@torch.no_grad()
def test_cached_call_equals_full_call(unet64):
    """Change the frames from the 4th smallest index on: only those are recomputed, the result is exact."""
    x, t, kwargs = call_inputs(torch.float64)
    cache = CausalCache(unet64)
    first = cache(x, t, **kwargs)
    assert torch.allclose(first, unet64(x, t, **kwargs), atol=1e-10, rtol=0)
    assert cache.frames_computed == cache.frames_requested == 2 * 7

    in_model = (kwargs["obs_mask"] + kwargs["latent_mask"]).view(2, 7).bool()
    kth = torch.stack([kwargs["frame_indices"][b][in_model[b]].sort().values[3] for b in range(2)])
    changed = kwargs["frame_indices"] >= kth[:, None]
    x2 = torch.where(changed.view(2, 7, 1, 1, 1), -x, x)
    t2 = torch.where(changed, 999 - t, t)
    second = cache(x2, t2, **kwargs)
    assert torch.allclose(second, unet64(x2, t2, **kwargs), atol=1e-10, rtol=0)
    assert cache.frames_computed - 14 == 2 * (7 - 3)  # 3 frames per video came from the cache

    # A changed earlier frame invalidates every later one: nothing is reused.
    t3 = t2.clone()
    t3[in_model & (kwargs["frame_indices"] == kwargs["frame_indices"].where(in_model, 99).min(1, True).values)] = 5
    third = cache(x2, t3, **kwargs)
    assert torch.allclose(third, unet64(x2, t3, **kwargs), atol=1e-10, rtol=0)
    assert cache.frames_computed - 22 == 14


def scheme_for(name, use_ddim):
    latent = 2 if name in ("autoreg", "adaptive-autoreg", "long-range") else None
    return Scheme.from_preset(name, T=12, n_obs=3, max_frames=8, max_latent_frames=latent, use_ddim=use_ddim)


def rollout(model, diffusion, scheme, videos):
    generators = [video_generator(0, 0, b) for b in range(len(videos))]
    return sample_video(model, diffusion, videos, scheme.n_obs, scheme.make_plan(), scheme.stage, generators)


@pytest.mark.parametrize("use_ddim", [True, False])
@torch.no_grad()
def test_every_scheme_samples_the_same_with_the_cache(unet64, use_ddim):
    """float64 rollouts of every registry scheme (but the file-driven one), cached and uncached, agree to 1e-9."""
    torch.set_default_dtype(torch.float64)  # the sampler draws its noise in the default dtype
    try:
        diffusion = create_diffusion(DiffusionConfig(timestep_respacing="4"))
        videos = torch.rand(2, 12, C, H, H, generator=torch.Generator().manual_seed(1)) * 2 - 1
        for name in [n for n in PRESETS if n != "optimal"]:  # "optimal" reads its plan from a file
            scheme = scheme_for(name, use_ddim)
            cache = CausalCache(unet64)
            cached = rollout(cache, diffusion, scheme, videos)
            plain = rollout(unet64, diffusion, scheme, videos)
            assert (cached - plain).abs().max() < 1e-9, name
            if use_ddim and scheme.stage.stabilization == "df":  # context shown without fresh noise
                assert cache.frames_computed < 0.6 * cache.frames_requested, name
    finally:
        torch.set_default_dtype(torch.float32)


class Compare:
    """The uncached model, which also asks the cache at every call and records the largest difference."""

    def __init__(self, model):
        self.model, self.cache, self.worst = model, CausalCache(model), 0.0

    def __call__(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        self.worst = max(self.worst, (self.cache(x, t, **kwargs) - out).abs().max().item())
        return out


@torch.no_grad()
def test_float32_calls_agree_to_1e_5_and_the_cache_is_used():
    """In float32 every cached call of every registry scheme's rollout equals the uncached call to 1e-5."""
    model = random_unet()
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="4"))
    videos = torch.rand(2, 12, C, H, H, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for name in [n for n in PRESETS if n != "optimal"]:
        compare = Compare(model)
        rollout(compare, diffusion, scheme_for(name, use_ddim=True), videos)
        assert compare.worst < 1e-5, name
        if name == "stabilized-autoreg":  # 4 steps per stage, 1 of up to 8 frames recomputed after the first
            assert compare.cache.frames_computed < 0.35 * compare.cache.frames_requested


def test_only_causal_unets_are_cached():
    assert supports_cache(random_unet(causal=True)) and not supports_cache(random_unet(causal=False))
    with pytest.raises(ValueError, match="causal=True"):
        CausalCache(random_unet(causal=False))


def test_sampling_runs_use_the_cache_by_default_for_causal_unets_only(capsys):
    causal, plain = random_unet(causal=True), random_unet(causal=False)
    assert isinstance(prepare_model(causal, "cpu"), CausalCache)
    assert prepare_model(causal, "cpu", kv_cache=False) is causal
    assert prepare_model(plain, "cpu") is plain and capsys.readouterr().err == ""
    assert prepare_model(plain, "cpu", kv_cache=True) is plain
    assert "--kv_cache True has no effect" in capsys.readouterr().err

    # Per video, each batch slot keeps its own cache: the second call of slot 0 reuses its frames.
    x, t, kwargs = call_inputs(torch.float32)
    per_video = prepare_model(causal, "cpu", batch_invariant=True)
    with torch.no_grad():
        first = per_video(x, t, **kwargs)
        again = per_video(x, t, **kwargs)
        assert torch.allclose(first, causal(x, t, **kwargs), atol=1e-5) and torch.allclose(again, first, atol=1e-5)
