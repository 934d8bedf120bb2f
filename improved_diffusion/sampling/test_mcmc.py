"""MCMC refinement (mcmc.py) and its place in the stage sampler.

Known quadratic energies (frames independent) check the rules of a step exactly: rejection leaves a
frame bit for bit, accepted steps never raise a frame's energy, the clamp, the counts, the potential of
each parameterization, and that Langevin proposals with Metropolis-Hastings keep the right
distribution. Tiny random energy networks check the sampler: with no MCMC an energy model samples as a
plain model whose prediction is grad E, every plan x noise schedule (stabilization, DDPM, DF's update)
refines exactly the frames it should, guidance and per-video calls carry energies, and the NFE
counter counts what MCMC costs.
"""

import dataclasses
import math

import pytest
import torch
from torch.func import vjp

from improved_diffusion.diffusion.build import DiffusionConfig, create_diffusion
from improved_diffusion.errors import ConfigError
from improved_diffusion.evaluation.report import count_network_evaluations
from improved_diffusion.models import ModelConfig, create_model
from improved_diffusion.sampling import mcmc
from improved_diffusion.sampling.guidance import ClassifierFreeGuidance, Conditions
from improved_diffusion.sampling.noise_schedules import noise_levels
from improved_diffusion.sampling.sampler import (one_video_at_a_time, sample_video, sample_with_scheme,
                                                 video_generator)
from improved_diffusion.sampling.request import SchemeRequest
from improved_diffusion.sampling.scheme import Scheme

SIZE = 8


class Quadratic:
    """Stand-in energy model: E_k = c_k / 2 ||x_k - mu||^2 on latent frames, called as an EnergyModel is.

    Its plain prediction is grad sum_k E_k; with energy_weights w, grad sum_k w_k E_k. Records its calls.
    """

    def __init__(self, c, mu=0.0):
        self.c = torch.as_tensor(c, dtype=torch.float64)
        self.mu = mu
        self.calls = []

    def energies(self, x, latent):
        return 0.5 * self.c * (x - self.mu).pow(2).flatten(2).sum(dim=2) * latent

    def __call__(self, x, t, latent_mask=None, return_energy=False, gradient=True, energy_weights=None, **kwargs):
        self.calls.append({"t": t, "gradient": gradient, "return_energy": return_energy})
        B, K = x.shape[:2]
        latent = torch.ones(B, K, dtype=x.dtype) if latent_mask is None else latent_mask.view(B, K).to(x.dtype)
        weights = latent if energy_weights is None else energy_weights * latent
        prediction = (weights * self.c).view(B, K, 1, 1, 1) * (x - self.mu)
        if not return_energy:
            return prediction
        return (prediction if gradient else None), self.energies(x, latent)


def diffusion(kind="eps", steps=10):
    return create_diffusion(DiffusionConfig(diffusion_steps=100, predict_v=kind == "v", predict_xstart=kind == "x0"),
                            str(steps))


def seeded(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=g, dtype=torch.float64)


