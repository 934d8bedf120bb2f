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


# ----------------------------------------------------------------------------- a slow reference, frame by frame

EPS, X0, V = gd.ModelMeanType.EPSILON, gd.ModelMeanType.START_X, gd.ModelMeanType.VELOCITY
SMALL, LARGE, LEARNED = gd.ModelVarType.FIXED_SMALL, gd.ModelVarType.FIXED_LARGE, gd.ModelVarType.LEARNED_RANGE
LOG2 = math.log(2.0)


class Chain:
    """A chain's quantities from its betas, written from the DDPM / improved-DDPM papers in float64.

    Works elementwise on numpy arrays (one frame at a time) and on Python floats.
    """

    def __init__(self, betas):
        self.betas = [float(b) for b in betas]
        self.abar = list(abar(self.betas))

    def a(self, t):  # abar_t, with abar_{-1} = 1 (clean)
        return 1.0 if t < 0 else self.abar[t]

    def post_var(self, t):  # beta~_t (DDPM eq. 7)
        return self.betas[t] * (1 - self.a(t - 1)) / (1 - self.a(t))

    def post_mean(self, x0, xt, t):  # mu~_t (DDPM eq. 7)
        b = self.betas[t]
        return (math.sqrt(self.a(t - 1)) * b * x0 + math.sqrt(1 - b) * (1 - self.a(t - 1)) * xt) / (1 - self.a(t))

    def x0_from(self, mean_type, out, xt, t):
        a = self.a(t)
        if mean_type == EPS:  # x_t = sqrt(a) x0 + sqrt(1 - a) eps
            return (xt - math.sqrt(1 - a) * out) / math.sqrt(a)
        if mean_type == V:  # v = sqrt(a) eps - sqrt(1 - a) x0
            return math.sqrt(a) * xt - math.sqrt(1 - a) * out
        return out

    def log_var(self, var_type, t, v=None):
        clipped = math.log(self.post_var(max(t, 1)))  # beta~_0 = 0: its log is taken as beta~_1's
        if var_type == SMALL:
            return clipped
        if var_type == LARGE:
            return math.log(self.betas[t]) if t > 0 else clipped
        frac = (v + 1) / 2  # improved DDPM eq. 15
        return frac * math.log(self.betas[t]) + (1 - frac) * clipped


def reference_p(chain, mean_type, var_type, output, x, t, clip=True, denoised_fn=None):
    """p(x_{t-1} | x_t) frame by frame: mean, log variance, x0 prediction as float64 arrays."""
    output, x = output.double().numpy(), x.double().numpy()
    t = t[:, None].expand(x.shape[:2]) if t.dim() == 1 else t
    C = x.shape[2]
    mean, log_var, x0hat = np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)
    for b in range(x.shape[0]):
        for f in range(x.shape[1]):
            tt = int(t[b, f])
            out = output[b, f, :C]
            pred = chain.x0_from(mean_type, out, x[b, f], tt)
            if denoised_fn is not None:
                pred = denoised_fn(torch.from_numpy(pred)).numpy()
            if clip:
                pred = np.clip(pred, -1, 1)
            x0hat[b, f] = pred
            mean[b, f] = chain.post_mean(pred, x[b, f], tt)
            v = output[b, f, C:] if var_type == LEARNED else None
            log_var[b, f] = chain.log_var(var_type, tt, v)
    return {"mean": mean, "log_variance": log_var, "pred_xstart": x0hat}


def tanh_normal_cdf(z):
    """Page's (1977) tanh approximation of the standard normal CDF, as improved DDPM's likelihood uses it."""
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def reference_vb_bits(chain, x0, xt, t, mean, log_var):
    """One frame's VLB term per element, in bits: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, the decoder NLL at t = 0."""
    if t > 0:
        m1, v1 = chain.post_mean(x0, xt, t), chain.post_var(t)
        m2, v2 = mean, np.exp(log_var)
        kl = 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
        return kl / LOG2
    sigma = np.exp(0.5 * log_var)
    upper = tanh_normal_cdf((x0 + 1 / 255 - mean) / sigma)
    lower = tanh_normal_cdf((x0 - 1 / 255 - mean) / sigma)
    prob = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1 - lower, upper - lower))
    return -np.log(prob) / LOG2


def quantised_images(shape, generator):
    """Images on the 256-level grid of [-1, 1], with both edge values present."""
    x = torch.randint(0, 256, shape, generator=generator).double() / 127.5 - 1
    x.view(-1)[0], x.view(-1)[1] = -1.0, 1.0
    return x.float()


# ----------------------------------------------------------------------------- schedules and constants

def test_linear_schedule_is_rescaled_to_the_step_count():
    betas = gd.get_named_beta_schedule("linear", 250)
    np.testing.assert_allclose(betas, np.linspace(4e-4, 0.08, 250), rtol=1e-12)


def test_cosine_and_sigmoid_schedules_clip_the_last_beta():
    # abar(1) = 0 for both, so the last beta would be 1; it is clipped to 0.999.
    assert gd.get_named_beta_schedule("cosine", 50)[-1] == 0.999
    sigmoid = gd.get_named_beta_schedule("sigmoid", 50)
    assert sigmoid[-1] == 0.999 and (sigmoid[:-1] < 0.999).all() and (sigmoid > 0).all()


def test_sigmoid_schedule_is_chens_alpha_bar_at_every_step():
    n = 40
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    f = lambda s: (sig(3) - sig(6 * s - 3)) / (sig(3) - sig(-3))  # noqa: E731
    got = abar(gd.get_named_beta_schedule("sigmoid", n))
    expected = [f(t / n) / f(0) for t in range(1, n + 1)]
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=1e-10)


