"""Diffusion Forcing's sampler (stabilization "df") against a slow re-implementation of DF's rollout.

`df_rollout` below follows DF's code step by step (algorithms/diffusion_forcing/df_video.py
`validation_step`, models/diffusion.py `sample_step` / `ddim_sample_step`), frames in time order,
one window per model call, written without the sampling package. A stand-in network with our call
signature (every output depends on every frame, its own timestep and the frame-index differences)
checks the matrices, context handling, windowing and the DDIM update independently of DF's network;
the fixture test at the end runs DF's network on DF's own rollout (../shared/reference).
"""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.checkpoints import load_checkpoint
from improved_diffusion.diffusion import DiffusionConfig, create_diffusion
from improved_diffusion.sampling import df_step
from improved_diffusion.sampling.plans import sampling_schemes
from improved_diffusion.sampling.request import sampler_defaults
from improved_diffusion.sampling.sampler import sample_stage, sample_video
from improved_diffusion.sampling.scheme import Scheme, StageSettings

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
B, T, C, H = 2, 10, 3, 8
N_CONTEXT, CHUNK, WINDOW, S, STAB = 2, 2, 6, 10, 15  # the fixture rollout's settings


class StandIn:
    """Our network call; the output mixes all frames (by index distance), their timesteps and pixels."""

    def __init__(self, scale=1.0):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(C, C, generator=g) * 0.4
        self.scale = scale

    def __call__(self, x, t, x0=None, frame_indices=None, obs_mask=None, latent_mask=None):
        shown = torch.where(obs_mask.bool(), x0, x)
        distance = (frame_indices[:, :, None] - frame_indices[:, None, :]).to(x.dtype).abs()
        mixed = torch.einsum("bij,bjchw->bichw", torch.softmax(-distance, dim=-1), shown)
        own = torch.einsum("dc,btchw->btdhw", self.w.to(x.dtype), shown)
        return self.scale * (own + 0.5 * mixed + 0.3 * torch.sin(t.to(x.dtype) / 150)[..., None, None, None])


def df_rollout(net, alphas_cumprod, xs, chunk_inits, objective, clip_noise):
    """DF's validation rollout with a pyramid matrix (u = 1) and DDIM eta 0, batch-first ([B x T x ...])."""
    N = len(alphas_cumprod)
    ab = torch.as_tensor(alphas_cumprod, dtype=xs.dtype)
    real = torch.linspace(-1, N - 1, S + 1).long()  # coarse level -> timestep; -1 is clean
    xs_pred = xs[:, :N_CONTEXT].clone()
    curr_frame = N_CONTEXT
    for init in chunk_inits:
        h = min(T - curr_frame, CHUNK)
        matrix = [[min(max(S + j - m, 0), S) for j in range(h)] for m in range(S + h)]
        xs_pred = torch.cat([xs_pred, init], dim=1)
        start = max(0, curr_frame + h - WINDOW)
        for m in range(len(matrix) - 1):
            curr = real[torch.tensor([0] * curr_frame + matrix[m])[start:]]
            nxt = real[torch.tensor([0] * curr_frame + matrix[m + 1])[start:]]
            x = xs_pred[:, start:]
            F = x.shape[1]
            t = torch.where(curr < 0, torch.full_like(curr, STAB - 1), curr)
            a = ab[t].view(1, F, 1, 1, 1)
            context = (curr < 0).view(1, F, 1, 1, 1)
            x_in = torch.where(context, a.sqrt() * x, x)
            mask = context.expand(B, F, 1, 1, 1).to(x.dtype)
            out = net(x_in, t.to(x.dtype).expand(B, F), x0=x_in, frame_indices=torch.arange(start, start + F).expand(B, F),
                      obs_mask=mask, latent_mask=1 - mask)
            if objective == "pred_noise":
                eps = out.clamp(-clip_noise, clip_noise)
                x0 = (x_in - (1 - a).sqrt() * eps) / a.sqrt()
            else:
                x0 = a.sqrt() * x_in - (1 - a).sqrt() * out if objective == "pred_v" else out
                eps = (x_in / a.sqrt() - x0) / (1 / a - 1).sqrt()
            a_next = torch.where(nxt < 0, torch.ones(()), ab[nxt.clamp(min=0)]).view(1, F, 1, 1, 1)
            x_pred = x0 * a_next.sqrt() + eps * (1 - a_next).sqrt()
            xs_pred[:, start:] = torch.where((curr == nxt).view(1, F, 1, 1, 1), x, x_pred)
        curr_frame += h
    return xs_pred