def uniforms(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.rand(shape, generator=g, dtype=torch.float64)


def frames_state(B=2, K=4, seed=3):
    x = torch.randn(B, K, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = torch.tensor([[3, 5, 7, 9], [2, 4, 6, 8]])[:B, :K]
    frames = torch.ones(B, K, dtype=torch.bool)
    frames[:, 0] = False  # slot 0: not refined (e.g. observed)
    return x, t, frames


def refine(model, d, x, t, frames, steps, step_size, **options):
    stats = mcmc.MCMCStats(x.shape[0])
    out = mcmc.refine(model, d, x, t, {}, frames, steps, step_size, stats=stats, **options)
    return out, stats


# ----------------------------------------------------------------------------- the step rules

def test_rejected_steps_leave_frames_unchanged():
    """A huge step overshoots a quadratic: every frame's energy rises, so every frame is left bit for bit."""
    model = Quadratic(1.0)
    x, t, frames = frames_state()
    out, stats = refine(model, diffusion(), x, t, frames, steps=4, step_size=100.0, clamp="none")
    assert torch.equal(out, x)
    assert stats.accepted.tolist() == [0, 0] and stats.proposed.tolist() == [4 * 3, 4 * 3]
    assert stats.acceptance_rate() == 0
    # The state never changed, so its energy and gradient are evaluated once and reused.
    assert stats.gradient_evaluations.tolist() == [1, 1] and stats.energy_evaluations.tolist() == [4, 4]


def test_energy_never_rises_and_each_frame_is_judged_alone():
    """c a < 2 shrinks a frame's energy, c a > 2 raises it: those frames stay, the others move downhill."""
    a = 0.5
    c = torch.tensor([[1.0, 0.5, 3.0, 5.0], [1.0, 4.5, 1.0, 1.5]])  # c a = 2.25 and 2.5 overshoot
    model = Quadratic(c)
    x, t, frames = frames_state()
    latent = torch.ones(2, 4, dtype=torch.float64)
    energies = [model.energies(x, latent)]
    states = [x]
    total = mcmc.MCMCStats(2)
    for _ in range(4):
        x = mcmc.refine(model, diffusion(), x, t, {}, frames, 1, a, clamp="none", stats=total)
        states.append(x)
        energies.append(model.energies(x, latent))
    for before, after in zip(energies, energies[1:]):
        assert (after <= before).all()
    overshoot = c * a > 2
    for before, after in zip(states, states[1:]):
        moved = (after != before).flatten(2).any(dim=2)
        assert torch.equal(moved, frames & ~overshoot)
    assert (energies[-1][frames & ~overshoot] < 0.2 * energies[0][frames & ~overshoot]).all()
    assert total.accepted.tolist() == [4 * 2, 4 * 2] and total.proposed.tolist() == [12, 12]
    assert total.acceptance_rate() == pytest.approx(16 / 24)


def test_the_clamp_bounds_refined_values_per_frame():
    """Each frame's values stay within its own bound (per-frame timesteps); other slots are untouched."""
    d = diffusion()
    model = Quadratic(1.0, mu=50.0)  # pulls every value far outside any bound
    x, t, frames = frames_state()
    x = 0.01 * x  # inside every bound: each clamped step still lowers the energy, so it is kept
    abar = torch.from_numpy(d.alphas_cumprod)[t].float().double()  # the diffusion's tables are read as float32
    expected = {"signal": 2 * abar.sqrt(), "signal_noise": 2 * abar.sqrt() + 6 * (1 - abar).sqrt()}
    for clamp, bound in expected.items():
        out, _ = refine(model, d, x, t, frames, steps=3, step_size=0.5, clamp=clamp)
        peak = out.abs().flatten(2).max(dim=2).values
        assert (peak[frames] <= bound[frames]).all()
        assert torch.allclose(peak[frames], bound[frames])  # the pull reaches the bound
        assert torch.equal(out[~frames], x[~frames])
    out, _ = refine(model, d, x, t, frames, steps=3, step_size=0.5, clamp="none")
    assert (out.abs().flatten(2).max(dim=2).values[frames] > 20).all()


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_a_step_moves_along_the_predicted_noise_of_each_parameterization(kind):
    """U's gradient is eps_hat, derived from the model's eps / v / x0 prediction by the diffusion's own formulas."""
    d = diffusion(kind)
    model = Quadratic(0.5)
    x, t, frames = frames_state()
    frames[:] = True
    a = 1e-3
    out, stats = refine(model, d, x, t, frames, steps=1, step_size=a, clamp="none")
    assert stats.accepted.sum() == frames.sum()  # a small step down a convex potential
    prediction = model(x, t)
    if kind == "eps":
        eps = prediction
    elif kind == "v":
        eps = d.predict_eps_from_xstart(x, t, d.predict_xstart_from_v(x, t, prediction))
    else:
        eps = d.predict_eps_from_xstart(x, t, prediction)
    torch.testing.assert_close(out, x - a * eps.to(x.dtype), rtol=1e-6, atol=1e-9)


def test_langevin_with_metropolis_keeps_the_noisy_distribution():
    """For U = c/2 x^2 (eps units) the chain targets exp(-U / sigma_t) = N(0, sigma_t / c). With a c = 0.8
    the unadjusted chain's variance is 1 / (1 - a c / 2) = 1.67 times that; MALA's must be right."""
    d = diffusion()
    c, a, chains = 2.0, 0.4, 4000
    model = Quadratic(c)
    x = torch.zeros(chains, 1, 1, 1, 1, dtype=torch.float64)
    t = torch.full((chains, 1), 6)
    frames = torch.ones(chains, 1, dtype=torch.bool)
    sigma = math.sqrt(1 - d.alphas_cumprod[6])
    out, stats = refine(model, d, x, t, frames, steps=150, step_size=a, noise=True, clamp="none",
                        normal_fn=seeded(x.shape), uniform_fn=uniforms((chains, 1)))
    assert 0.3 < stats.acceptance_rate() < 0.95
    assert out.var().item() == pytest.approx(sigma / c, rel=0.08)
    assert abs(out.mean().item()) < 4 * math.sqrt(sigma / c / chains)


def test_evaluation_counts_follow_the_documented_rule():
    d = diffusion()
    x, t, frames = frames_state()
    # Descent, every step accepted: one gradient and one energy evaluation per step.
    model = Quadratic(0.5)
    _, stats = refine(model, d, x, t, frames, steps=3, step_size=1e-3, clamp="none")
    assert stats.accepted.tolist() == [9, 9]
    assert stats.gradient_evaluations.tolist() == [3, 3] and stats.energy_evaluations.tolist() == [3, 3]
    assert [call["gradient"] for call in model.calls] == [True, False] * 3
    # Langevin, every step rejected: the state's gradient once, then one gradient at each proposal.
    model = Quadratic(1.0)
    _, stats = refine(model, d, x, t, frames, steps=3, step_size=1e4, noise=True, clamp="none",
                      normal_fn=seeded(x.shape), uniform_fn=uniforms((2, 4)))
    assert stats.accepted.tolist() == [0, 0]
    assert stats.gradient_evaluations.tolist() == [4, 4] and stats.energy_evaluations.tolist() == [0, 0]
    summary = mcmc.summarize([stats.per_video(0), stats.per_video(1)])
    assert summary["acceptance_rate"] == 0 and summary["mcmc_nfe_per_video"] == 4 and summary["videos"] == 2


def test_a_model_without_energy_is_refused():
    x, t, frames = frames_state()
    with pytest.raises(ConfigError, match="energy model"):
        mcmc.refine(lambda x, t, **kw: x, diffusion(), x, t, {}, frames, 1, 0.01)


# ----------------------------------------------------------------------------- the sampler

ENERGY_NET = dict(image_size=SIZE, num_channels=32, channel_mult="1,2", attention_resolutions="4", num_heads=2,
                  num_res_blocks=1, energy=True)


def random_energy_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model(ModelConfig(**{**ENERGY_NET, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


class IndependentGradient:
    """A plain model whose prediction is grad_x sum_k E_k of the wrapped network, computed here by a
    vector-Jacobian product of f: (x - f) - J^T (x - f) on latent frames (not through EnergyModel)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t, latent_mask=None, **kwargs):
        latent = latent_mask.view(*latent_mask.shape[:2], 1, 1, 1)
        with torch.enable_grad():
            f, pullback = vjp(lambda inp: self.net(inp, t, latent_mask=latent_mask, **kwargs), x)
            residual = (x - f) * latent
            (jt_residual,) = pullback(residual)
        return ((residual - jt_residual) * latent).detach()


def videos(B=2, T=8, seed=5):
    return torch.rand(B, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("preset", ["autoreg", "df-pyramid"])
def test_without_mcmc_an_energy_model_samples_as_a_plain_model_predicting_its_gradient(preset, one_thread):
    model = random_energy_model()
    d = diffusion(steps=6)
    scheme = Scheme.from_preset(preset, T=8, max_frames=6, n_obs=2, max_latent_frames=3, use_ddim=True)
    given = videos()
    out = sample_with_scheme(model, d, scheme, given, [video_generator(0, 0, i) for i in range(2)])
    plain = sample_with_scheme(IndependentGradient(model.net), d, scheme, given,
                               [video_generator(0, 0, i) for i in range(2)])
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :2], given[:, :2])


def expected_calls(scheme, num_timesteps):
    """(denoising calls, frame refinements) per video the sampler must make, written out from the plan and the
    noise-level matrices: a call per row in which some level changes, a refinement per latent frame whose
    level changes to one above 0 (still noisy)."""
    st = scheme.stage
    calls = refinements = 0
    for _, latent in scheme.stages():
        L = torch.as_tensor(noise_levels(st.scheduling_matrix, len(latent), st.sampling_steps or num_timesteps,
                                         st.uncertainty_scale))
        changes = L[1:] != L[:-1]
        calls += int(changes.any(dim=1).sum())
        refinements += int((changes & (L[1:] > 0)).sum())
    return calls, refinements


SCHEMES = [  # (prediction, scheme settings)
    ("eps", dict(sampling_scheme="autoreg", use_ddim=True)),
    ("x0", dict(sampling_scheme="autoreg", use_ddim=True)),
    ("v", dict(sampling_scheme="hierarchy-2", scheduling_matrix="pyramid", use_ddim=True)),
    ("eps", dict(sampling_scheme="autoreg", scheduling_matrix="trapezoid", stabilization_level=20, use_ddim=True,
                 eta=0.5)),
    ("v", dict(sampling_scheme="long-range", scheduling_matrix="autoregressive", stabilization_level=20)),  # DDPM
    ("eps", dict(sampling_scheme="df-pyramid", use_ddim=True)),  # DF's update, stabilization "df"
    ("v", dict(sampling_scheme="stabilized-autoreg")),  # DF's ancestral update
]


@pytest.mark.parametrize("kind, settings", SCHEMES,
                         ids=lambda s: s if isinstance(s, str) else "-".join(f"{v}" for v in s.values()))
def test_every_plan_and_schedule_refines_the_frames_that_moved(kind, settings, one_thread):
    model = random_energy_model()
    d = diffusion(kind, steps=4)
    settings = dict(settings)
    scheme = Scheme.from_preset(settings.pop("sampling_scheme"), T=8, max_frames=6, n_obs=2, max_latent_frames=3,
                                mcmc_steps=2, mcmc_step_size=0.01, **settings)
    given = videos()
    stats = mcmc.MCMCStats(2)
    with count_network_evaluations() as counter:
        out = sample_with_scheme(model, d, scheme, given, [video_generator(0, 0, i) for i in range(2)],
                                 mcmc_stats=stats)
    without = dataclasses.replace(scheme, stage=dataclasses.replace(scheme.stage, mcmc_steps=0))
    plain = sample_with_scheme(model, d, without, given, [video_generator(0, 0, i) for i in range(2)])
    assert torch.equal(out[:, :2], given[:, :2]) and torch.isfinite(out).all()
    assert not torch.equal(out, plain)  # the refinement changed the samples
    calls, refinements = expected_calls(scheme, d.num_timesteps)
    assert refinements > 0
    assert stats.proposed.tolist() == [2 * refinements] * 2
    assert 0 < stats.acceptance_rate() <= 1
    # NFE: each denoising call and each MCMC evaluation is one forward pass of the network (2 videos per call);
    # of those, the denoising calls and MCMC gradients also ran a backward pass.
    gradients, energies = int(stats.gradient_evaluations[0]), int(stats.energy_evaluations[0])
    assert stats.gradient_evaluations.tolist() == [gradients] * 2
    assert counter.video_calls == 2 * (calls + gradients + energies)
    assert counter.gradient_video_calls == 2 * (calls + gradients)


def test_guidance_combines_energies_like_predictions(one_thread):
    model = random_energy_model(cond_dim=2, cond_drop_prob=0.1)
    B, K = 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, K, 3, SIZE, SIZE, generator=g)
    obs = torch.zeros(B, K, 1, 1, 1)
    obs[:, 0] = 1
    kwargs = dict(x0=torch.randn(B, K, 3, SIZE, SIZE, generator=g), frame_indices=torch.arange(K).expand(B, K),
                  obs_mask=obs, latent_mask=1 - obs, cond=torch.randn(B, K, 2, generator=g))
    t = torch.tensor([100.0, 700.0])
    w = 2.5
    with torch.no_grad():
        prediction, energies = ClassifierFreeGuidance(model, w)(x, t, return_energy=True, **kwargs)
        cond_pred, cond_e = model(x, t, return_energy=True, **kwargs)
        null_pred, null_e = model(x, t, return_energy=True, drop_cond=torch.ones(B, dtype=torch.bool), **kwargs)
        plain = ClassifierFreeGuidance(model, w)(x, t, **kwargs)
    torch.testing.assert_close(energies, null_e + w * (cond_e - null_e))
    torch.testing.assert_close(prediction, null_pred + w * (cond_pred - null_pred), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prediction, plain)
    # A guided rollout with MCMC runs and refines.
    scheme = Scheme.from_preset("autoreg", T=8, max_frames=6, n_obs=2, max_latent_frames=3, use_ddim=True,
                                guidance_scale=w, mcmc_steps=1)
    stats = mcmc.MCMCStats(2)
    actions = torch.randn(2, 8, 2, generator=g)
    out = sample_video(model, diffusion(steps=4), videos(), 2, scheme.make_plan(), scheme.stage,
                       [video_generator(0, 0, i) for i in range(2)], conditions=Conditions(actions=actions),
                       mcmc_stats=stats)
    assert torch.isfinite(out).all() and stats.proposed.sum() > 0


def test_per_video_calls_carry_energies(one_thread):
    model = random_energy_model()
    x = torch.randn(2, 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50.0, 500.0])
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 1.0]])
    with torch.no_grad():
        batched = model(x, t, return_energy=True, energy_weights=weights)
        per_video = one_video_at_a_time(model)(x, t, return_energy=True, energy_weights=weights)
        energy_only = one_video_at_a_time(model)(x, t, return_energy=True, gradient=False)
    for a, b in zip(batched, per_video):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert energy_only[0] is None
    torch.testing.assert_close(energy_only[1], batched[1], atol=1e-5, rtol=1e-5)


def test_mcmc_settings_are_checked_named_and_settable_per_scheme():
    with pytest.raises(ConfigError, match="mcmc_steps"):
        Scheme.from_preset("autoreg", T=8, max_frames=6, mcmc_steps=-1)
    with pytest.raises(ConfigError, match="mcmc_step_size"):
        Scheme.from_preset("autoreg", T=8, max_frames=6, mcmc_steps=1, mcmc_step_size=0)
    with pytest.raises(ConfigError, match="mcmc_clamp"):
        Scheme.from_preset("autoreg", T=8, max_frames=6, mcmc_steps=1, mcmc_clamp="tight")
    scheme = Scheme.from_preset("autoreg", T=8, max_frames=6, mcmc_steps=5, mcmc_step_size=0.005, mcmc_noise=True)
    assert scheme.folder_name().endswith("_mcmc5x0.005_langevin")
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    assert "mcmc" not in Scheme.from_preset("autoreg", T=8, max_frames=6).folder_name()
    old = {k: v for k, v in scheme.to_dict().items() if not k.startswith("mcmc")}  # written before MCMC existed
    assert Scheme.from_dict(old).stage.mcmc_steps == 0
    request = SchemeRequest().with_spec("autoreg:mcmc_steps=5:mcmc_step_size=0.005:mcmc_noise=true")
    assert (request.sampling_scheme, request.settings) == (
        "autoreg", {"mcmc_steps": 5, "mcmc_step_size": 0.005, "mcmc_noise": True})
    with pytest.raises(ConfigError, match="mcmc_noise must be boolean"):
        SchemeRequest().with_spec("autoreg:mcmc_noise=maybe")

