"""Conditions while sampling and classifier-free guidance.

Stand-in models whose conditional and null outputs are known check where guidance is applied (the
network's raw output, one call on the doubled batch) and that each stage slot gets the vector of
the frame it holds under any plan; a tiny random causal UNet checks the key/value cache with
conditions and the w = 1 identity.
"""

import pytest
import torch

from improved_diffusion.diffusion.build import DiffusionConfig, create_diffusion
from improved_diffusion.models import ModelConfig, UNetConfig, UNetVideoModel, create_model
from improved_diffusion.sampling.guidance import ClassifierFreeGuidance, Conditions, guided
from improved_diffusion.sampling.kv_cache import CausalCache
from improved_diffusion.sampling.run import prepare_model
from improved_diffusion.sampling.sampler import preview_rollout, sample_video, video_generator
from improved_diffusion.sampling.scheme import Scheme

C, H, D = 3, 8, 2


class StandIn:
    """A model whose conditional and null outputs are simple known functions; records every call.

    Conditional rows: 0.5 x_shown + 0.3 * (first entry of the slot's vector); null rows (drop_cond):
    0.2 x_shown - 0.1. With `extra` channels it also returns a "variance" that differs between the two.
    """

    def __init__(self, extra=0):
        self.calls = []
        self.extra = extra

    def __call__(self, x, t, x0=None, frame_indices=None, obs_mask=None, latent_mask=None, cond=None, y=None,
                 drop_cond=None):
        self.calls.append({"x": x, "t": t, "frame_indices": frame_indices, "cond": cond, "drop_cond": drop_cond,
                           "obs_mask": obs_mask})
        shown = x if x0 is None else x * (1 - obs_mask) + x0 * obs_mask
        B = x.shape[0]
        drop = torch.zeros(B, dtype=torch.bool) if drop_cond is None else drop_cond.bool()
        conditional = 0.5 * shown + 0.3 * cond[..., 0, None, None, None]
        null = 0.2 * shown - 0.1
        out = torch.where(drop.view(B, 1, 1, 1, 1), null, conditional)
        if self.extra:
            variance = torch.where(drop.view(B, 1, 1, 1, 1), torch.full_like(shown, -7.0), torch.full_like(shown, 7.0))
            out = torch.cat([out, variance[:, :, : self.extra]], dim=2)
        return out


def call_inputs(B=2, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.zeros(B, K, 1, 1, 1)
    obs[:, :1] = 1
    return (torch.randn(B, K, C, H, H, generator=g), torch.tensor([5, 9]),
            dict(x0=torch.randn(B, K, C, H, H, generator=g), frame_indices=torch.tensor([[0, 3, 4, 9], [1, 2, 6, 7]]),
                 obs_mask=obs, latent_mask=1 - obs, cond=torch.randn(B, K, D, generator=g)))


def test_guidance_is_uncond_plus_w_times_the_difference_of_one_doubled_call():
    model = StandIn(extra=3)
    x, t, kwargs = call_inputs()
    out = ClassifierFreeGuidance(model, 3.0)(x, t, **kwargs)
    (call,) = model.calls
    assert call["x"].shape[0] == 4 and call["drop_cond"].tolist() == [False, False, True, True]
    assert torch.equal(call["frame_indices"], kwargs["frame_indices"].repeat(2, 1))
    assert torch.equal(call["cond"], kwargs["cond"].repeat(2, 1, 1)) and call["t"].tolist() == [5, 9, 5, 9]
    cond, uncond = StandIn()(x, t, **kwargs), StandIn()(x, t, **kwargs, drop_cond=torch.tensor([True, True]))
    assert torch.allclose(out[:, :, :C], uncond + 3.0 * (cond - uncond), atol=1e-6, rtol=0)
    assert (out[:, :, C:] == 7.0).all()  # a learned variance comes from the conditional half
    # Videos already shown the null condition stay null in the "conditional" half.
    model.calls.clear()
    ClassifierFreeGuidance(model, 3.0)(x, t, **kwargs, drop_cond=torch.tensor([True, False]))
    assert model.calls[0]["drop_cond"].tolist() == [True, False, True, True]


def random_unet(causal=False, dtype=torch.float32, **conditioning):
    torch.manual_seed(0)
    model = UNetVideoModel(UNetConfig(image_size=H, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2),
                                      num_heads=2, causal=causal, **conditioning))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


