"""The diffusion's flags (FDM's names) and the (respaced) diffusion they build."""

from dataclasses import dataclass

from ..errors import ConfigError
from . import gaussian_diffusion as gd
from .loss_weights import LOSS_WEIGHTINGS
from .respace import SpacedDiffusion, space_timesteps


NOISE_SCHEDULES = ("linear", "cosine", "sigmoid")


@dataclass
class DiffusionConfig:
    """FDM's diffusion flags with FDM's defaults (script_util.model_and_diffusion_defaults), then ours.

    Ours: predict_v; Diffusion Forcing's training objective: per-frame loss weights
    (loss_weighting, snr_clip, cum_snr_decay; see loss_weights, defaults DF's, except that
    DF's video config sets cum_snr_decay 0.96 and its base config 0.98) and clip_noise, the
    bound on the Gaussian noise of training (and of a sampler's initial noise). clip_noise 0
    means no bound: FDM's behaviour, and what a checkpoint without the field gets. DF's
    default, 20, bounds nothing in practice either; its video config uses 6.
    """

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
    loss_weighting: str = "none"  # none | min_snr | fused_snr
    snr_clip: float = 5.0
    cum_snr_decay: float = 0.96
    clip_noise: float = 0.0  # 0: the noise is not clamped

    def validate(self):
        """Raise ConfigError naming the first flag no diffusion can be built with."""
        if self.diffusion_steps < 1:
            raise ConfigError(f"--diffusion_steps must be a positive integer, got {self.diffusion_steps}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(f"--noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, "
                              f"got '{self.noise_schedule}'.")
        if self.predict_xstart and self.predict_v:
            raise ConfigError("Choose at most one of --predict_xstart and --predict_v.")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"--loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                              f"got '{self.loss_weighting}'.")
        if not self.snr_clip > 0:
            raise ConfigError(f"--snr_clip must be positive, got {self.snr_clip}.")
        if not 0 <= self.cum_snr_decay <= 1:
            raise ConfigError(f"--cum_snr_decay must be in [0, 1], got {self.cum_snr_decay}.")
        if not self.clip_noise >= 0:
            raise ConfigError(f"--clip_noise must be 0 (no clamping) or positive, got {self.clip_noise}.")
        if self.loss_weighting != "none" and self.use_kl:
            raise ConfigError(f"--loss_weighting {self.loss_weighting} weights the MSE term, which --use_kl True "
                              f"does not have; use --use_kl False or --loss_weighting none.")


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
        loss_weighting=cfg.loss_weighting,
        snr_clip=cfg.snr_clip,
        cum_snr_decay=cfg.cum_snr_decay,
        clip_noise=cfg.clip_noise,
    )
