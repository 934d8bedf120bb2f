"""Gaussian diffusion with per-frame timesteps and a latent mask.

Pure maths over a network passed in (improved-diffusion's design): the diffusion never
holds a model. Every method accepts timesteps of shape [B] (one t for the whole video) or
[B x T] (each frame its own t, Diffusion Forcing style). Only *latent* frames are noised,
denoised and counted in losses; every other frame passes through bit-for-bit unchanged.

Coefficients are computed once in float64 numpy and cast to float32 after indexing, as
FDM does, so FDM checkpoints give the same numbers.
"""

import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .loss_weights import frame_loss_weights
from .losses import LOG2, discretized_gaussian_log_likelihood, normal_kl


class ModelMeanType(enum.Enum):
    EPSILON = "epsilon"  # the network predicts the noise
    START_X = "x0"  # the network predicts the clean frames
    VELOCITY = "v"  # v = sqrt(abar) * eps - sqrt(1 - abar) * x0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    FIXED_SMALL = "fixed_small"  # posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (beta~_1 at t = 0)
    LEARNED_RANGE = "learned_range"  # interpolate log beta~_t .. log beta_t (improved DDPM)


class LossType(enum.Enum):
    MSE = "mse"
    RESCALED_MSE = "rescaled_mse"  # MSE + VLB * num_timesteps / 1000 (the hybrid loss, lambda = 0.001)
    KL = "kl"
    RESCALED_KL = "rescaled_kl"


# ----------------------------------------------------------------------------- schedules