@torch.no_grad()
def test_scale_one_is_the_conditional_model():
    model = random_unet(cond_dim=D, null_cond=True)
    assert guided(model, 1.0) is model and isinstance(guided(model, 1.5), ClassifierFreeGuidance)
    # The formula at w = 1 is the conditional half up to rounding (float64: batch-size kernels agree to 1e-12).
    x, t, kwargs = call_inputs()
    model64 = random_unet(cond_dim=D, null_cond=True, dtype=torch.float64)
    x64, kwargs64 = x.double(), {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
    assert torch.allclose(ClassifierFreeGuidance(model64, 1.0)(x64, t, **kwargs64), model64(x64, t, **kwargs64),
                          atol=1e-10, rtol=0)
    # A whole rollout at guidance 1 is the unguided rollout bit for bit.
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="3"))
    videos, conditions = rollout_videos(), Conditions(actions=index_actions(2, 10))
    plain = rollout(model, diffusion, scheme_for("autoreg", use_ddim=True), videos, conditions)
    at_one = rollout(model, diffusion, scheme_for("autoreg", use_ddim=True, guidance_scale=1.0), videos, conditions)
    assert torch.equal(plain, at_one)


def index_actions(B, T):
    """actions[b, t] = (t, b): each vector names its frame and video."""
    frames = torch.arange(T, dtype=torch.float32)[None, :].expand(B, T)
    videos = torch.arange(B, dtype=torch.float32)[:, None].expand(B, T)
    return torch.stack([frames, videos], dim=-1)


def rollout_videos(B=2, T=10):
    return torch.rand(B, T, C, H, H, generator=torch.Generator().manual_seed(1)) * 2 - 1


def scheme_for(name, use_ddim, T=10, **settings):
    return Scheme.from_preset(name, T=T, n_obs=2, max_frames=4, max_latent_frames=2, use_ddim=use_ddim,
                              timestep_respacing="3", **settings)


def rollout(model, diffusion, scheme, videos, conditions):
    generators = [video_generator(0, 0, b) for b in range(len(videos))]
    return sample_video(model, diffusion, videos, scheme.n_obs, scheme.make_plan(), scheme.stage, generators,
                        conditions=conditions)


# Every plan family x DDIM/DDPM x no, "generated" and "df" stabilization.
SCHEMES = [("autoreg", True, {}), ("autoreg", False, {}), ("hierarchy-2", True, {}),
           ("long-range", False, {"stabilization_level": 3}), ("df-pyramid", True, {}),
           ("stabilized-autoreg", False, {})]


@pytest.mark.parametrize("name, use_ddim, settings", SCHEMES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_each_slot_gets_the_vector_of_its_frame_and_guidance_reaches_every_call(name, use_ddim, settings):
    """Actions encode (frame index, video): every call, every slot, both halves of every guided call."""
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100, timestep_respacing="3"))
    model = StandIn()
    rollout(model, diffusion, scheme_for(name, use_ddim, guidance_scale=2.0, **settings), rollout_videos(),
            Conditions(actions=index_actions(2, 10)))
    assert model.calls
    for call in model.calls:
        B = call["x"].shape[0] // 2
        assert call["drop_cond"].tolist() == [False] * B + [True] * B
        assert torch.equal(call["cond"][..., 0], call["frame_indices"].float())
        assert torch.equal(call["cond"][..., 1], torch.tensor([0.0, 1.0]).repeat(2)[:, None].expand_as(call["cond"][..., 1]))
    # Frames are not consecutive in a hierarchy's stages: the check above is not vacuous there.
    if name == "hierarchy-2":
        assert any((call["frame_indices"].diff(dim=1).abs() > 1).any() for call in model.calls)


@pytest.mark.parametrize("name, use_ddim, settings", SCHEMES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_guided_rollouts_equal_rollouts_of_the_guided_output(name, use_ddim, settings):
    """Sampling with guidance w is sampling a model that outputs uncond + w (cond - uncond): same noise, same
    update, same stabilization, in every path."""
    w = 2.5
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100, timestep_respacing="3"))
    videos, conditions = rollout_videos(), Conditions(actions=index_actions(2, 10) / 10)
    stand_in = StandIn()

    def combined(x, t, **kwargs):
        drop = torch.ones(x.shape[0], dtype=torch.bool)
        cond, uncond = stand_in(x, t, **kwargs), stand_in(x, t, **kwargs, drop_cond=drop)
        return uncond + w * (cond - uncond)

    guided_samples = rollout(StandIn(), diffusion, scheme_for(name, use_ddim, guidance_scale=w, **settings), videos,
                             conditions)
    expected = rollout(combined, diffusion, scheme_for(name, use_ddim, **settings), videos, conditions)
    assert torch.allclose(guided_samples, expected, atol=1e-5, rtol=0)
    unguided = rollout(StandIn(), diffusion, scheme_for(name, use_ddim, **settings), videos, conditions)
    assert (unguided - guided_samples).abs().max() > 1e-3


