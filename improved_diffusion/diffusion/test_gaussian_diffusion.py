"""Diffusion maths against closed forms computed independently in float64."""

import math

import numpy as np
import pytest
import torch

from . import gaussian_diffusion as gd
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .respace import SpacedDiffusion, space_timesteps


def make_diffusion(schedule="linear", steps=100, mean=gd.ModelMeanType.EPSILON, var=gd.ModelVarType.FIXED_LARGE,
                   loss=gd.LossType.MSE, respacing=None):
    betas = gd.get_named_beta_schedule(schedule, steps)
    kwargs = dict(betas=betas, model_mean_type=mean, model_var_type=var, loss_type=loss)
    if respacing is None:
        return gd.GaussianDiffusion(**kwargs)
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, respacing), **kwargs)


def abar(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return np.array(out)


# ----------------------------------------------------------------------------- schedules

def test_linear_schedule_endpoints():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(betas) > 0)


def test_cosine_schedule_matches_its_alpha_bar():
    n, s = 1000, 0.008
    betas = gd.get_named_beta_schedule("cosine", n)
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t) / f(0) for t in range(1, n + 1)])
    got = abar(betas)
    # Equal until the 0.999 clip bites at the very end.
    np.testing.assert_allclose(got[:990], expected[:990], rtol=1e-10)
    assert betas.max() <= 0.999


def test_sigmoid_schedule_is_a_valid_decreasing_alpha_bar():
    betas = gd.get_named_beta_schedule("sigmoid", 1000)
    a = abar(betas)
    assert np.all(np.diff(a) < 0) and 0 < a[-1] < 1e-3 and a[0] > 0.999
    # Chen (2023): abar(t) = (sig(3) - sig(6t - 3)) / (sig(3) - sig(-3)), normalised by abar(0) = 1.
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    t = 0.5
    expected = (sig(3) - sig(6 * t - 3)) / (sig(3) - sig(-3))
    assert a[499] == pytest.approx(expected, rel=1e-9)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="linear, cosine or sigmoid"):
        gd.get_named_beta_schedule("quadratic", 10)


# ----------------------------------------------------------------------------- forward process

def test_q_sample_is_the_closed_form_and_keeps_observed_frames():
    d = make_diffusion()
    a = abar(d.betas)
    x0 = torch.randn(2, 3, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([[5, 50, 99], [0, 7, 7]])
    latent = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.float32).view(2, 3, 1, 1, 1)
    out = d.q_sample(x0, t, noise, latent_mask=latent)
    for b in range(2):
        for f in range(3):
            if latent[b, f]:
                ab = a[t[b, f]]
                expected = math.sqrt(ab) * x0[b, f].double() + math.sqrt(1 - ab) * noise[b, f].double()
                torch.testing.assert_close(out[b, f].double(), expected, atol=1e-6, rtol=0)
            else:
                assert torch.equal(out[b, f], x0[b, f])


def test_q_sample_moments():
    d = make_diffusion()
    a = abar(d.betas)[30]
    x0 = torch.full((20000, 1, 1, 1, 1), 0.7)
    xt = d.q_sample(x0, torch.full((20000,), 30), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - a, abs=0.02)