def get_named_beta_schedule(name, num_diffusion_timesteps):
    """Betas of a named schedule, float64 [num_diffusion_timesteps]."""
    n = num_diffusion_timesteps
    if name == "linear":
        # DDPM's linear schedule, rescaled so any step count spans the same range.
        scale = 1000 / n
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if name == "cosine":
        # Improved DDPM, eq. 17: abar(t) = cos^2(((t/n + s) / (1 + s)) * pi/2), s = 0.008.
        return betas_for_alpha_bar(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    if name == "sigmoid":
        # The sigmoid schedule of Chen 2023 ("On the importance of noise scheduling"),
        # start -3, end 3, tau 1, as Diffusion Forcing's video configs use it.
        start, end, tau = -3.0, 3.0, 1.0
        t = np.linspace(0, n, n + 1, dtype=np.float64) / n
        sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        v_start, v_end = sig(start / tau), sig(end / tau)
        alphas_cumprod = (-sig((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
    raise ValueError(f"Unknown noise schedule '{name}'; choose linear, cosine or sigmoid.")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Betas that reproduce a continuous abar(t), t in [0, 1], clipped at max_beta."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


# ----------------------------------------------------------------------------- helpers

def extract(arr, t, shape):
    """arr[t] as float32, shaped to broadcast against a [B x T x ...] tensor of `shape`.

    t is [B] (same value for all frames) or [B x T] (one per frame). Negative entries
    (clean frames in a per-frame schedule) are clamped to 0; callers mask them out.
    """
    values = torch.from_numpy(arr).to(t.device)[t.clamp(min=0)].float()
    return values.reshape(*t.shape, *([1] * (len(shape) - t.dim())))


def per_frame(t, x):
    """t ([B] or [B x T]) reshaped to broadcast against x [B x T x C x H x W]."""
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))


def mean_over_latent(x, latent_mask):
    """Mean of x over each batch element's latent frames ([B x T x ...] -> [B])."""
    dims = list(range(1, x.dim()))
    if latent_mask is None:
        return x.mean(dim=dims)
    mask = latent_mask.expand_as(x)
    return (x * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)


def frame_means_over_latent(x, latent_mask):
    """Each frame's mean over its pixels, 0 outside latent_mask: [B x T x ...] -> [B x T].

    For losses that are weighted frame by frame (per-frame importance weights in training).
    """
    means = x.mean(dim=list(range(2, x.dim())))
    return means if latent_mask is None else means * latent_mask.reshape(means.shape)


def latent_mask_from(model_kwargs, latent_mask, x):
    """The mask of frames a sampler may change: explicit argument, else model_kwargs, else all."""
    if latent_mask is None and model_kwargs:
        latent_mask = model_kwargs.get("latent_mask")
    if latent_mask is None:
        return torch.ones(*x.shape[:2], 1, 1, 1, dtype=x.dtype, device=x.device)
    return latent_mask.to(x.dtype)


def model_output_tensor(out):
    """Networks may return the output or a tuple whose first element it is (FDM)."""
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------- diffusion

class GaussianDiffusion:
    """The maths of one diffusion chain.

    loss_weighting, snr_clip, cum_snr_decay: per-frame loss weights (see loss_weights);
    clip_noise: training noise is clamped to +-clip_noise (0: not clamped), as Diffusion
    Forcing does (models/diffusion.py, `forward` and `q_sample`).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=True,
                 loss_weighting="none", snr_clip=5.0, cum_snr_decay=0.96, clip_noise=0.0):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.loss_weighting = loss_weighting
        self.snr_clip = snr_clip
        self.cum_snr_decay = cum_snr_decay
        self.clip_noise = clip_noise

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t = 0; clip its log to the next value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # --- forward process

    def q_sample(self, x_start, t, noise=None, latent_mask=None):
        """Draw x_t ~ q(x_t | x_0) for the frames in `latent_mask` (all when None); other frames stay x_start."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )
        if latent_mask is None:
            return x_t
        return torch.where(latent_mask.bool(), x_t, x_start)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # --- conversions between parameterizations

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def predict_xstart_from_v(self, x_t, t, v):
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def velocity(self, x_start, t, noise):
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
        )

    def scale_timesteps(self, t):
        """Timesteps as the network sees them: float, in units of a 1000-step chain."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def call_model(self, model, x, t, model_kwargs):
        return model_output_tensor(model(x, self.scale_timesteps(t), **(model_kwargs or {})))

    # --- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                        model_output=None):
        """p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart (and model_output)."""
        if model_output is None:
            model_output = self.call_model(model, x, t, model_kwargs)
        C = x.shape[2]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if model_output.shape[2] != 2 * C:
                raise ValueError(
                    f"A learned-variance diffusion needs {2 * C} output channels per frame, got {model_output.shape[2]}."
                )
            model_output, var_values = model_output.split(C, dim=2)
            min_log = extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var = np.append(self.posterior_variance[1], self.betas[1:])
                log_var = np.log(var)
            else:
                var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
            variance = extract(var, t, x.shape).expand(x.shape)
            log_variance = extract(log_var, t, x.shape).expand(x.shape)

        def process(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process(model_output)
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            pred_xstart = process(self.predict_xstart_from_v(x, t, model_output))
        else:
            pred_xstart = process(self.predict_xstart_from_eps(x, t, model_output))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                 latent_mask=None, noise=None, generator=None):
        """One ancestral step x_t -> x_{t-1} on latent frames."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (per_frame(t, x) != 0).float()  # no noise on the last step
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        latent = latent_mask_from(model_kwargs, latent_mask, x).bool()
        return {"sample": torch.where(latent, sample, x), "pred_xstart": out["pred_xstart"]}

    def ddim_step(self, model, x, t, t_next, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                  latent_mask=None, eta=0.0, noise=None, generator=None):
        """One DDIM step from t to t_next (per frame; t_next = -1 means clean).

        Song et al. 2021, eq. 12, with eps re-derived from the (clipped) x0 prediction as
        improved-diffusion does. Frames whose t_next equals t, and non-latent frames, are
        returned unchanged.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_next = torch.where(
            per_frame(t_next, x) < 0, torch.ones_like(alpha_bar), extract(self.alphas_cumprod, t_next, x.shape)
        )
        sigma = eta * torch.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_next)
        sample = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_next)
            + torch.sqrt((1 - alpha_bar_next - sigma**2).clamp(min=0)) * eps
        )
        if eta > 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            sample = sample + sigma * noise
        moving = latent_mask_from(model_kwargs, latent_mask, x).bool()
        moving = moving & per_frame(t_next != t, x)
        return {"sample": torch.where(moving, sample, x), "pred_xstart": out["pred_xstart"]}

    # --- loops

    def sample_loop_progressive(self, model, shape, step, noise=None, model_kwargs=None, device=None,
                                progress=False, latent_mask=None, generator=None):
        """Yields the state after each step of the full chain (t = N-1 ... 0).

        `step(x, t)` performs one update; the initial noise only replaces latent frames of
        `x0` (if given in model_kwargs), so observed frames keep their clean values.
        """
        if device is None:
            device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
        if noise is None:
            noise = torch.randn(*shape, generator=generator, device=device)
        x = noise.to(device)
        x0 = (model_kwargs or {}).get("x0")
        if x0 is not None:
            latent = latent_mask_from(model_kwargs, latent_mask, x).bool()
            x = torch.where(latent, x, x0.to(x.dtype))
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices, disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(x, t)
            x = out["sample"]
            yield out

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, latent_mask=None, generator=None, callback=None):
        """Ancestral sampling; returns the final [B x T x C x H x W] sample."""

        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, latent_mask,
                                 generator=generator)

        return self._run(model, shape, step, noise, model_kwargs, device, progress, latent_mask, generator, callback)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, latent_mask=None, generator=None, callback=None):
        """DDIM sampling over this diffusion's (usually respaced) chain."""

        def step(x, t):
            return self.ddim_step(model, x, t, t - 1, clip_denoised, denoised_fn, model_kwargs, latent_mask, eta,
                                  generator=generator)

        return self._run(model, shape, step, noise, model_kwargs, device, progress, latent_mask, generator, callback)

    def _run(self, model, shape, step, noise, model_kwargs, device, progress, latent_mask, generator, callback):
        final = None
        for i, out in enumerate(self.sample_loop_progressive(model, shape, step, noise, model_kwargs, device,
                                                             progress, latent_mask, generator)):
            if callback is not None:
                callback({"i": i, **out})
            final = out["sample"]
        return final

    # --- training

    def training_noise(self, noise):
        """Training noise as the loss sees it: clamped to +-clip_noise when clip_noise > 0."""
        return noise.clamp(-self.clip_noise, self.clip_noise) if self.clip_noise > 0 else noise

    def snr(self, t):
        """abar / (1 - abar) of timesteps t (any shape), float64."""
        abar = torch.from_numpy(self.alphas_cumprod).to(t.device)[t.clamp(min=0)]
        return abar / (1 - abar)

    def loss_frame_weights(self, t, num_frames, known=None, in_sequence=None):
        """Per-frame loss weights [B x num_frames] (float32), or None when loss_weighting is 'none'.

        t: [B] or [B x num_frames]; known: bool [B x num_frames], frames shown clean (observed);
        in_sequence: bool [B x num_frames], frames of the running SNR (None: all; padding frames
        should be left out). See loss_weights for the rules.
        """
        if self.loss_weighting == "none":
            return None
        if t.dim() == 1:
            t = t[:, None].expand(-1, num_frames)
        objective = {ModelMeanType.EPSILON: "eps", ModelMeanType.START_X: "x0",
                     ModelMeanType.VELOCITY: "v"}[self.model_mean_type]
        weights = frame_loss_weights(self.loss_weighting, self.snr(t), objective, self.snr_clip,
                                     self.cum_snr_decay, in_sequence, known)
        return weights.float()

    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None, latent_mask=None,
                     model_output=None, per_frame_terms=False):
        """One term of the variational bound, in bits per dim, averaged over latent frames: [B]
        ([B x T] per frame with `per_frame_terms`, see frame_means_over_latent)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs=model_kwargs, model_output=model_output)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]) / LOG2
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"]) / LOG2
        # t = 0 contributes the decoder NLL; other steps the KL to the true posterior.
        at_zero = (per_frame(t, x_t) == 0).expand(x_t.shape)
        per_elem = torch.where(at_zero, nll, kl)
        reduce = frame_means_over_latent if per_frame_terms else mean_over_latent
        return {"output": reduce(per_elem, latent_mask), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, latent_mask=None,
                        per_frame_terms=False, frame_weights=None):
        """Loss terms per batch element ([B]) for timesteps t ([B] or [B x T]).

        per_frame_terms: terms per frame instead ([B x T], 0 outside latent_mask), for a
        caller that weights frames separately (per-frame importance sampling of t).
        frame_weights: [B x T] weights of each frame's squared error (loss_frame_weights),
        or None. They weight the MSE term only: "mse" stays the unweighted error, "loss" is
        the weighted one (plus the VLB term of a learned variance, which is a likelihood
        bound and keeps its own weighting). The noise is clamped (training_noise).

        Only latent frames are noised and counted. With a learned variance, the hybrid loss
        MSE + VLB * N / 1000 (improved DDPM's lambda = 0.001 for N = 1000), the VLB seeing the
        predicted mean through a stop-gradient.
        """
        model_kwargs = dict(model_kwargs or {})
        latent_mask = latent_mask_from(model_kwargs, latent_mask, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        noise = self.training_noise(noise)
        x_t = self.q_sample(x_start, t, noise, latent_mask)
        terms = {}
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            terms["loss"] = self.vb_terms_bpd(model, x_start, x_t, t, False, model_kwargs, latent_mask,
                                              per_frame_terms=per_frame_terms)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self.call_model(model, x_t, t, model_kwargs)
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            C = x_start.shape[2]
            mean_part, var_part = model_output.split(C, dim=2)
            frozen = torch.cat([mean_part.detach(), var_part], dim=2)
            terms["vb"] = self.vb_terms_bpd(None, x_start, x_t, t, False, latent_mask=latent_mask,
                                            model_output=frozen, per_frame_terms=per_frame_terms)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            model_output = mean_part
        target = {
            ModelMeanType.EPSILON: noise,
            ModelMeanType.START_X: x_start,
            ModelMeanType.VELOCITY: self.velocity(x_start, t, noise),
        }[self.model_mean_type]
        reduce = frame_means_over_latent if per_frame_terms else mean_over_latent
        squared_error = (target - model_output) ** 2
        terms["mse"] = reduce(squared_error, latent_mask)
        if frame_weights is None:
            terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        else:
            weighted = squared_error * per_frame(frame_weights.to(squared_error.dtype), squared_error)
            terms["loss"] = reduce(weighted, latent_mask) + terms.get("vb", 0.0)
        return terms