@torch.no_grad()
def test_null_sampling_does_not_depend_on_the_actions():
    model = create_model(ModelConfig(image_size=H, num_channels=32, channel_mult="1,2", attention_resolutions="4",
                                     num_heads=2, cond_dim=D, cond_drop_prob=0.1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="2"))
    scheme, videos = scheme_for("autoreg", use_ddim=True, T=6), rollout_videos(T=6)
    a, b = index_actions(2, 6), torch.randn(2, 6, D)
    null_a = rollout(model, diffusion, scheme, videos, Conditions(actions=a, null=True))
    assert torch.equal(null_a, rollout(model, diffusion, scheme, videos, Conditions(actions=b, null=True)))
    assert (null_a - rollout(model, diffusion, scheme, videos, Conditions(actions=a))).abs().max() > 1e-4


@torch.no_grad()
def test_the_cache_stays_exact_with_conditions():
    """float64: cached calls equal full calls with per-frame vectors, labels and null flags, including after a
    prefix frame's vector changes; a guided stabilized rollout agrees and reuses frames."""
    model = random_unet(causal=True, dtype=torch.float64, cond_dim=D, num_classes=3, null_cond=True)
    x, t, kwargs = call_inputs()
    # Slots out of index order, so the cache must sort each frame's vector with the frame.
    order = torch.tensor([2, 0, 3, 1])
    x = x[:, order].double()
    kwargs = {k: (v[:, order].double() if v.is_floating_point() else v[:, order]) for k, v in kwargs.items()}
    kwargs.update(y=torch.tensor([0, 2]), drop_cond=torch.tensor([False, True]))
    cache = CausalCache(model)
    assert torch.allclose(cache(x, t, **kwargs), model(x, t, **kwargs), atol=1e-10, rtol=0)
    again = cache(x, t, **kwargs)
    assert cache.frames_computed < cache.frames_requested  # the prefix was reused
    assert torch.allclose(again, model(x, t, **kwargs), atol=1e-10, rtol=0)
    for change in ("cond", "y", "drop_cond"):
        changed = dict(kwargs)
        if change == "cond":
            changed["cond"] = kwargs["cond"].clone()
            changed["cond"][:, 0] += 1.0  # the first frame of each video: in every prefix
        elif change == "y":
            changed["y"] = torch.tensor([1, 2])
        else:
            changed["drop_cond"] = torch.tensor([False, False])
        cache(x, t, **kwargs)
        expected = model(x, t, **changed)
        assert (expected - model(x, t, **kwargs)).abs().max() > 1e-6, change
        assert torch.allclose(cache(x, t, **changed), expected, atol=1e-10, rtol=0), change

    torch.set_default_dtype(torch.float64)  # the sampler draws its noise in the default dtype
    try:
        diffusion = create_diffusion(DiffusionConfig(timestep_respacing="4"))
        videos = rollout_videos(T=8).double()
        conditions = Conditions(actions=index_actions(2, 8).double(), labels=torch.tensor([1, 0]))
        scheme = Scheme.from_preset("stabilized-autoreg", T=8, n_obs=2, max_frames=4, use_ddim=True,
                                    timestep_respacing="4", guidance_scale=2.0)
        cache = CausalCache(model)
        cached = rollout(cache, diffusion, scheme, videos, conditions)
        assert (cached - rollout(model, diffusion, scheme, videos, conditions)).abs().max() < 1e-9
        assert cache.frames_computed < 0.6 * cache.frames_requested
    finally:
        torch.set_default_dtype(torch.float32)


def test_training_previews_drive_the_rollout_with_the_given_actions():
    model = StandIn()
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100, timestep_respacing="2"))
    frames = preview_rollout(model, diffusion, rollout_videos(B=1)[0, :2], 8, 4, actions=index_actions(1, 8)[0])
    assert frames.shape == (8, C, H, H) and frames.dtype == torch.uint8
    assert model.calls and all(torch.equal(c["cond"][..., 0], c["frame_indices"].float()) for c in model.calls)


@torch.no_grad()
def test_guided_per_video_calls_equal_batched_calls():
    """--batch_invariant True with guidance: each video's [conditional; null] pair through its own cached calls
    (float64, where batch-size dependent kernels agree to rounding)."""
    model = random_unet(causal=True, dtype=torch.float64, cond_dim=D, null_cond=True)
    torch.set_default_dtype(torch.float64)  # the sampler draws its noise in the default dtype
    try:
        diffusion = create_diffusion(DiffusionConfig(timestep_respacing="2"))
        scheme = scheme_for("stabilized-autoreg", use_ddim=True, T=6, guidance_scale=2.0)
        videos, conditions = rollout_videos(T=6).double(), Conditions(actions=index_actions(2, 6).double())
        batched = rollout(prepare_model(model, "cpu"), diffusion, scheme, videos, conditions)
        per_video = rollout(prepare_model(model, "cpu", batch_invariant=True), diffusion, scheme, videos, conditions)
        assert (batched - per_video).abs().max() < 1e-9
        unguided = rollout(model, diffusion, scheme_for("stabilized-autoreg", use_ddim=True, T=6), videos, conditions)
        assert (batched - unguided).abs().max() > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)