def test_betas_for_alpha_bar_clips_at_max_beta():
    alpha_bar = lambda s: 1 - s  # noqa: E731  (betas 1 / (n - i), the last one 1)
    betas = gd.betas_for_alpha_bar(4, alpha_bar, max_beta=0.4)
    np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.4, 0.4], rtol=1e-12)
    assert gd.betas_for_alpha_bar(4, alpha_bar)[-1] == 0.999


def test_betas_must_lie_in_zero_one():
    kwargs = dict(model_mean_type=EPS, model_var_type=SMALL, loss_type=gd.LossType.MSE)
    for bad in ([0.1, 0.0, 0.2], [0.1, 1.5], [[0.1, 0.2]]):
        with pytest.raises(AssertionError):
            gd.GaussianDiffusion(betas=bad, **kwargs)
    with np.errstate(divide="ignore"):
        d = gd.GaussianDiffusion(betas=[0.1, 0.5, 1.0], **kwargs)  # beta = 1 (zero terminal SNR) is allowed
    assert d.num_timesteps == 3 and d.alphas_cumprod[-1] == 0


def test_chain_constants_are_the_closed_forms():
    d = make_diffusion("cosine", steps=30)
    chain = Chain(d.betas)
    np.testing.assert_allclose(d.alphas_cumprod, chain.abar, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, [1.0] + chain.abar[:-1], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_next, chain.abar[1:] + [0.0], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_variance, [chain.post_var(t) for t in range(30)], rtol=1e-10)
    expected_log = [math.log(chain.post_var(max(t, 1))) for t in range(30)]
    np.testing.assert_allclose(d.posterior_log_variance_clipped, expected_log, rtol=1e-10)


# ----------------------------------------------------------------------------- helpers

def test_extract_broadcasts_per_video_and_per_frame_and_clamps_negative_steps():
    arr = np.array([10.0, 11.0, 12.0, 13.0])
    per_video = gd.extract(arr, torch.tensor([2, 0]), (2, 3, 1, 4, 4))
    assert per_video.shape == (2, 1, 1, 1, 1) and per_video.dtype == torch.float32
    assert per_video.flatten().tolist() == [12.0, 10.0]
    per_frame = gd.extract(arr, torch.tensor([[3, -1, 1]]), (1, 3, 1, 4, 4))
    assert per_frame.shape == (1, 3, 1, 1, 1) and per_frame.flatten().tolist() == [13.0, 10.0, 11.0]


def test_means_over_latent_frames():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2, 1, 1)  # frame (b, f) holds 6b + 2f, 6b + 2f + 1
    mask = torch.tensor([[1, 0, 1], [0, 0, 0.0]]).view(2, 3, 1, 1, 1)
    assert gd.mean_over_latent(x, None).tolist() == [2.5, 8.5]
    # Element 0: frames 0 and 2 (values 0, 1, 4, 5); element 1 has no latent frame: 0, not NaN.
    assert gd.mean_over_latent(x, mask).tolist() == [2.5, 0.0]
    assert gd.frame_means_over_latent(x, None).tolist() == [[0.5, 2.5, 4.5], [6.5, 8.5, 10.5]]
    assert gd.frame_means_over_latent(x, mask).tolist() == [[0.5, 0.0, 4.5], [0.0, 0.0, 0.0]]
    single = torch.tensor([3.0, 5.0]).view(1, 2, 1, 1, 1)
    assert gd.mean_over_latent(single, torch.tensor([0, 1.0]).view(1, 2, 1, 1, 1)).tolist() == [5.0]


def test_latent_mask_from_prefers_the_argument_then_model_kwargs():
    x = torch.zeros(2, 3, 1, 2, 2, dtype=torch.float64)
    explicit = torch.tensor([[True, False, True], [False, True, True]]).view(2, 3, 1, 1, 1)
    in_kwargs = torch.zeros(2, 3, 1, 1, 1)
    got = gd.latent_mask_from({"latent_mask": in_kwargs}, explicit, x)
    assert got.dtype == torch.float64 and torch.equal(got, explicit.double())
    assert torch.equal(gd.latent_mask_from({"latent_mask": in_kwargs}, None, x), in_kwargs.double())
    for kwargs in (None, {}, {"other": 1}):
        ones = gd.latent_mask_from(kwargs, None, x)
        assert ones.shape == (2, 3, 1, 1, 1) and ones.dtype == torch.float64 and bool((ones == 1).all())


def test_model_output_tensor_takes_the_first_of_a_tuple():
    a, b = torch.zeros(1), torch.ones(1)
    assert gd.model_output_tensor((a, b)) is a and gd.model_output_tensor([b, a]) is b
    assert gd.model_output_tensor(a) is a


def test_the_model_sees_timesteps_in_units_of_a_thousand_steps_and_its_kwargs():
    seen = {}

    def model(x, t, **kwargs):
        seen.update(t=t, kwargs=kwargs)
        return torch.full_like(x, 3.0), "extra"

    x = torch.zeros(2, 1, 1, 1, 1)
    d = make_diffusion(steps=250)
    out = d.call_model(model, x, torch.tensor([10, 249]), {"y": 7})
    assert torch.equal(out, torch.full_like(x, 3.0)) and seen["kwargs"] == {"y": 7}
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [40.0, 996.0]
    d.rescale_timesteps = False
    d.call_model(model, x, torch.tensor([10, 249]), None)
    assert seen["t"].dtype == torch.long and seen["t"].tolist() == [10, 249] and seen["kwargs"] == {}


# ----------------------------------------------------------------------------- forward process, more

def test_q_sample_draws_its_own_noise_and_without_a_mask_noises_every_frame():
    d = make_diffusion()
    x0 = torch.randn(1, 2, 3, 4, 4)
    t = torch.tensor([30])
    torch.manual_seed(5)
    drawn = d.q_sample(x0, t)
    torch.manual_seed(5)
    noise = torch.randn_like(x0)
    a = abar(d.betas)[30]
    torch.testing.assert_close(drawn, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise, atol=1e-6, rtol=0)