def diffusion_for(objective):
    return create_diffusion(DiffusionConfig(diffusion_steps=1000, noise_schedule="sigmoid",
                                            predict_v=objective == "pred_v", predict_xstart=objective == "pred_x0"))


def df_settings(**overrides):
    return StageSettings(**{**dict(scheduling_matrix="pyramid", sampling_steps=S, stabilization_level=STAB, use_ddim=True,
                                   clip_denoised=False, stabilization="df", clip_noise=6.0), **overrides})


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(B, T, C, H, H, generator=g, dtype=dtype) * 2 - 1
    inits = [torch.randn(B, CHUNK, C, H, H, generator=g, dtype=dtype).clamp(-6, 6)
             for _ in range((T - N_CONTEXT) // CHUNK)]
    return xs, inits


def ours(net, diffusion, xs, inits, settings):
    plan = sampling_schemes["sliding-window"](video_length=T, num_obs=N_CONTEXT, max_frames=WINDOW, step_size=CHUNK)
    return sample_video(net, diffusion, xs, N_CONTEXT, plan, settings, initial_noise=inits)


@pytest.mark.parametrize("objective, clip_noise, scale", [("pred_v", 6.0, 1.0), ("pred_x0", 6.0, 1.0),
                                                          ("pred_noise", 0.5, 3.0)])
def test_df_stabilization_equals_dfs_rollout(objective, clip_noise, scale):
    """Every frame of the 10-frame, 4-chunk, window-6 rollout matches DF's loop (float64 rounding only)."""
    diffusion, net = diffusion_for(objective), StandIn(scale)
    # float64 inputs, so the CPU's float32 kernels do not matter: what is left is our coefficient
    # tables, float32 as FDM's (`extract`), against DF's float64 ones, amplified ~300x per step by
    # unclipped x0 from a pred_noise output at t = 999 (measured: 7e-6 relative; 2e-7 for v and x0).
    xs, inits = inputs(dtype=torch.float64)
    expected = df_rollout(net, diffusion.alphas_cumprod, xs, inits, objective, clip_noise)
    scale = max(1.0, expected.abs().max().item())

    def relative_error(settings):
        return (ours(net, diffusion, xs, inits, settings) - expected).abs().max().item() / scale

    got = ours(net, diffusion, xs, inits, df_settings(clip_noise=clip_noise))
    assert got.dtype == torch.float64 and torch.equal(got[:, :N_CONTEXT], xs[:, :N_CONTEXT])
    assert (got - expected).abs().max().item() / scale < 3e-5
    # The checks can fail: ours, or an unclamped pred_noise output, gives another video.
    assert relative_error(df_settings(stabilization="generated")) > 1e-3
    if objective == "pred_noise":
        assert relative_error(df_settings(clip_noise=0.0)) > 1e-3


class Spy(StandIn):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append({"t": t.clone(), "x0": kwargs["x0"].clone(), "obs_mask": kwargs["obs_mask"].clone(),
                           "latent_mask": kwargs["latent_mask"].clone()})
        return super().__call__(x, t, **kwargs)


def test_df_shows_every_context_frame_scaled_without_noise_at_level_minus_one():
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=100, rescale_timesteps=False))
    xs, _ = inputs()
    spy = Spy()
    sample_stage(spy, diffusion, xs.clone(), [[0, 1]] * B, [[2, 3]] * B,
                 StageSettings(scheduling_matrix="autoregressive", sampling_steps=4, use_ddim=True, stabilization="df",
                               stabilization_level=5))
    scale = float(np.sqrt(diffusion.alphas_cumprod[4]))
    for call in spy.calls:  # given frames: timestep k - 1, sqrt(alpha_bar) * x, no noise
        assert (call["t"][:, :2] == 4).all() and (call["obs_mask"][:, :2] == 1).all()
        assert torch.allclose(call["x0"][:, :2], scale * xs[:, :2], atol=1e-6)
    late = [c for c in spy.calls if c["obs_mask"][0, 2] == 1]  # frame 2 finished, frame 3 still denoising
    assert len(late) == 4 and all((c["t"][:, 2] == 4).all() for c in late)


