"""SNR loss weights and clamped training noise, against Diffusion Forcing's numbers and slow scalar loops.

The fixture ../shared/reference/df_small32_rollout_ref.pt holds DF's `compute_loss_weights`
of `loss_levels` [frames x videos] (pred_v, fused SNR, snr_clip 5, decay 0.96, sigmoid betas)
and DF's float32 `alphas_cumprod`.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from . import gaussian_diffusion as gd
from .build import DiffusionConfig, create_diffusion

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
ROLLOUT = REFERENCE / "df_small32_rollout_ref.pt"
MEAN_TYPES = {"eps": gd.ModelMeanType.EPSILON, "x0": gd.ModelMeanType.START_X, "v": gd.ModelMeanType.VELOCITY}


def diffusion(objective="v", weighting="fused_snr", snr_clip=5.0, decay=0.96, clip_noise=0.0, steps=1000):
    cfg = DiffusionConfig(diffusion_steps=steps, noise_schedule="sigmoid", predict_v=objective == "v",
                          predict_xstart=objective == "x0", loss_weighting=weighting, snr_clip=snr_clip,
                          cum_snr_decay=decay, clip_noise=clip_noise)
    return create_diffusion(cfg)


def scalar_snr(betas, t):
    """abar_t / (1 - abar_t) from a product over the betas, in Python floats."""
    abar = 1.0
    for b in betas[: t + 1]:
        abar *= 1.0 - float(b)
    return abar / (1.0 - abar)


def min_snr_by_hand(snr, objective, clip):
    s = min(snr, clip)
    return {"eps": s / snr, "x0": s, "v": s / (snr + 1)}[objective]


def fused_by_hand(snrs, objective, clip, decay, known=None, in_sequence=None):
    """One example's fused-SNR weights, written as the plain recursion over its frames.

    snrs: per-frame SNR; known[k]: frame k is clean (counts as fully known, weight 0);
    in_sequence[k]: frame k feeds and reads the running value (else its weight is min-SNR).
    """
    n = len(snrs)
    known = known or [False] * n
    in_sequence = in_sequence or [True] * n
    weights, running, started = [], 0.0, False
    for k in range(n):
        snr = clip if known[k] else snrs[k]
        s = min(snr, clip) / clip
        context = running if in_sequence[k] else 0.0
        if in_sequence[k]:
            running = decay * running + (1 - decay) * s if started else s
            started = True
        fused_clipped = 1 - (1 - decay * context) * (1 - s)
        fused = 1 - (1 - decay * context) * (1 - snr / clip)
        w = {"eps": fused_clipped / fused, "x0": fused_clipped * clip,
             "v": fused_clipped * clip / (fused * clip + 1)}[objective]
        weights.append(0.0 if known[k] else w)
    return weights


# ----------------------------------------------------------------------------- DF's numbers


@pytest.mark.skipif(not ROLLOUT.exists(), reason="needs ../shared/reference")
def test_sigmoid_schedule_is_dfs():
    ref = torch.load(ROLLOUT, weights_only=True)["alphas_cumprod"].double().numpy()
    ours = diffusion().alphas_cumprod
    assert np.abs(ours - ref).max() < 1e-7  # DF stores float32: its rounding, nothing more


@pytest.mark.skipif(not ROLLOUT.exists(), reason="needs ../shared/reference")
def test_fused_snr_weights_are_dfs():
    ref = torch.load(ROLLOUT, weights_only=True)
    levels, expected = ref["loss_levels"], ref["loss_weights"]  # [frames x videos]: DF's layout
    t = levels.T.contiguous()  # ours: [videos x frames]
    weights = diffusion().loss_frame_weights(t, t.shape[1])
    assert (weights.T - expected).abs().max() < 1e-6
    # The slow loop agrees with DF too, so both are tested against an independent source.
    betas = gd.get_named_beta_schedule("sigmoid", 1000)
    for b in range(t.shape[0]):
        by_hand = fused_by_hand([scalar_snr(betas, int(i)) for i in t[b]], "v", 5.0, 0.96)
        np.testing.assert_allclose(by_hand, expected[:, b].numpy(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weights_are_the_closed_forms(objective):
    d = diffusion(objective, "min_snr", snr_clip=3.0)
    t = torch.tensor([[0, 10, 200, 499], [500, 700, 900, 999]])
    weights = d.loss_frame_weights(t, 4)
    betas = gd.get_named_beta_schedule("sigmoid", 1000)
    for b in range(2):
        for k in range(4):
            expected = min_snr_by_hand(scalar_snr(betas, int(t[b, k])), objective, 3.0)
            assert weights[b, k].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # Per-video timesteps: the same weight on every frame.
    per_video = d.loss_frame_weights(torch.tensor([200, 900]), 3)
    assert per_video.shape == (2, 3) and torch.equal(per_video[:, 0:1].expand(2, 3), per_video)
    torch.testing.assert_close(per_video[:, 0], weights[:, 2])


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_fused_snr_weights_are_the_running_recursion(objective):
    d = diffusion(objective, "fused_snr", snr_clip=4.0, decay=0.8)
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.integers(0, 1000, size=(3, 7)))
    known = torch.from_numpy(rng.random((3, 7)) < 0.3)
    in_sequence = torch.from_numpy(rng.random((3, 7)) < 0.8) | known
    betas = gd.get_named_beta_schedule("sigmoid", 1000)
    for masks in ((None, None), (known, in_sequence)):
        weights = d.loss_frame_weights(t, 7, *masks)
        for b in range(3):
            kw = {} if masks[0] is None else {"known": masks[0][b].tolist(), "in_sequence": masks[1][b].tolist()}
            expected = fused_by_hand([scalar_snr(betas, int(i)) for i in t[b]], objective, 4.0, 0.8, **kw)
            np.testing.assert_allclose(weights[b].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_fused_snr_without_context_is_min_snr_and_context_raises_the_weight():
    fused, plain = diffusion("v", "fused_snr"), diffusion("v", "min_snr")
    t = torch.tensor([[600, 600]])
    w_fused, w_plain = fused.loss_frame_weights(t, 2), plain.loss_frame_weights(t, 2)
    assert w_fused[0, 0].item() == pytest.approx(w_plain[0, 0].item(), rel=1e-6)  # first frame: no context
    # A clean frame before it: the running SNR is high, so the frame counts as better known.
    known = torch.tensor([[True, False]])
    w_known = fused.loss_frame_weights(t, 2, known=known)
    assert w_known[0, 0] == 0 and w_known[0, 1] > w_fused[0, 1]
    # Left out of the sequence (a padding frame), a frame gets the min-SNR weight.
    alone = fused.loss_frame_weights(t, 2, in_sequence=torch.tensor([[True, False]]))
    assert alone[0, 1].item() == pytest.approx(w_plain[0, 1].item(), rel=1e-6)


def test_no_weighting_gives_none():
    assert diffusion("v", "none").loss_frame_weights(torch.tensor([3]), 2) is None


# ----------------------------------------------------------------------------- the training loss


def zero_model(x, t, **kwargs):
    return torch.zeros_like(x)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_frame_weights_multiply_each_frames_squared_error(objective):
    d = diffusion(objective, "min_snr", steps=100)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([[5, 50, 99], [0, 20, 70]])
    weights = torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.0, 1.0]])
    latent = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]).view(2, 3, 1, 1, 1)
    terms = d.training_losses(zero_model, x, t, noise=noise, latent_mask=latent, per_frame_terms=True,
                              frame_weights=weights)
    abar = torch.from_numpy(np.cumprod(1 - d.betas))[t].float().view(2, 3, 1, 1, 1)
    target = {"eps": noise, "x0": x, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x}[objective]
    per_frame = (target ** 2).mean(dim=(2, 3, 4)) * latent.view(2, 3)
    torch.testing.assert_close(terms["mse"], per_frame)
    torch.testing.assert_close(terms["loss"], per_frame * weights)


def test_training_noise_is_clamped_to_clip_noise():
    x = torch.zeros(1, 2, 1, 2, 2)
    noise = torch.tensor([-9.0, -2.0, 0.5, 3.0, 7.0, 1.0, -1.5, 2.5]).view(x.shape)
    for clip, expected in ((0.0, noise), (2.0, noise.clamp(-2, 2))):
        d = diffusion("eps", "none", clip_noise=clip, steps=100)
        terms = d.training_losses(zero_model, x, torch.tensor([10]), noise=noise)
        # eps prediction of a zero model: the loss is the mean square of the noise it was trained on.
        assert terms["loss"].item() == pytest.approx((expected ** 2).mean().item(), rel=1e-6)
    assert math.isclose(diffusion("eps", "none", clip_noise=6.0).training_noise(torch.tensor([8.0])).item(), 6.0)


def test_learned_sigma_weights_only_the_mse_term():
    cfg = DiffusionConfig(diffusion_steps=100, learn_sigma=True, loss_weighting="min_snr")
    d = create_diffusion(cfg)
    x = torch.rand(1, 2, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def model(x_t, t, **kwargs):
        return torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, 0.3)], dim=2)

    kwargs = dict(noise=torch.ones_like(x), per_frame_terms=True)
    plain = d.training_losses(model, x, torch.tensor([40]), **kwargs)
    weighted = d.training_losses(model, x, torch.tensor([40]), frame_weights=torch.tensor([[2.0, 0.0]]), **kwargs)
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    torch.testing.assert_close(weighted["loss"], plain["mse"] * torch.tensor([[2.0, 0.0]]) + plain["vb"])
