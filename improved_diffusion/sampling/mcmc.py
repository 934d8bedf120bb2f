"""MCMC refinement with an energy model: a few energy-descent (or Langevin) steps after a denoising transition.

An energy model (models/energy.py, `--energy True`) predicts the gradient of a scalar energy, so its
samples can be refined by moving the latent frames downhill on that energy at their current noise
levels, as energy-based diffusion samplers do (Du et al. 2023, "Reduce, Reuse, Recycle": ULA / MALA
within the reverse process; the energy-diffusion trainer, after IRED (Du et al. 2024): a few
rejected-if-worse descent steps after every denoising step). `refine` runs `mcmc_steps` steps on the
slots it is given and leaves every other slot bit for bit; the stage sampler (sampler.py) calls it
after each transition on the latent frames that moved and are still noisy.

The potential, per frame k at its own (respaced) timestep t_k. The network's prediction is an eps, v or
x0 prediction, all affine in x at fixed t: eps_hat = A x + B * prediction with (A, B) = (0, 1) for
eps, (sigma, sqrt(abar)) for v and (1 / sigma, -sqrt(abar) / sigma) for x0 (sigma = sqrt(1 - abar)).
So with the model's per-frame energies E_k,

    U_k(x) = A_k / 2 * ||x_k||^2 + B_k * E_k(x)

is an energy in eps units: for an eps model U = E and grad U = eps_hat = -sigma * score (the step below
is exactly x <- x - a * grad_x E); for v and x0 models U is the same quantity, so one step size means
the same in every parameterization (descending E itself would climb the density of an x0 model, whose
B is negative). A step moves the refined frames along the gradient of sum_k U_k over them (the
model's energy_weights carry the B_k), clamps them, and keeps each frame's move only if its U_k did
not rise:

    x' = clamp(x - a * grad U(x)),    frame k keeps x'_k iff U_k(x') <= U_k(x).

Frames interact through attention, so a frame's acceptance is judged on its own energy with the other
frames at their proposed values: exact for energies that are sums of per-frame terms, an approximation
otherwise (judging the whole video at once would let one bad frame veto all the others).

Clamp (`mcmc_clamp`): "signal" bounds values to +-2 sqrt(abar_t), the energy trainer's bound. That bound
holds the signal part of x_t = sqrt(abar) x0 + sigma eps only (its chains are a few steps long on
normalised data); on our 1000-step chains it would erase the noise of every frame above small t (at
t = T, sqrt(abar) ~ 0.006). The default "signal_noise" bounds values to +-(2 sqrt(abar_t) + 6 sigma_t),
the trainer's bound plus room for the noise (6 standard deviations: DF's clip_noise), equal to the
trainer's as t -> 0 and never binding on an ordinary x_t. "none": no clamp.

Langevin (`mcmc_noise`): the proposal adds sqrt(2 a sigma_t) z. Since grad U = sigma_t * grad(-log p_t),
the drift -a grad U is a Langevin step of size eta = a sigma_t on -log p_t, whose matching noise is
sqrt(2 eta); sqrt(2 a) z (the noise of Langevin on U itself) would target p_t^sigma, far too hot at
small noise levels. Each frame's move is then accepted by Metropolis-Hastings (MALA) on -log p_t =
U / sigma_t + const, with the proposal's density in both directions, so the chain keeps p_t invariant
(per frame; up to the clamp and the frames' interaction). Uniforms and Gaussians come from each video's
own generator (sampler.py), so a video's chain does not depend on its batch.

Cost (counted in `MCMCStats` and by compare_schemes' forward hook): a gradient evaluation is one forward
and one backward pass of the network, an energy evaluation one forward pass. A descent step makes one
energy evaluation at the proposal and one gradient evaluation at the current state, except when the
previous step rejected every frame (the state, its energies and gradient are unchanged and reused);
so n steps cost n energy evaluations and between 1 and n gradient evaluations. A Langevin step makes
one gradient evaluation at the proposal (MALA needs the gradient there), plus one at the current state
when the previous step accepted some frames and rejected others: between n + 1 and 2n gradient
evaluations and no energy-only ones. NFE (network forward passes) = gradient + energy evaluations.
"""

import math

import torch

from ..diffusion.gaussian_diffusion import ModelMeanType, extract
from ..errors import ConfigError

SIGNAL_BOUND = 2.0  # the energy trainer's bound on values, in units of sqrt(abar_t)
NOISE_BOUND = 6.0  # room for the noise part, in units of sigma_t (Diffusion Forcing's clip_noise)


class MCMCStats:
    """Per-video counts of a batch's refinement [B] (long): frame steps proposed and accepted, evaluations."""

    FIELDS = ("proposed", "accepted", "gradient_evaluations", "energy_evaluations")

    def __init__(self, batch_size):
        for name in self.FIELDS:
            setattr(self, name, torch.zeros(batch_size, dtype=torch.long))

    def per_video(self, b):
        """Video b's counts as a JSON-able dict."""
        return {name: int(getattr(self, name)[b]) for name in self.FIELDS}

    def acceptance_rate(self):
        """Accepted over proposed frame steps of the whole batch (nan when nothing was proposed)."""
        proposed = int(self.proposed.sum())
        return int(self.accepted.sum()) / proposed if proposed else math.nan


def summarize(records):
    """Totals of per-video count dicts (`MCMCStats.per_video`), with the acceptance rate and per-video NFE."""
    totals = {name: sum(int(r.get(name, 0)) for r in records) for name in MCMCStats.FIELDS}
    totals["videos"] = len(records)
    totals["acceptance_rate"] = totals["accepted"] / totals["proposed"] if totals["proposed"] else None
    if records:
        totals["mcmc_nfe_per_video"] = (totals["gradient_evaluations"] + totals["energy_evaluations"]) / len(records)
    return totals