def test_velocity_is_the_closed_form():
    d = make_diffusion()
    x0, noise = torch.randn(2, 1, 3, 2, 2), torch.randn(2, 1, 3, 2, 2)
    t = torch.tensor([7, 80])
    a = torch.tensor(abar(d.betas)[[7, 80]]).view(2, 1, 1, 1, 1)
    expected = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    torch.testing.assert_close(d.velocity(x0, t, noise).double(), expected, atol=1e-6, rtol=0)
    xt = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    # x0 = sqrt(a) x_t - sqrt(1 - a) v
    torch.testing.assert_close(d.predict_xstart_from_v(xt.float(), t, expected.float()).double(),
                               a.sqrt() * xt - (1 - a).sqrt() * expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the reverse process

@pytest.mark.parametrize("mean_type", [EPS, X0, V])
@pytest.mark.parametrize("var_type", [SMALL, LARGE, LEARNED])
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance_is_the_posterior_at_the_predicted_x0(mean_type, var_type, clip):
    d = make_diffusion("cosine", steps=50, mean=mean_type, var=var_type)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 2, 2, 2, generator=g) * 1.5
    C = 2
    output = torch.randn(2, 3, 2 * C if var_type == LEARNED else C, 2, 2, generator=g) * 1.5
    if var_type == LEARNED:
        output[:, :, C:] = output[:, :, C:].tanh()
    t = torch.tensor([[0, 1, 17], [30, 0, 45]])
    calls = []

    def model(x_in, t_in, **kwargs):
        calls.append(kwargs)
        return output

    got = d.p_mean_variance(model, x, t, clip_denoised=clip, model_kwargs={"k": 1})
    ref = reference_p(Chain(d.betas), mean_type, var_type, output, x, t, clip)
    assert calls == [{"k": 1}]
    for key in ("mean", "log_variance", "pred_xstart"):
        assert got[key].shape == x.shape, key
        np.testing.assert_allclose(got[key].double().numpy(), ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
    variance = np.exp(ref["log_variance"])
    if var_type == SMALL:  # beta~_0 = 0 itself; only its log is clipped
        variance[(t == 0).numpy()] = 0.0
    np.testing.assert_allclose(got["variance"].double().numpy(), variance, rtol=1e-4)
    assert torch.equal(got["model_output"], output[:, :, :C])
    if clip:
        assert got["pred_xstart"].abs().max() <= 1 and ref["pred_xstart"].min() == -1  # the clip did bite


def test_denoised_fn_runs_on_x0_before_the_clip():
    d = make_diffusion(mean=X0, var=SMALL)
    x = torch.zeros(1, 1, 1, 1, 3)
    output = torch.tensor([-0.8, 0.3, 0.9]).view(x.shape)
    out = d.p_mean_variance(lambda *a, **k: output, x, torch.tensor([5]), denoised_fn=lambda x0: 2 * x0)
    assert out["pred_xstart"].flatten().tolist() == pytest.approx([-1.0, 0.6, 1.0])
    # Passed a precomputed output, the model is not called.
    out = d.p_mean_variance(None, x, torch.tensor([5]), clip_denoised=False, model_output=output)
    assert torch.equal(out["pred_xstart"], output)


def test_learned_range_needs_twice_the_channels():
    d = make_diffusion(var=LEARNED)
    x = torch.zeros(1, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="needs 4 output channels per frame, got 2"):
        d.p_mean_variance(lambda *a, **k: torch.zeros_like(x), x, torch.tensor([3]))


@pytest.mark.parametrize("var_type", [SMALL, LARGE])
def test_p_sample_adds_scaled_noise_except_at_t_zero_on_latent_frames_only(var_type):
    d = make_diffusion("cosine", steps=50, mean=EPS, var=var_type)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 1, 2, 2, generator=g)
    output = torch.randn(x.shape, generator=g) * 0.3
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([[0, 20, 49], [10, 10, 0]])
    latent = torch.tensor([[1, 1, 1], [1, 0, 1.0]]).view(2, 3, 1, 1, 1)
    seen = []
    model = lambda x_in, t_in, **k: (seen.append(k), output)[1]  # noqa: E731
    shrink = lambda x0: 0.5 * x0  # noqa: E731
    result = d.p_sample(model, x, t, model_kwargs={"latent_mask": latent}, noise=noise, denoised_fn=shrink)
    got = result["sample"]
    assert seen == [{"latent_mask": latent}]
    ref = reference_p(chain, EPS, var_type, output, x, t, denoised_fn=shrink)
    np.testing.assert_allclose(result["pred_xstart"].double().numpy(), ref["pred_xstart"], rtol=1e-4, atol=1e-5)
    nonzero = (t > 0).view(2, 3, 1, 1, 1).numpy()
    expected = ref["mean"] + np.exp(0.5 * ref["log_variance"]) * noise.double().numpy() * nonzero
    keep = ~latent.bool().expand_as(x)
    np.testing.assert_allclose(got[~keep].double().numpy(), expected[~keep.numpy()], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[keep], x[keep])
    # An explicit latent_mask overrides model_kwargs'; without noise the generator draws it.
    # (float64 frames: the noise is drawn in their dtype, which changes the draws.)
    x = x.double()
    drawn = d.p_sample(model, x, t, model_kwargs={"latent_mask": latent}, latent_mask=torch.ones_like(latent),
                       generator=torch.Generator().manual_seed(9))["sample"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    redo = d.p_sample(model, x, t, noise=noise)["sample"]
    assert torch.equal(drawn, redo) and not torch.equal(drawn[1, 1], x[1, 1])


def reference_ddim(chain, x0hat, xt, t, t_next, eta, noise):
    """One DDIM step (Song et al. 2021, eq. 12) with sigma_t(eta) of eq. 16; returns sample, sigma."""
    a, a_next = chain.a(t), chain.a(t_next)
    eps = (xt - math.sqrt(a) * x0hat) / math.sqrt(1 - a)
    sigma = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)
    direction = math.sqrt(max(1 - a_next - sigma**2, 0.0))
    return math.sqrt(a_next) * x0hat + direction * eps + sigma * noise, sigma


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_eq_12_with_per_frame_targets(eta):
    d = make_diffusion("cosine", steps=50, mean=X0, var=SMALL)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 1, 2, 2, generator=g)
    x0hat = torch.randn(x.shape, generator=g)
    noise = torch.randn(x.shape, generator=g)
    assert ((x0hat + 0.1).abs() > 1).any()  # so that the default clip_denoised bites
    t = torch.tensor([[30, 30, 12, 5]])
    t_next = torch.tensor([[29, 20, -1, 5]])  # one step, a jump, to clean, and a frame that stays
    seen = []
    result = d.ddim_step(lambda x_in, t_in, **k: (seen.append(k), x0hat)[1], x, t, t_next, eta=eta, noise=noise,
                         denoised_fn=lambda x0: x0 + 0.1, model_kwargs={"k": 1})
    got = result["sample"]
    assert seen == [{"k": 1}]
    x0hat = (x0hat + 0.1).clamp(-1, 1)  # denoised, then clipped
    torch.testing.assert_close(result["pred_xstart"], x0hat)
    for f in range(3):
        expected, _ = reference_ddim(chain, x0hat[0, f].double().numpy(), x[0, f].double().numpy(),
                                     int(t[0, f]), int(t_next[0, f]), eta, noise[0, f].double().numpy())
        np.testing.assert_allclose(got[0, f].double().numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0, 2], x0hat[0, 2], atol=1e-5, rtol=0)  # t_next = -1 lands on x0
    assert torch.equal(got[0, 3], x[0, 3])


