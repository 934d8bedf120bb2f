"""Diffusion Forcing's denoising step and context display, per frame: what `stabilization="df"` runs.

Diffusion Forcing (buoyancy99/diffusion-forcing, algorithms/diffusion_forcing/models/diffusion.py)
samples with `Diffusion.sample_step`; these functions follow it on our diffusion's tables:

- `show_context`: every context frame (clean, level -1) is shown to the network at timestep
  t_stab = stabilization_level - 1 as sqrt(alpha_bar[t_stab]) * x, with zero noise on the DDIM path
  (`ddim_sample_step`) and with fresh noise, clamped to +-clip_noise, on the ancestral path
  (`ddpm_sample_step`).
- `predictions`: x0_hat and eps_hat from the network output (`model_predictions`). A pred_noise
  output is clamped to +-clip_noise and used as eps_hat itself; for pred_x0 and pred_v, eps_hat is
  derived from x0_hat. DF never clips x0_hat; `clip_denoised` adds our clipping to [-1, 1] (eps_hat
  is then derived from the clipped x0_hat, as improved-diffusion does).
- `ddim_step`: x_next = x0_hat * sqrt(ab_next) + eps_hat * sqrt(1 - ab_next - sigma^2) + sigma * noise,
  with sigma = eta * sqrt((1 - ab / ab_next) (1 - ab_next) / (1 - ab)), and ab_next = 1, sigma = 0
  when the next timestep is -1 (clean). The noise is standard normal clamped to +-clip_noise.
  (`ddim_sample_step`; the square root's argument is clamped at 0, which only matters for eta > 1
  where DF's would be NaN.)
- `ddpm_step`: the posterior mean plus exp(log_variance / 2) * noise, noise clamped, none at
  t = 0 (`ddpm_sample_step`).

Where this differs from `GaussianDiffusion.ddim_step` (improved-diffusion's update): that one
always re-derives eps from x0_hat, so a pred_noise network's output is not clamped, and it does not
clamp its noise. With clip_denoised=False, clip_noise=0 and eta=0 the two steps agree.

Frames whose timestep does not change are the caller's to keep; these functions return the update
for every frame.
"""

import torch

from ..diffusion.gaussian_diffusion import ModelMeanType, extract, per_frame


def clamp_noise(noise, clip_noise):
    """Noise clamped to +-clip_noise (DF clamps every Gaussian draw); 0 means no bound."""
    return noise.clamp(-clip_noise, clip_noise) if clip_noise else noise


def show_context(diffusion, x, t_stab, noise=None):
    """Context frames as DF shows them: q_sample at timestep t_stab ([B x T]) with `noise`, or zero noise."""
    scaled = extract(diffusion.sqrt_alphas_cumprod, t_stab, x.shape) * x
    if noise is None:
        return scaled
    return scaled + extract(diffusion.sqrt_one_minus_alphas_cumprod, t_stab, x.shape) * noise


def clamped_output(diffusion, model, x, t, model_kwargs, clip_noise):
    """The network's output; a pred_noise prediction (its first C channels) clamped to +-clip_noise."""
    out = diffusion.call_model(model, x, t, model_kwargs)
    if diffusion.model_mean_type != ModelMeanType.EPSILON or not clip_noise:
        return out
    C = x.shape[2]
    return torch.cat([clamp_noise(out[:, :, :C], clip_noise), out[:, :, C:]], dim=2)


def predictions(diffusion, x, t, output, clip_denoised):
    """(x0_hat, eps_hat) from a (clamped) network output, as DF's `model_predictions`."""
    model_output = output[:, :, : x.shape[2]]
    if diffusion.model_mean_type == ModelMeanType.EPSILON:
        x0 = diffusion.predict_xstart_from_eps(x, t, model_output)
    elif diffusion.model_mean_type == ModelMeanType.VELOCITY:
        x0 = diffusion.predict_xstart_from_v(x, t, model_output)
    else:
        x0 = model_output
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    if diffusion.model_mean_type == ModelMeanType.EPSILON and not clip_denoised:
        return x0, model_output
    return x0, diffusion.predict_eps_from_xstart(x, t, x0)


def ddim_step(diffusion, model, x, t, t_next, model_kwargs, eta=0.0, clip_noise=0.0, clip_denoised=False,
              noise=None):
    """DF's DDIM update of every frame from t to t_next ([B x T]; -1: clean); returns (x_next, x0_hat).

    noise: standard normal like x (clamped here), needed when eta > 0.
    """
    x0, eps = predictions(diffusion, x, t, clamped_output(diffusion, model, x, t, model_kwargs, clip_noise),
                          clip_denoised)
    clean_next = per_frame(t_next, x) < 0
    ab = extract(diffusion.alphas_cumprod, t, x.shape)
    ab_next = torch.where(clean_next, torch.ones_like(ab), extract(diffusion.alphas_cumprod, t_next, x.shape))
    sigma = eta * torch.sqrt((1 - ab / ab_next) * (1 - ab_next) / (1 - ab))
    sigma = torch.where(clean_next, torch.zeros_like(sigma), sigma)
    x_next = x0 * torch.sqrt(ab_next) + eps * torch.sqrt((1 - ab_next - sigma**2).clamp(min=0))
    if eta > 0:
        x_next = x_next + sigma * clamp_noise(noise, clip_noise)
    return x_next, x0


def ddpm_step(diffusion, model, x, t, model_kwargs, noise, clip_noise=0.0, clip_denoised=False):
    """DF's ancestral update of every frame from t to t - 1 ([B x T]); returns (x_next, x0_hat)."""
    output = clamped_output(diffusion, model, x, t, model_kwargs, clip_noise)
    out = diffusion.p_mean_variance(model, x, t, clip_denoised, model_kwargs=model_kwargs, model_output=output)
    nonzero = (per_frame(t, x) > 0).float()
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * clamp_noise(noise, clip_noise), \
        out["pred_xstart"]