def test_df_ancestral_shows_context_with_fresh_clamped_noise():
    """DDPM path: context frames are q_sample'd at k - 1 with fresh noise, clamped to +-clip_noise, each call."""
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=40, rescale_timesteps=False))
    xs, _ = inputs()
    spy = Spy()
    torch.manual_seed(0)
    sample_stage(spy, diffusion, xs.clone(), [[0, 1]] * B, [[2, 3]] * B,
                 StageSettings(scheduling_matrix="autoregressive", use_ddim=False, stabilization="df",
                               stabilization_level=5, clip_noise=1.5, clip_denoised=False))
    ab = float(diffusion.alphas_cumprod[4])
    noises = [(c["x0"][:, :2] - np.sqrt(ab) * xs[:, :2]) / np.sqrt(1 - ab) for c in spy.calls]
    assert len(noises) == 80  # 40 levels for each of the 2 frames, one after the other
    for c in spy.calls:  # the network sees context as observed and everything else as latent
        assert torch.equal(c["latent_mask"], 1 - c["obs_mask"])
    drawn = torch.stack(noises)
    assert drawn.abs().max() <= 1.5 + 1e-4 and drawn.abs().max() > 1.4  # clamped, and the clamp is reached
    assert 0.75 < drawn.std() < 1.0  # a standard normal clamped at 1.5 has std 0.86
    assert not torch.allclose(noises[0], noises[1])  # fresh at every call


def test_df_ddim_with_eta_draws_step_noise():
    diffusion, net = diffusion_for("pred_v"), StandIn()
    xs, inits = inputs()

    def run(eta, seed):
        torch.manual_seed(seed)
        return ours(net, diffusion, xs, inits, df_settings(eta=eta))

    assert torch.equal(run(0.5, 0), run(0.5, 0))
    assert not torch.equal(run(0.5, 0), run(0.5, 1))  # the noise matters ...
    assert (run(0.5, 0) - run(0.0, 0)).abs().max() > 1e-2  # ... and eta reaches the update
    assert torch.equal(run(0.0, 0), run(0.0, 1))  # eta 0 is deterministic given the starting noise


@pytest.mark.parametrize("use_ddim", [True, False])
def test_df_clip_denoised_reaches_both_updates(use_ddim):
    """An x0 network whose outputs leave [-1, 1]: clipping changes the video, and DDIM's last step lands in [-1, 1]."""
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=20, noise_schedule="cosine", predict_xstart=True))
    net, (xs, inits) = StandIn(3.0), inputs()

    def run(clip):
        torch.manual_seed(0)
        settings = StageSettings(scheduling_matrix="pyramid", use_ddim=use_ddim, stabilization="df",
                                 stabilization_level=3, clip_denoised=clip, sampling_steps=10 if use_ddim else 0)
        return ours(net, diffusion, xs, inits, settings)

    clipped, unclipped = run(True), run(False)
    assert (clipped - unclipped).abs().max() > 1e-2
    assert unclipped.abs().max() > 1.5
    if use_ddim:
        assert clipped.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("use_ddim", [True, False])
def test_df_clip_noise_clamps_the_networks_noise_prediction(use_ddim):
    """With clip_noise c, a pred_noise network behaves as the same network with its output clamped to +-c."""
    diffusion = create_diffusion(DiffusionConfig(diffusion_steps=20, noise_schedule="cosine"))
    net, (xs, inits) = StandIn(3.0), inputs()

    def clamped(*args, **kwargs):
        return net(*args, **kwargs).clamp(-0.5, 0.5)

    def run(model, clip_noise):
        torch.manual_seed(0)
        settings = StageSettings(scheduling_matrix="pyramid", use_ddim=use_ddim, stabilization="df", stabilization_level=3,
                                 clip_denoised=False, clip_noise=clip_noise, sampling_steps=10 if use_ddim else 0)
        return ours(model, diffusion, xs, inits, settings)

    assert torch.allclose(run(net, 0.5), run(clamped, 0.5), atol=1e-5)
    assert (run(net, 0.5) - run(net, 0.0)).abs().max() > 1e-2


def test_df_callback_reports_each_row():
    diffusion, net = diffusion_for("pred_v"), StandIn()
    xs, inits = inputs()
    rows = []
    plan = sampling_schemes["sliding-window"](video_length=T, num_obs=N_CONTEXT, max_frames=WINDOW, step_size=CHUNK)
    sample_video(net, diffusion, xs, N_CONTEXT, plan, df_settings(), initial_noise=inits, callback=rows.append)
    assert all(set(r) == {"stage", "row", "previous", "x", "t_from", "t_to", "t_model", "pred_xstart"} for r in rows)
    rows_per_stage = S + CHUNK - 1  # a pyramid over CHUNK frames has S + CHUNK rows
    assert [(r["stage"], r["row"]) for r in rows] == [(s, m) for s in range(4) for m in range(rows_per_stage)]
    for r in rows:
        moving = (r["t_from"] != r["t_to"]) & (r["t_from"] >= 0)
        unchanged = (r["x"] == r["previous"]).flatten(2).all(dim=2)
        assert torch.equal(unchanged, ~moving)  # exactly the frames whose level changes are updated
        context = r["t_from"] < 0
        assert (r["t_model"][context] == STAB - 1).all() and torch.equal(r["t_model"][~context], r["t_from"][~context])
        assert r["pred_xstart"].shape == r["x"].shape


