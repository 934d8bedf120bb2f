"""The diffusion's flags (FDM's names) and the (respaced) diffusion they build."""

from dataclasses import dataclass

from ..errors import ConfigError
from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps


NOISE_SCHEDULES = ("linear", "cosine", "sigmoid")


@dataclass
class DiffusionConfig:
    """FDM's diffusion flags with FDM's defaults (script_util.model_and_diffusion_defaults), plus predict_v."""

    diffusion_steps: int = 1000
    noise_schedule: str = "linear"  # linear | cosine | sigmoid
    timestep_respacing: str = ""  # "" | "250" | "10,10,10" | "ddim25"
    learn_sigma: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    predict_v: bool = False
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True

    def validate(self):
        """Raise ConfigError naming the first flag no diffusion can be built with."""
        if self.diffusion_steps < 1:
            raise ConfigError(f"--diffusion_steps must be a positive integer, got {self.diffusion_steps}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(f"--noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, "
                              f"got '{self.noise_schedule}'.")
        if self.predict_xstart and self.predict_v:
            raise ConfigError("Choose at most one of --predict_xstart and --predict_v.")


def create_diffusion(cfg: DiffusionConfig, timestep_respacing=None):
    """The diffusion `cfg` describes, respaced to `timestep_respacing` (None: cfg's own)."""
    cfg.validate()
    respacing = cfg.timestep_respacing if timestep_respacing is None else timestep_respacing
    if cfg.use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif cfg.rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if cfg.predict_v:
        mean_type = gd.ModelMeanType.VELOCITY
    elif cfg.predict_xstart:
        mean_type = gd.ModelMeanType.START_X
    else:
        mean_type = gd.ModelMeanType.EPSILON
    if cfg.learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if cfg.sigma_small else gd.ModelVarType.FIXED_LARGE
    try:
        kept = space_timesteps(cfg.diffusion_steps, respacing or [cfg.diffusion_steps])
        betas = gd.get_named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    except ValueError as e:
        raise ConfigError(f"--timestep_respacing '{respacing}' does not fit --diffusion_steps "
                          f"{cfg.diffusion_steps}: {e}") from None
    return SpacedDiffusion(
        use_timesteps=kept,
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=cfg.rescale_timesteps,
    )