def test_ddim_eta_one_matches_ancestral_variance():
    """With eta = 1 the DDIM step's noise has sigma_t(1)^2 = beta~_t, the ancestral (posterior) variance,
    and its mean is the posterior mean at the predicted x0 (Song et al. 2021, eq. 16 and Appendix)."""
    d = make_diffusion("linear", steps=100, mean=X0, var=SMALL)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 1, 3, 3, generator=g)
    x0hat = torch.rand(x.shape, generator=g) * 2 - 1
    t = torch.tensor([[40, 90], [1, 70]])
    model = lambda *a, **k: x0hat  # noqa: E731
    mean = d.ddim_step(model, x, t, t - 1, eta=1.0, noise=torch.zeros_like(x))["sample"]
    noise = torch.randn(x.shape, generator=g)
    moved = d.ddim_step(model, x, t, t - 1, eta=1.0, noise=noise)["sample"]
    for b in range(2):
        for f in range(2):
            tt = int(t[b, f])
            sigma = math.sqrt((1 - chain.a(tt - 1)) / (1 - chain.a(tt))) * math.sqrt(1 - chain.a(tt) / chain.a(tt - 1))
            assert sigma**2 == pytest.approx(chain.post_var(tt), rel=1e-9)
            coefficient = (moved[b, f] - mean[b, f]).double() / noise[b, f].double()
            np.testing.assert_allclose(coefficient.numpy(), sigma, rtol=2e-3)
            expected_mean = chain.post_mean(x0hat[b, f].double().numpy(), x[b, f].double().numpy(), tt)
            np.testing.assert_allclose(mean[b, f].double().numpy(), expected_mean, rtol=1e-4, atol=5e-5)


def test_ddim_with_a_large_eta_drops_the_direction_instead_of_nan():
    d = make_diffusion(mean=X0, var=SMALL)
    chain = Chain(d.betas)
    x, x0hat, noise = torch.randn(1, 1, 1, 2, 2), torch.rand(1, 1, 1, 2, 2) - 0.5, torch.randn(1, 1, 1, 2, 2)
    t = torch.tensor([60])
    got = d.ddim_step(lambda *a, **k: x0hat, x, t, torch.tensor([10]), eta=3.0, noise=noise)["sample"]
    expected, sigma = reference_ddim(chain, x0hat.double().numpy(), x.double().numpy(), 60, 10, 3.0,
                                     noise.double().numpy())
    assert sigma**2 > 1 - chain.a(10)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_ddim_step_draws_noise_from_the_generator_and_keeps_observed_frames():
    d = make_diffusion(mean=X0, var=SMALL)
    x = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64)  # the noise is drawn in x's dtype
    x0hat = torch.zeros_like(x)
    t = torch.tensor([50])
    latent = torch.tensor([0, 1.0]).view(1, 2, 1, 1, 1)
    model = lambda *a, **k: x0hat  # noqa: E731
    drawn = d.ddim_step(model, x, t, t - 1, eta=1.0, latent_mask=latent,
                        generator=torch.Generator().manual_seed(3))["sample"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    redo = d.ddim_step(model, x, t, t - 1, eta=1.0, noise=noise)["sample"]
    assert torch.equal(drawn[0, 0], x[0, 0]) and torch.equal(drawn[0, 1], redo[0, 1])
    # The default eta = 0 is deterministic: a given noise is ignored, and no random number is drawn.
    quiet = d.ddim_step(model, x, t, t - 1, noise=noise)["sample"]
    torch.manual_seed(0)
    assert torch.equal(quiet, d.ddim_step(model, x, t, t - 1, eta=0.0)["sample"])
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- sampling loops, by hand

def loop_model(x, t, **kwargs):
    """A deterministic eps model that depends on x and on the (scaled) timestep."""
    return 0.3 * x + 0.002 * t.view(-1, 1, 1, 1, 1)


def test_p_sample_loop_is_the_ancestral_chain_step_by_step():
    d = make_diffusion("cosine", steps=6, var=LARGE)
    chain = Chain(d.betas)
    shape = (1, 2, 1, 2, 2)
    seen = []
    got = d.p_sample_loop(loop_model, shape, generator=torch.Generator().manual_seed(8),
                          callback=lambda out: seen.append((out["i"], out["sample"])))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=g)
    for i, t in enumerate(range(5, -1, -1)):
        eps = loop_model(x, torch.tensor([t * 1000 / 6]))
        noise = torch.randn(shape, generator=g)
        ref = reference_p(chain, EPS, LARGE, eps, x, torch.tensor([t]))
        x = torch.from_numpy(ref["mean"] + (t > 0) * np.exp(0.5 * ref["log_variance"]) * noise.double().numpy())
        x = x.float()
        assert seen[i][0] == i
        torch.testing.assert_close(seen[i][1], x, atol=1e-4, rtol=1e-4)
    assert len(seen) == 6
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_ddim_sample_loop_with_eta_is_the_ddim_chain_step_by_step():
    d = make_diffusion("cosine", steps=5, var=SMALL)
    chain = Chain(d.betas)
    shape = (2, 1, 1, 2, 2)
    got = d.ddim_sample_loop(loop_model, shape, eta=0.7, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).double().numpy()
    for t in range(4, -1, -1):
        eps = loop_model(torch.from_numpy(x), torch.full((2,), t * 1000 / 5, dtype=torch.float64)).numpy()
        x0hat = np.clip(chain.x0_from(EPS, eps, x, t), -1, 1)
        noise = torch.randn(shape, generator=g).double().numpy()
        x, _ = reference_ddim(chain, x0hat, x, t, t - 1, 0.7, noise)
    np.testing.assert_allclose(got.double().numpy(), x, atol=1e-4, rtol=1e-4)


