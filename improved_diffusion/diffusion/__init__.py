"""Per-frame-timestep Gaussian diffusion: schedules, losses and their SNR weights, DDPM/DDIM steps, respacing."""

from .build import DiffusionConfig, create_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .loss_weights import LOSS_WEIGHTINGS
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["DiffusionConfig", "GaussianDiffusion", "LOSS_WEIGHTINGS", "SpacedDiffusion", "create_diffusion",
           "space_timesteps"]