def test_df_ddim_step_closed_form_with_eta():
    """x_next = x0 sqrt(ab') + eps sqrt(1 - ab' - sigma^2) + sigma noise, computed in float64 by hand."""
    diffusion = diffusion_for("pred_v")
    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(1, 3, C, H, H, generator=g, dtype=torch.float64) for _ in range(3))
    t, t_next = torch.tensor([[500, 300, 99]]), torch.tensor([[400, 300, -1]])
    got, _ = df_step.ddim_step(diffusion, lambda *a, **k: v.float(), x.float(), t, t_next, {}, eta=0.7,
                               clip_noise=1.5, noise=noise.float())
    for f in (0, 2):
        ab = diffusion.alphas_cumprod[t[0, f]]
        ab_next = 1.0 if t_next[0, f] < 0 else diffusion.alphas_cumprod[t_next[0, f]]
        x0 = np.sqrt(ab) * x[0, f] - np.sqrt(1 - ab) * v[0, f]
        eps = (x[0, f] / np.sqrt(ab) - x0) / np.sqrt(1 / ab - 1)
        sigma = 0.0 if t_next[0, f] < 0 else 0.7 * np.sqrt((1 - ab / ab_next) * (1 - ab_next) / (1 - ab))
        expected = x0 * np.sqrt(ab_next) + eps * np.sqrt(1 - ab_next - sigma**2) + sigma * noise[0, f].clamp(-1.5, 1.5)
        assert (got[0, f].double() - expected).abs().max() < 1e-5


def test_initial_noise_is_each_stages_starting_noise():
    """With zero steps of change possible, nothing but the given noise can explain the result."""
    diffusion, net = diffusion_for("pred_v"), StandIn()
    xs, inits = inputs()
    a = ours(net, diffusion, xs, inits, df_settings())
    b = ours(net, diffusion, xs, [i.clone() for i in inits], df_settings())
    other = ours(net, diffusion, xs, [i.flip(0) for i in inits], df_settings())
    assert torch.equal(a, b) and not torch.equal(a[0], other[0])
    with pytest.raises(ValueError, match="initial_noise"):
        ours(net, diffusion, xs, inits[:2], df_settings())


# ---------- DF's network on DF's rollout


def test_dfs_fixture_rollout():
    """DF's own rollout of its fixture network (df_small32_rollout_ref.pt) is reproduced within 1e-4."""
    if not (REFERENCE / "df_small32_rollout_ref.pt").is_file():
        pytest.skip("../shared/reference is absent")
    if "df_config" not in inspect.signature(load_checkpoint).parameters:
        pytest.skip("load_checkpoint does not read Diffusion Forcing checkpoints")
    ref = torch.load(REFERENCE / "df_small32_rollout_ref.pt", weights_only=False)
    model, diffusion, config = load_checkpoint(str(REFERENCE / "df_small32.ckpt"),
                                               df_config=str(REFERENCE / "df_small32_config.json"))
    assert np.abs(diffusion.alphas_cumprod - ref["alphas_cumprod"].double().numpy()).max() < 1e-6
    scheme = Scheme.from_preset("df-pyramid", T=10, n_obs=2, max_frames=6, max_latent_frames=2,
                                **sampler_defaults(config))
    assert scheme.stage == StageSettings(scheduling_matrix="pyramid", sampling_steps=10, stabilization_level=15,
                                         use_ddim=True, eta=0.0, clip_denoised=False, stabilization="df",
                                         clip_noise=6.0)
    videos = ref["xs"].transpose(0, 1).contiguous()  # DF's frames-first -> ours
    inits = [c.transpose(0, 1).contiguous() for c in ref["chunk_inits"]]
    out = sample_video(model, diffusion, videos, 2, scheme.make_plan(), scheme.stage, initial_noise=inits)
    diff = (out - ref["xs_pred"].transpose(0, 1)).abs().max().item()
    print(f"max |ours - DF| over the fixture rollout: {diff:.2e}")
    assert diff < 1e-4
