"""Per-frame-timestep Gaussian diffusion: schedules, losses, DDPM/DDIM steps, respacing."""

from .build import DiffusionConfig, create_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["DiffusionConfig", "GaussianDiffusion", "SpacedDiffusion", "create_diffusion", "space_timesteps"]