def test_per_frame_timesteps_equal_batch_timesteps_when_constant():
    d = make_diffusion()
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    t = torch.tensor([3, 60])
    assert torch.equal(d.q_sample(x0, t, noise), d.q_sample(x0, t[:, None].expand(2, 4), noise))


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the product of the two Gaussians, derived here independently."""
    d = make_diffusion("cosine")
    betas = d.betas
    a = abar(betas)
    x0 = torch.randn(1, 1, 1, 2, 2, dtype=torch.float64)
    xt = torch.randn(1, 1, 1, 2, 2, dtype=torch.float64)
    for t in (1, 10, 99):
        prior_mean, prior_var = math.sqrt(a[t - 1]) * x0, 1 - a[t - 1]
        alpha = 1 - betas[t]
        precision = 1 / prior_var + alpha / betas[t]
        var = 1 / precision
        mean = var * (prior_mean / prior_var + math.sqrt(alpha) * xt / betas[t])
        got_mean, got_var, got_log_var = d.q_posterior_mean_variance(x0.float(), xt.float(), torch.tensor([t]))
        torch.testing.assert_close(got_mean.double(), mean, atol=1e-5, rtol=0)
        assert got_var.item() == pytest.approx(var, rel=1e-6)
        assert got_log_var.item() == pytest.approx(math.log(var), rel=1e-6)


def test_parameterizations_invert_each_other():
    d = make_diffusion()
    x0, noise = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 3, 3, 4, 4)
    t = torch.tensor([[1, 40, 90], [20, 20, 20]])
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, noise), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(d.predict_xstart_from_v(xt, t, d.velocity(x0, t, noise)), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), noise, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- VLB pieces

def test_normal_kl_closed_form():
    m1, s1, m2, s2 = 0.3, 0.5, -0.2, 1.7
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(torch.tensor(m1), torch.tensor(2 * math.log(s1)), torch.tensor(m2), torch.tensor(2 * math.log(s2)))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_discretized_likelihood_matches_exact_normal_cdf():
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    mean, sigma = 0.1, 0.05
    for x in (0.0, 0.1, 0.2):
        exact = math.log(cdf((x + 1 / 255 - mean) / sigma) - cdf((x - 1 / 255 - mean) / sigma))
        got = discretized_gaussian_log_likelihood(torch.tensor([x]), torch.tensor([mean]),
                                                  torch.tensor([math.log(sigma)])).item()
        assert got == pytest.approx(exact, abs=1e-2)  # tanh CDF approximation; a wrong bin width is off by ~0.7
    # The edge bins reach to infinity.
    mean = -0.97
    exact_edge = math.log(cdf((-1 + 1 / 255 - mean) / sigma))
    got = discretized_gaussian_log_likelihood(torch.tensor([-1.0]), torch.tensor([mean]),
                                              torch.tensor([math.log(sigma)])).item()
    assert got == pytest.approx(exact_edge, abs=1e-2)


def test_learned_range_variance_interpolates_logs():
    d = make_diffusion(var=gd.ModelVarType.LEARNED_RANGE, loss=gd.LossType.RESCALED_MSE)
    x = torch.randn(1, 2, 3, 2, 2)
    v = torch.tensor([-1.0, 0.5]).view(1, 2, 1, 1, 1).expand(1, 2, 3, 2, 2)
    out_tensor = torch.cat([torch.zeros_like(x), v], dim=2)
    t = torch.tensor([10])
    out = d.p_mean_variance(lambda *a, **k: out_tensor, x, t, clip_denoised=False)
    post = d.betas[10] * (1 - abar(d.betas)[9]) / (1 - abar(d.betas)[10])
    for f, value in enumerate((-1.0, 0.5)):
        frac = (value + 1) / 2
        expected = frac * math.log(d.betas[10]) + (1 - frac) * math.log(post)
        assert out["log_variance"][0, f].flatten()[0].item() == pytest.approx(expected, rel=1e-5)


def test_hybrid_loss_adds_vlb_with_lambda_one_thousandth():
    d = make_diffusion(steps=1000, var=gd.ModelVarType.LEARNED_RANGE, loss=gd.LossType.RESCALED_MSE)
    x0 = torch.rand(2, 3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    pred = torch.randn(2, 3, 6, 4, 4)
    t = torch.tensor([0, 500])
    terms = d.training_losses(lambda *a, **k: pred, x0, t, noise=noise)
    eps_part = pred[:, :, :3]
    torch.testing.assert_close(terms["mse"], ((eps_part - noise) ** 2).mean(dim=(1, 2, 3, 4)))
    xt = d.q_sample(x0, t, noise)
    vb = d.vb_terms_bpd(None, x0, xt, t, clip_denoised=False, model_output=pred)["output"]
    torch.testing.assert_close(terms["loss"], terms["mse"] + vb * 1000 / 1000.0)


# ----------------------------------------------------------------------------- masks and sampling

def test_loss_counts_only_latent_frames():
    d = make_diffusion()
    x0 = torch.randn(1, 4, 3, 4, 4)
    latent = torch.tensor([0, 1, 1, 0.0]).view(1, 4, 1, 1, 1)
    noise = torch.randn_like(x0)
    base = torch.randn(1, 4, 3, 4, 4)
    changed = base.clone()
    changed[:, 0] += 10  # wrong prediction on an observed frame
    kwargs = {"latent_mask": latent}
    l1 = d.training_losses(lambda *a, **k: base, x0, torch.tensor([5]), kwargs, noise=noise)["loss"]
    l2 = d.training_losses(lambda *a, **k: changed, x0, torch.tensor([5]), kwargs, noise=noise)["loss"]
    assert torch.equal(l1, l2)
    expected = ((base - noise) ** 2)[:, 1:3].mean()
    assert l1.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_observed_frames_pass_through_sampling_unchanged(loop):
    d = make_diffusion(respacing="5")
    x0 = torch.rand(2, 4, 3, 4, 4) * 2 - 1
    latent = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1.0]]).view(2, 4, 1, 1, 1)
    kwargs = {"x0": x0, "latent_mask": latent}
    out = getattr(d, loop)(lambda x, t, **k: torch.randn_like(x), x0.shape, model_kwargs=kwargs)
    keep = ~latent.bool().expand_as(x0)
    assert torch.equal(out[keep], x0[keep])
    assert not torch.equal(out[~keep], x0[~keep])


def test_ddim_with_an_x0_model_lands_on_its_prediction():
    d = make_diffusion(mean=gd.ModelMeanType.START_X, respacing="ddim10")
    target = torch.full((1, 2, 3, 4, 4), 0.25)
    out = d.ddim_sample_loop(lambda x, t, **k: target, target.shape, eta=0.0)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_ddim_eta_one_matches_ancestral_variance():
    """DDIM with eta = 1 has sigma^2 = the posterior variance (Song et al., eq. 16)."""
    d = make_diffusion(var=gd.ModelVarType.FIXED_SMALL)
    t = 40
    a = abar(d.betas)
    sigma2 = (1 - a[t - 1]) / (1 - a[t]) * (1 - a[t] / a[t - 1])
    assert sigma2 == pytest.approx(d.posterior_variance[t], rel=1e-9)


# ----------------------------------------------------------------------------- respacing

def test_space_timesteps_spellings():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "250") == set(round(i * 999 / 249) for i in range(250))
    expected = set()
    for section in range(3):
        expected |= {section * 100 + round(i * 99 / 9) for i in range(10)}
    assert space_timesteps(300, "10,10,10") == expected
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim11")  # strides 9 and 10 give 12 and 10 steps; none gives 11
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_chain_keeps_alpha_bar_at_kept_steps():
    base = make_diffusion(steps=1000)
    spaced = make_diffusion(steps=1000, respacing="ddim50")
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_respacing_that_keeps_all_steps_changes_nothing():
    base = make_diffusion(steps=50)
    spaced = make_diffusion(steps=50, respacing="50")
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-12, atol=1e-15)
    assert spaced.timestep_map == list(range(50))


def test_respaced_model_sees_original_timesteps():
    seen = []
    d = make_diffusion(steps=1000, respacing="ddim10")
    d.ddim_sample_loop(lambda x, t, **k: (seen.append(t.clone()), torch.zeros_like(x))[1], (1, 1, 3, 2, 2))
    assert [int(t[0]) for t in seen] == list(range(900, -1, -100))
