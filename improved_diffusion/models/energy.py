"""Energy-parameterized networks: the prediction is the gradient of a learned scalar energy.

`EnergyModel(net)` wraps any network of the package's model call
`net(x, timesteps, x0=, frame_indices=, obs_mask=, latent_mask=, cond=, y=, drop_cond=, ...)`
(FDM's UNet, DF's 3D-UNet) and is called the same way. The network's output f(x, t) (its first C
channels) is reduced to one scalar energy per frame,

    E_k(x, t) = 1/2 * || x_k - f_k(x, t) ||^2        (sum over the frame's C x H x W values),

counted only for latent frames (latent_mask), and the model's prediction (eps, v or x0, whatever the
diffusion was trained to predict) is the gradient of the total energy with respect to the input,

    prediction = d/dx sum_k E_k(x, t) = (x - f) - J_f(x, t)^T (x - f)        (on latent frames; 0 elsewhere)

computed with autograd. Frames interact through temporal attention, so a frame's prediction also
collects the pull of the other frames' energies: the prediction field is the gradient of ONE scalar
over the video, which is what makes energy descent and Metropolis corrections (sampling/mcmc.py)
meaningful. Observed frames are inputs only: the networks read them from x0 at obs_mask slots, so no
gradient reaches them and their prediction is 0.

Why this reduction (Salimans & Ho 2021, "Should EBMs model the energy or the score?", whose form
E = 1/2 ||x - f(x)||^2 we followed; Du et al. 2023, "Reduce, Reuse, Recycle", use energy-parameterized
diffusion models built on that line of work):

- it is bounded below (E >= 0), so descending it (MCMC refinement) cannot run off to -infinity, as
  the linear form <x, f(x)> can;
- it trains from the zero-initialised output layer both networks have: with f = 0 and J_f = 0 the
  prediction is x and the loss has a gradient. The squared-norm form E = 1/2 ||f(x)||^2 (IRED's,
  Du et al. 2024) has prediction J_f^T f = 0 there AND zero gradient for every parameter (a saddle),
  so a zero-initialised network would never move;
- at initialisation the model predicts x itself, the right eps at pure noise (x_T ~ eps) and the
  right x0 at no noise: the network learns a correction around the identity, as a residual.

Training: when the caller records gradients (training), the gradient is taken with create_graph so
the loss on the prediction trains the energy (double backward; attention then uses the math kernel of
scaled_dot_product_attention, the fused ones having no double backward). Under torch.no_grad (sampling,
validation, EMA previews) the gradient is still computed (torch.enable_grad inside) but no graph is
kept and the outputs are detached. Under autocast the network runs in 16 bits; the energy and the
gradient come back in x's dtype (float32).

Extra call options (ignored by plain networks, which take **unused):
- `return_energy=True` returns (prediction, energies [B x T]); with `gradient=False` the
  prediction is None and no backward pass is made (an energy-only evaluation, for MCMC acceptance).
- `energy_weights` [B x T]: the prediction is the gradient of sum_k w_k E_k instead of the sum over
  latent frames (MCMC descends a per-frame weighted potential, see sampling/mcmc.py).

A learned variance (out_channels 2 C) keeps its last C channels as the network gives them.
"""

import contextlib

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def _latent_flags(x, obs_mask, latent_mask):
    """Latent frames as float [B x T] (the networks' defaults: 1 - obs_mask, or every frame)."""
    B, T = x.shape[:2]
    if latent_mask is not None:
        return latent_mask.reshape(B, T).to(x.dtype)
    if obs_mask is not None:
        return 1 - obs_mask.reshape(B, T).to(x.dtype)
    return torch.ones(B, T, dtype=x.dtype, device=x.device)


class EnergyModel(nn.Module):
    """Call it like the network it wraps; see the module docstring. `net` stays reachable as `.net`."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    @property
    def config(self):
        return self.net.config

    def frame_energies(self, x, timesteps, obs_mask=None, latent_mask=None, **kwargs):
        """(energies [B x T] in x's dtype, 0 on non-latent frames; the network's extra output channels).

        Differentiable in x and in the parameters whenever the caller records gradients.
        """
        out = self.net(x, timesteps, obs_mask=obs_mask, latent_mask=latent_mask, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        C = x.shape[2]
        residual = x - out[:, :, :C].to(x.dtype)  # a 16-bit output (autocast) is promoted to x's dtype
        energies = 0.5 * residual.pow(2).flatten(2).sum(dim=2)
        return energies * _latent_flags(x, obs_mask, latent_mask), out[:, :, C:]

    def energy(self, x, timesteps, **kwargs):
        """Per-frame energies E(x, t) [B x T] (0 on non-latent frames), as the model call takes its arguments."""
        return self.frame_energies(x, timesteps, **kwargs)[0]

    def forward(self, x, timesteps, obs_mask=None, latent_mask=None, return_energy=False, gradient=True,
                energy_weights=None, **kwargs):
        """The prediction grad_x sum_k E_k [B x T x C_out x H x W] (0 on non-latent frames); see the module doc."""
        if not gradient:
            energies, _ = self.frame_energies(x, timesteps, obs_mask=obs_mask, latent_mask=latent_mask, **kwargs)
            return None, energies
        train = torch.is_grad_enabled()  # the caller's mode: keep the graph only when it records gradients
        # Training differentiates the gradient again; the fused attention kernels (flash, memory-efficient)
        # have no double backward, so attention then runs as plain matmuls and softmax.
        kernels = sdpa_kernel([SDPBackend.MATH]) if train else contextlib.nullcontext()
        with torch.enable_grad(), kernels:
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            energies, extra = self.frame_energies(x_in, timesteps, obs_mask=obs_mask, latent_mask=latent_mask,
                                                  **kwargs)
            latent = _latent_flags(x, obs_mask, latent_mask)
            weights = latent if energy_weights is None else energy_weights.to(energies.dtype) * latent
            (grad,) = torch.autograd.grad((energies * weights).sum(), x_in, create_graph=train)
        prediction = grad * latent.view(*latent.shape, 1, 1, 1)
        if extra.shape[2]:
            prediction = torch.cat([prediction, extra.to(x.dtype)], dim=2)
        if not train:
            prediction, energies = prediction.detach(), energies.detach()
        return (prediction, energies) if return_energy else prediction


def is_energy_model(model):
    """Whether `model` (possibly torch.compile'd) is an EnergyModel."""
    return isinstance(getattr(model, "_orig_mod", model), EnergyModel)