def test_sampling_uses_the_given_noise_and_no_autograd(capsys):
    net = torch.nn.Linear(1, 1)  # only its parameters matter here: the step below does the work
    d = make_diffusion("cosine", steps=4, var=SMALL)
    noise = torch.randn(1, 2, 1, 2, 2)
    first = []
    for out in d.sample_loop_progressive(net, noise.shape, lambda x, t: (first.append(x.clone()),
                                                                          {"sample": net.weight * x})[1],
                                         noise=noise):
        assert not out["sample"].requires_grad
    assert torch.equal(first[0], noise) and len(first) == 4
    assert capsys.readouterr().err == ""  # no progress bar unless asked


# ----------------------------------------------------------------------------- the variational bound and losses

def test_hybrid_loss_adds_vlb_with_lambda_one_thousandth():
    """MSE + VLB * N / 1000 (improved DDPM, section 3.1), N = 250 so the rescaling shows; the VLB term is computed
    here from the Gaussian KL and the discretized decoder likelihood, and sees the mean through a stop-gradient."""
    steps = 250
    d = make_diffusion("cosine", steps=steps, var=LEARNED, loss=gd.LossType.RESCALED_MSE)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(12)
    x0 = quantised_images((2, 3, 2, 3, 3), g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([[0, 1, 37], [120, 0, 200]])  # per frame: decoder terms and KL terms
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g)
    var_values = torch.rand(x0.shape, generator=g) * 2 - 1
    pred = torch.cat([eps, var_values], dim=2).requires_grad_(True)
    terms = d.training_losses(lambda *a, **k: pred, x0, t, noise=noise)

    a = torch.tensor([[chain.a(int(s)) for s in row] for row in t], dtype=torch.float64).view(2, 3, 1, 1, 1)
    xt = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).numpy()
    ref = reference_p(chain, EPS, LEARNED, pred.detach(), torch.from_numpy(xt), t, clip=False)
    bits = np.zeros(x0.shape)
    for b in range(2):
        for f in range(3):
            bits[b, f] = reference_vb_bits(chain, x0[b, f].double().numpy(), xt[b, f], int(t[b, f]),
                                           ref["mean"][b, f], ref["log_variance"][b, f])
    expected_vb = bits.mean(axis=(1, 2, 3, 4)) * steps / 1000
    expected_mse = ((eps - noise).double() ** 2).mean(dim=(1, 2, 3, 4)).numpy()
    np.testing.assert_allclose(terms["vb"].detach().double().numpy(), expected_vb, rtol=1e-4)
    np.testing.assert_allclose(terms["mse"].detach().double().numpy(), expected_mse, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"].detach().double().numpy(), expected_mse + expected_vb, rtol=1e-4)
    # Frame by frame too, so that the small KL terms are not hidden by the decoder terms.
    per_frame = d.training_losses(lambda *a, **k: pred, x0, t, noise=noise, per_frame_terms=True)
    np.testing.assert_allclose(per_frame["vb"].detach().double().numpy(),
                               bits.mean(axis=(2, 3, 4)) * steps / 1000, rtol=1e-4)

    # The VLB term trains the variance only: no gradient reaches the mean channels through it.
    grad_vb, = torch.autograd.grad(terms["vb"].sum(), pred, retain_graph=True)
    assert torch.equal(grad_vb[:, :, :2], torch.zeros_like(grad_vb[:, :, :2]))
    assert (grad_vb[:, :, 2:] != 0).float().mean() > 0.9
    grad_loss, = torch.autograd.grad(terms["loss"].sum(), pred)
    grad_mse = 2 * (eps - noise) / eps[0].numel()
    torch.testing.assert_close(grad_loss[:, :, :2], grad_mse, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss_type, factor", [(gd.LossType.MSE, 1.0), (gd.LossType.RESCALED_MSE, 0.5)])
def test_learned_variance_vlb_per_frame_and_masked(loss_type, factor):
    steps = 500
    d = make_diffusion("linear", steps=steps, var=LEARNED, loss=loss_type)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(13)
    x0 = quantised_images((1, 3, 1, 2, 2), g)
    noise = torch.randn(x0.shape, generator=g)
    latent = torch.tensor([1, 0, 1.0]).view(1, 3, 1, 1, 1)
    pred = torch.cat([noise * 0.9, torch.rand(x0.shape, generator=g) * 2 - 1], dim=2)
    t = torch.tensor([0])
    terms = d.training_losses(lambda *a, **k: pred, x0, t, noise=noise, latent_mask=latent, per_frame_terms=True)
    # t = 0 everywhere: only decoder terms; x_t of an observed frame is x0 itself.
    a = chain.a(0)
    expected = np.zeros((1, 3))
    for f in (0, 2):
        xt = math.sqrt(a) * x0[0, f].double().numpy() + math.sqrt(1 - a) * noise[0, f].double().numpy()
        ref = reference_p(chain, EPS, LEARNED, pred[:, f:f + 1], torch.from_numpy(xt)[None, None], t, clip=False)
        expected[0, f] = reference_vb_bits(chain, x0[0, f].double().numpy(), xt, 0, ref["mean"][0, 0],
                                           ref["log_variance"][0, 0]).mean() * factor
    np.testing.assert_allclose(terms["vb"].double().numpy(), expected, rtol=1e-4)
    expected_mse = ((0.1 * noise) ** 2).mean(dim=(2, 3, 4)) * latent.view(1, 3)
    torch.testing.assert_close(terms["mse"], expected_mse)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


@pytest.mark.parametrize("loss_type, factor", [(gd.LossType.KL, 1), (gd.LossType.RESCALED_KL, 40)])
def test_kl_losses_are_the_bound_in_bits(loss_type, factor):
    d = make_diffusion("cosine", steps=40, mean=X0, var=LARGE, loss=loss_type)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(14)
    x0 = quantised_images((2, 2, 1, 2, 2), g)
    noise = torch.randn(x0.shape, generator=g)
    # Unclipped (the bound sees the raw prediction), and near x0 so that the decoder likelihood does not underflow.
    output = x0 * 1.1 + 0.002 * torch.randn(x0.shape, generator=g)
    t = torch.tensor([[0, 3], [25, 39]])
    seen = []
    terms = d.training_losses(lambda x, s, **k: (seen.append(k), output)[1], x0, t, {"c": 2}, noise=noise)
    assert seen == [{"c": 2}] and set(terms) == {"loss"}
    expected = np.zeros(2)
    for b in range(2):
        per_frame = []
        for f in range(2):
            tt = int(t[b, f])
            clean = x0[b, f].double().numpy()
            xt = math.sqrt(chain.a(tt)) * clean + math.sqrt(1 - chain.a(tt)) * noise[b, f].double().numpy()
            mean = chain.post_mean(output[b, f].double().numpy(), xt, tt)
            per_frame.append(reference_vb_bits(chain, clean, xt, tt, mean, chain.log_var(LARGE, tt)))
        expected[b] = np.mean(per_frame) * factor
    np.testing.assert_allclose(terms["loss"].double().numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("mean_type", [EPS, X0, V])
def test_mse_targets_of_each_parameterization(mean_type):
    d = make_diffusion("cosine", steps=30, mean=mean_type, var=SMALL)
    chain = Chain(d.betas)
    x0 = torch.rand(2, 2, 1, 2, 2) * 2 - 1
    t = torch.tensor([4, 21])
    output = torch.randn(x0.shape)
    torch.manual_seed(21)
    terms = d.training_losses(lambda *a, **k: output, x0, t)
    torch.manual_seed(21)
    noise = torch.randn_like(x0).double()
    a = torch.tensor([chain.a(4), chain.a(21)], dtype=torch.float64).view(2, 1, 1, 1, 1)
    target = {EPS: noise, X0: x0.double(), V: a.sqrt() * noise - (1 - a).sqrt() * x0.double()}[mean_type]
    expected = ((output.double() - target) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(terms["mse"].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"])
    # The model saw x_t (from the same noise) at the scaled timestep.
    seen = []
    d.training_losses(lambda x, s, **k: (seen.append((x, s)), output)[1], x0, t, noise=noise.float())
    torch.testing.assert_close(seen[0][0].double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise, atol=1e-6, rtol=0)
    assert seen[0][1].tolist() == pytest.approx([4 * 1000 / 30, 21 * 1000 / 30])


def test_kl_loss_per_frame_counts_latent_frames_only():
    d = make_diffusion("cosine", steps=40, mean=EPS, var=SMALL, loss=gd.LossType.KL)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(15)
    x0 = quantised_images((1, 3, 1, 2, 2), g)
    noise = torch.randn(x0.shape, generator=g)
    output = noise + 0.2 * torch.randn(x0.shape, generator=g)
    latent = torch.tensor([1, 0, 1.0]).view(1, 3, 1, 1, 1)
    t = torch.tensor([[9, 20, 30]])
    got = d.training_losses(lambda *a, **k: output, x0, t, {"latent_mask": latent}, noise=noise, per_frame_terms=True)
    expected = np.zeros((1, 3))
    for f in (0, 2):
        tt = int(t[0, f])
        clean = x0[0, f].double().numpy()
        xt = math.sqrt(chain.a(tt)) * clean + math.sqrt(1 - chain.a(tt)) * noise[0, f].double().numpy()
        mean = chain.post_mean(chain.x0_from(EPS, output[0, f].double().numpy(), xt, tt), xt, tt)
        expected[0, f] = reference_vb_bits(chain, clean, xt, tt, mean, chain.log_var(SMALL, tt)).mean()
    np.testing.assert_allclose(got["loss"].double().numpy(), expected, rtol=1e-4)
    whole = d.training_losses(lambda *a, **k: output, x0, t, {"latent_mask": latent}, noise=noise)["loss"]
    assert whole.item() == pytest.approx(expected[0, [0, 2]].mean(), rel=1e-4)


def test_frame_weights_weight_the_squared_error_of_each_frame():
    d = make_diffusion("cosine", steps=20, mean=X0, var=SMALL)
    x0 = torch.rand(2, 3, 1, 2, 2) * 2 - 1
    output = torch.randn(x0.shape)
    weights = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.5]], dtype=torch.float64)
    latent = torch.tensor([[1, 1, 0], [1, 1, 1.0]]).view(2, 3, 1, 1, 1)
    terms = d.training_losses(lambda *a, **k: output, x0, torch.tensor([3, 15]), noise=torch.randn(x0.shape),
                              latent_mask=latent, frame_weights=weights)
    frame_se = ((output - x0).double() ** 2).mean(dim=(2, 3, 4))  # x0 prediction: the target is x0
    keep = latent.view(2, 3).double()
    expected_mse = (frame_se * keep).sum(1) / keep.sum(1)
    expected_loss = (frame_se * weights * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(terms["mse"].double(), expected_mse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(terms["loss"].double(), expected_loss, atol=1e-6, rtol=1e-6)
    assert terms["loss"].dtype == torch.float32  # float64 weights do not change the loss's dtype


def test_loss_weighting_defaults_are_min_snr_five_and_decay_point_96():
    kwargs = dict(betas=gd.get_named_beta_schedule("cosine", 100), model_var_type=SMALL, loss_type=gd.LossType.MSE)
    chain = Chain(kwargs["betas"])
    snr = lambda t: chain.a(t) / (1 - chain.a(t))  # noqa: E731
    t = torch.tensor([[0, 30, 90], [60, 60, 60]])
    assert gd.GaussianDiffusion(model_mean_type=EPS, **kwargs).loss_frame_weights(t, 3) is None
    torch.testing.assert_close(gd.GaussianDiffusion(model_mean_type=V, **kwargs).snr(t),
                               torch.tensor([[snr(int(s)) for s in row] for row in t], dtype=torch.float64))
    for mean_type in (EPS, X0, V):
        d = gd.GaussianDiffusion(model_mean_type=mean_type, loss_weighting="min_snr", **kwargs)
        got = d.loss_frame_weights(t, 3)
        assert got.dtype == torch.float32 and got.shape == (2, 3)
        for b in range(2):
            for f in range(3):
                s = snr(int(t[b, f]))
                expected = {EPS: min(s, 5) / s, X0: min(s, 5), V: min(s, 5) / (s + 1)}[mean_type]
                assert got[b, f].item() == pytest.approx(expected, rel=1e-6)
    # Fused SNR, per-video t: frame 1 sees frame 0's normalised clipped SNR s through the decay 0.96.
    d = gd.GaussianDiffusion(model_mean_type=X0, loss_weighting="fused_snr", **kwargs)
    got = d.loss_frame_weights(torch.tensor([60, 60]), 2)
    s = min(snr(60), 5) / 5
    for b in range(2):
        assert got[b, 0].item() == pytest.approx(s * 5, rel=1e-6)
        assert got[b, 1].item() == pytest.approx((1 - (1 - 0.96 * s) * (1 - s)) * 5, rel=1e-6)
    # A known (clean) frame weighs 0 and counts as fully known (s = 1); a frame out of the sequence reads no context.
    got = d.loss_frame_weights(torch.tensor([[0, 60]]), 2, known=torch.tensor([[True, False]]))
    assert got[0, 0] == 0 and got[0, 1].item() == pytest.approx((1 - (1 - 0.96) * (1 - s)) * 5, rel=1e-6)
    got = d.loss_frame_weights(torch.tensor([[60, 60]]), 2, in_sequence=torch.tensor([[True, False]]))
    assert got[0, 1].item() == pytest.approx(s * 5, rel=1e-6)
    assert d.snr(torch.tensor([3], device="meta")).device.type == "meta"


def test_vb_terms_bpd_defaults_clip_and_average_over_latent_frames():
    d = make_diffusion("cosine", steps=40, mean=X0, var=LARGE)
    chain = Chain(d.betas)
    g = torch.Generator().manual_seed(16)
    x0 = quantised_images((2, 2, 1, 2, 2), g)
    xt = torch.randn(x0.shape, generator=g)
    output = x0 * 1.5  # beyond [-1, 1] where |x0| > 2/3: the default clip_denoised bites
    t = torch.tensor([[5, 1], [12, 33]])
    seen = []
    got = d.vb_terms_bpd(lambda x_in, t_in, **k: (seen.append(k), output)[1], x0, xt, t, model_kwargs={"k": 1})
    assert seen == [{"k": 1}]
    clipped = output.clamp(-1, 1)
    torch.testing.assert_close(got["pred_xstart"], clipped)
    bits = np.zeros((2, 2))
    for b in range(2):
        for f in range(2):
            tt = int(t[b, f])
            mean = chain.post_mean(clipped[b, f].double().numpy(), xt[b, f].double().numpy(), tt)
            bits[b, f] = reference_vb_bits(chain, x0[b, f].double().numpy(), xt[b, f].double().numpy(), tt, mean,
                                           chain.log_var(LARGE, tt)).mean()
    np.testing.assert_allclose(got["output"].double().numpy(), bits.mean(axis=1), rtol=1e-4)
    latent = torch.tensor([[0, 1], [1, 1.0]]).view(2, 2, 1, 1, 1)
    masked = d.vb_terms_bpd(lambda *a, **k: output, x0, xt, t, latent_mask=latent)["output"]
    np.testing.assert_allclose(masked.double().numpy(), [bits[0, 1], bits[1].mean()], rtol=1e-4)


def test_training_noise_clamps_only_when_clip_noise_is_positive():
    noise = torch.tensor([-3.0, -0.7, 0.2, 0.6, 2.5])
    d = make_diffusion()
    assert torch.equal(d.training_noise(noise), noise)
    d.clip_noise = 0.5
    assert d.training_noise(noise).tolist() == pytest.approx([-0.5, -0.5, 0.2, 0.5, 0.5])


def test_the_model_is_trained_on_x_t_with_observed_frames_clean():
    d = make_diffusion("cosine", steps=20, mean=V, var=SMALL)
    x0 = torch.rand(1, 3, 1, 2, 2) * 2 - 1
    noise = torch.randn(x0.shape)
    latent = torch.tensor([0, 1, 1.0]).view(1, 3, 1, 1, 1)
    seen = []
    d.training_losses(lambda x, s, **k: (seen.append((x, k)), torch.zeros_like(x))[1], x0, torch.tensor([[2, 9, 17]]),
                      {"latent_mask": latent, "y": 3}, noise=noise)
    x_in, kwargs = seen[0]
    assert kwargs["y"] == 3 and torch.equal(x_in[0, 0], x0[0, 0])
    for f, tt in ((1, 9), (2, 17)):
        a = abar(d.betas)[tt]
        expected = math.sqrt(a) * x0[0, f].double() + math.sqrt(1 - a) * noise[0, f].double()
        torch.testing.assert_close(x_in[0, f].double(), expected, atol=1e-6, rtol=0)


def test_frame_weights_leave_the_learned_variance_term_unweighted():
    d = make_diffusion("cosine", steps=100, var=LEARNED, loss=gd.LossType.RESCALED_MSE)
    g = torch.Generator().manual_seed(17)
    x0 = quantised_images((1, 2, 1, 2, 2), g)
    noise = torch.randn(x0.shape, generator=g)
    pred = torch.cat([noise + 0.5, torch.zeros_like(x0)], dim=2)  # squared error 0.25 everywhere
    weights = torch.tensor([[3.0, 0.5]])
    t = torch.tensor([[10, 60]])
    plain = d.training_losses(lambda *a, **k: pred, x0, t, noise=noise, per_frame_terms=True)
    weighted = d.training_losses(lambda *a, **k: pred, x0, t, noise=noise, per_frame_terms=True, frame_weights=weights)
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    assert (plain["vb"] > 0).all()
    torch.testing.assert_close(weighted["mse"], torch.full((1, 2), 0.25))
    torch.testing.assert_close(weighted["loss"], 0.25 * weights + plain["vb"])


# ----------------------------------------------------------------------------- sampling loops: their arguments

def test_sampling_loops_pass_noise_mask_denoiser_and_kwargs_to_every_step():
    d = make_diffusion("cosine", steps=4, mean=X0, var=SMALL)
    shape = (1, 3, 1, 2, 2)
    noise = torch.randn(shape)
    x0 = torch.rand(shape) * 2 - 1
    latent = torch.tensor([1, 0, 1.0]).view(1, 3, 1, 1, 1)
    kwargs = {"x0": x0.double(), "y": 5}
    for loop in ("p_sample_loop", "ddim_sample_loop"):
        seen, calls = [], []

        def model(x, t, **k):
            seen.append((x.clone(), k))
            return torch.zeros_like(x)  # predicts x0 = 0, which the denoiser moves to 0.5

        got = getattr(d, loop)(model, shape, noise=noise, model_kwargs=kwargs, latent_mask=latent,
                               denoised_fn=lambda p: p + 0.5, callback=lambda out: calls.append(out["i"]))
        assert calls == [0, 1, 2, 3] and len(seen) == 4
        first_input = seen[0][0]
        assert torch.equal(first_input[0, 0], noise[0, 0]) and torch.equal(first_input[0, 2], noise[0, 2])
        assert torch.equal(first_input[0, 1], x0[0, 1])  # the explicit latent_mask marks frame 1 observed
        assert all(k["y"] == 5 for _, k in seen)
        assert got.dtype == noise.dtype and torch.equal(got[0, 1], x0[0, 1])
        # The last step lands on the denoised x0 prediction (no noise at t = 0).
        torch.testing.assert_close(got[0, [0, 2]], torch.full((2, 1, 2, 2), 0.5), atol=1e-5, rtol=0, msg=loop)


def test_ddim_sample_loop_is_deterministic_by_default():
    d = make_diffusion("cosine", steps=5, var=SMALL)
    noise = torch.randn(1, 1, 1, 2, 2)
    a = d.ddim_sample_loop(loop_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(loop_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_sampling_runs_on_the_models_or_the_requested_device():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.1, device="meta"))

        def forward(self, x, t, **kwargs):
            return x * self.w

    d = make_diffusion("cosine", steps=3, var=SMALL)
    shape = (1, 2, 1, 2, 2)
    # The meta device stands in for an accelerator: a tensor left on the CPU would not mix with it.
    for loop, extra in (("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 1.0})):
        assert getattr(d, loop)(Model(), shape, **extra).device.type == "meta"
        assert getattr(d, loop)(lambda x, t, **k: 0.1 * x, shape, device="meta", **extra).device.type == "meta"
        assert getattr(d, loop)(lambda x, t, **k: 0.1 * x, shape, **extra).device.type == "cpu"
        noise = torch.randn(shape)  # given on the CPU, moved to the requested device
        assert getattr(d, loop)(lambda x, t, **k: 0.1 * x, shape, noise=noise, device="meta").device.type == "meta"


def test_progress_bar_only_when_asked(capsys):
    d = make_diffusion("cosine", steps=3, var=SMALL)
    for loop in ("p_sample_loop", "ddim_sample_loop"):
        getattr(d, loop)(lambda x, t, **k: 0.1 * x, (1, 1, 1, 1, 1))
        assert capsys.readouterr().err == ""
        getattr(d, loop)(lambda x, t, **k: 0.1 * x, (1, 1, 1, 1, 1), progress=True)
        assert "0/3" in capsys.readouterr().err