def potential_coefficients(diffusion, t, dtype=torch.float32):
    """(A, B, sigma) [B x K] of each slot at timesteps t (respaced indices >= 0): eps_hat = A x + B prediction."""
    abar = extract(diffusion.alphas_cumprod, t, t.shape).to(dtype)
    sigma = torch.sqrt(1 - abar)
    root = torch.sqrt(abar)
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        return torch.zeros_like(abar), torch.ones_like(abar), sigma
    if diffusion.model_mean_type == ModelMeanType.VELOCITY:
        return sigma, root, sigma
    return 1 / sigma, -root / sigma, sigma  # START_X


def clamp_bound(diffusion, t, clamp, dtype=torch.float32):
    """Bound on the refined values per slot [B x K] (None: no clamp); see the module docstring."""
    if clamp == "none":
        return None
    abar = extract(diffusion.alphas_cumprod, t, t.shape).to(dtype)
    bound = SIGNAL_BOUND * torch.sqrt(abar)
    if clamp == "signal_noise":
        bound = bound + NOISE_BOUND * torch.sqrt(1 - abar)
    return bound


def evaluate(model, diffusion, x, t, model_kwargs, weights, gradient):
    """(energies [B x K], prediction or None): one call of an energy model through the diffusion's time mapping.

    `model` is the callable the sampler uses (wrappers for guidance, precision, per-video calls pass the
    energy options through); weights [B x K] weight each frame's energy in the gradient.
    """
    captured = {}

    def call(x_, t_, **kwargs):
        out = model(x_, t_, return_energy=True, gradient=gradient, energy_weights=weights, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ConfigError("MCMC refinement needs an energy model (trained with --energy True); this model "
                              "returns a prediction, not an energy.")
        captured["energies"] = out[1]
        return out

    prediction = diffusion.call_model(call, x, t, model_kwargs)
    return captured["energies"], prediction


def refine(model, diffusion, x, t, model_kwargs, frames, steps, step_size, noise=False, clamp="signal_noise",
           normal_fn=None, uniform_fn=None, stats=None):
    """`steps` MCMC steps on the slots `frames` of x; returns the new x (every other slot unchanged).

    x [B x K x C x H x W]: a stage's slots; t [B x K]: the timestep (respaced index) each slot is shown at,
    >= 0 on `frames`; model_kwargs: the model call's masks, context and conditions (fixed during the
    refinement, so energies are compared on the same context); frames: bool [B x K]. noise: Langevin
    proposals with MALA acceptance (needs normal_fn() -> standard normal like x and uniform_fn() -> [B x K]
    uniforms); otherwise energy descent. stats: an MCMCStats to add the counts to.
    """
    if steps <= 0:
        return x
    device = x.device
    frames = frames.to(device).bool()
    if not frames.any():
        return x
    t = t.to(device)
    C = x.shape[2]
    as_frames = frames.view(*frames.shape, 1, 1, 1)
    A, Bcoef, sigma = potential_coefficients(diffusion, t.clamp(min=0), x.dtype)
    weights = Bcoef * frames.to(x.dtype)
    bound = clamp_bound(diffusion, t.clamp(min=0), clamp, x.dtype)
    a = float(step_size)
    counted = torch.ones(x.shape[0], dtype=torch.long)  # every video of the batch goes through each evaluation

    def potential(state, gradient):
        energies, prediction = evaluate(model, diffusion, state, t, model_kwargs, weights, gradient)
        if stats is not None:
            field = stats.gradient_evaluations if gradient else stats.energy_evaluations
            field += counted
        U = 0.5 * A * state.pow(2).flatten(2).sum(dim=2) + Bcoef * energies.to(x.dtype)
        if not gradient:
            return U, None
        grad = A.view(*A.shape, 1, 1, 1) * state + prediction[:, :, :C].to(x.dtype)
        return U, torch.where(as_frames, grad, torch.zeros_like(grad))

    def clamped(values):
        if bound is None:
            return values
        limit = bound.view(*bound.shape, 1, 1, 1)
        return torch.maximum(torch.minimum(values, limit), -limit)

    sigma5 = sigma.view(*sigma.shape, 1, 1, 1)
    current = None  # (U, grad U) at x, while they hold
    for _ in range(steps):
        if current is None:
            current = potential(x, True)
        U, grad = current
        move = -a * grad
        if noise:
            move = move + torch.sqrt(2 * a * sigma5) * normal_fn()
        proposal = torch.where(as_frames, clamped(x + move), x)
        if noise:
            U_new, grad_new = potential(proposal, True)
            forward = (proposal - x + a * grad).pow(2).flatten(2).sum(dim=2)
            backward = (x - proposal + a * grad_new).pow(2).flatten(2).sum(dim=2)
            log_alpha = (-(U_new - U) - (backward - forward) / (4 * a)) / sigma
            accept = torch.log(uniform_fn().to(device)) < log_alpha
        else:
            U_new, grad_new = potential(proposal, False)
            accept = U_new <= U  # NaN energies are rejected
        accept = accept & frames
        x = torch.where(accept.view(*accept.shape, 1, 1, 1), proposal, x)
        if stats is not None:
            stats.proposed += frames.sum(dim=1).cpu()
            stats.accepted += accept.sum(dim=1).cpu()
        accepted, proposed = int(accept.sum()), int(frames.sum())
        if accepted == proposed and grad_new is not None:
            current = (U_new, grad_new)  # x is the proposal: its potential is known
        elif accepted:
            current = None  # a new state: evaluate it at the next step
    return x
