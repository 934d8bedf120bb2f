"""What a user asks a checkpoint to sample, and the Scheme it becomes once the checkpoint fills the rest.

A `SchemeRequest` holds a preset name, the video's geometry (-1: the checkpoint's value), the plan
options and the stage settings the user gave (settings.py; those left out take the checkpoint's value
where it has one, `sampler_defaults`, else the preset's). `scheme_for_checkpoint(config, request)`
turns it into a validated Scheme before any model is loaded. Scripts build a request from their
flags (`add_request_flags`, `SchemeRequest.from_args`); compare_schemes.py's scheme specs,
"stabilized-autoreg:stabilization_level=50:chunk_size=2", are requests too (`with_spec`).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..checkpoints import df_to_config, read_df_checkpoint, read_df_config, read_model_checkpoint
from ..cli import add_dataclass_args, dataclass_from_dict
from ..diffusion import DiffusionConfig
from ..errors import ConfigError
from .sampler import stabilization_shown_at
from .scheme import PRESETS, Scheme
from .settings import FIELDS, RENAMED, add_stage_flags, given_settings, parse_setting

DEFAULT = -1  # a size flag's "use the default"


@dataclass(frozen=True)
class SchemeRequest:
    """A preset, its geometry and plan options, and the stage settings given (the rest: checkpoint, preset)."""

    sampling_scheme: str = field(default="autoreg", metadata={
        "choices": tuple(PRESETS), "help": "a frame plan, or a preset of plan and noise schedule"})
    T: int = field(default=DEFAULT, metadata={"help": "length of the sampled video (-1: the training T)"})
    n_obs: int = field(default=DEFAULT, metadata={
        "help": "given frames at the start of each video (-1: max_frames - max_latent_frames)"})
    max_frames: int = field(default=DEFAULT, metadata={"help": "frames per stage (-1: the training max_frames)"})
    max_latent_frames: int = field(default=DEFAULT, metadata={"help": "new frames per stage (-1: max_frames // 2)"})
    chunk_size: Optional[int] = field(default=None, metadata={
        "type": int, "per_scheme": True,
        "help": "> 0: sliding window (window = max_frames) generating this many frames per stage"})
    optimality: Optional[str] = field(default=None, metadata={
        "type": str, "per_scheme": True, "help": "optimal schedule file (stage -> observed frames)"})
    timestep_respacing: str = field(default="", metadata={
        "help": "respace the diffusion's chain, e.g. 50 or ddim50 (default: every training step)"})
    settings: dict = field(default_factory=dict)  # stage settings given: {name: value}, settings.py

    @classmethod
    def from_args(cls, args):
        """The request a command line's flags (`add_request_flags`) make."""
        return dataclass_from_dict(cls, vars(args)).with_settings(**given_settings(args))

    def with_settings(self, **settings):
        """This request with more stage settings given (they win over the ones given before)."""
        return dataclasses.replace(self, settings={**self.settings, **settings})

    def with_spec(self, spec):
        """This request for the scheme spec "name[:key=value...]": a preset and its own settings; ConfigError."""
        name, *pairs = [part.strip() for part in spec.split(":")]
        if name not in PRESETS:
            raise ConfigError(f"Unknown sampling scheme {name!r}; valid names are {', '.join(PRESETS)}.")
        plan_options, settings = {}, {}
        for pair in pairs:
            key, sep, value = (part.strip() for part in pair.partition("="))
            key = RENAMED.get(key, key)
            if not sep or key not in SPEC_SETTINGS:
                raise ConfigError(f"Scheme {spec!r}: {pair!r} is not a setting=value override; settings are "
                                  f"{', '.join(SPEC_SETTINGS)}.")
            if key in PLAN_OPTIONS:
                try:
                    plan_options[key] = PLAN_OPTIONS[key](value)
                except ValueError:
                    raise ConfigError(f"Scheme {spec!r}: {key} must be {PLAN_OPTIONS[key].__name__}, "
                                      f"got {value!r}.") from None
                continue
            try:
                settings[key] = parse_setting(key, value)
            except ConfigError as e:
                raise ConfigError(f"Scheme {spec!r}: {e}") from None
        return dataclasses.replace(self, sampling_scheme=name, **plan_options).with_settings(**settings)


PLAN_OPTIONS = {f.name: f.metadata["type"] for f in dataclasses.fields(SchemeRequest) if f.metadata.get("per_scheme")}
SPEC_SETTINGS = (*PLAN_OPTIONS, *FIELDS)  # what a scheme spec may set


def add_request_flags(parser, overrides=None, only=None, required=()):
    """The request's flags (all, or those in `only`), then one per stage setting (default None)."""
    add_dataclass_args(parser, SchemeRequest, overrides=overrides, required=required,
                       only=[f.name for f in dataclasses.fields(SchemeRequest) if f.name != "settings"]
                       if only is None else only)
    add_stage_flags(parser)


def size_flag(flag, value, default, minimum=1):
    """`value`, or `default` when it is -1 or None; anything else below `minimum` is a ConfigError."""
    if value is None or value == DEFAULT:
        return default
    if value < minimum:
        raise ConfigError(f"--{flag} must be at least {minimum} (or -1 for the default), got {value}.")
    return value


def checkpoint_config(checkpoint_path, df_config=None):
    """(flat config, file contents) of a checkpoint, read once and before any model is built.

    With `df_config` the checkpoint is DF's (its file holds weights, no config) and the config is
    DF's translated to ours (`checkpoints.df_to_config`); otherwise it is ours or FDM's.
    """
    if df_config is None:
        data = read_model_checkpoint(checkpoint_path)
        return dict(data["config"]), data
    config = df_to_config(read_df_config(df_config))
    return config, read_df_checkpoint(checkpoint_path)


def sampler_defaults(config):
    """Stage settings a checkpoint's config implies, for the ones the user leaves unset.

    clip_noise (ours and DF's) bounds the sampler's Gaussian draws as it bounded training's. A DF
    config (`sampling_timesteps` present) asks for DF's sampler, as DF's `Diffusion` reads it
    (algorithms/diffusion_forcing/models/diffusion.py): stabilization "df" at stabilization_level,
    eta = ddim_sampling_eta, sampling_timesteps levels, DDIM when they are fewer than the timesteps
    (`is_ddim_sampling`), x0_hat never clipped.
    """
    defaults = {}
    if config.get("clip_noise"):
        defaults["clip_noise"] = float(config["clip_noise"])
    if "sampling_timesteps" in config:
        S, N = int(config["sampling_timesteps"]), int(config.get("diffusion_steps", 1000))
        level = int(config.get("stabilization_level", 0))
        defaults.update(stabilization="df" if level >= 1 else "generated", stabilization_level=level,
                        eta=float(config.get("ddim_sampling_eta", 0.0)), sampling_steps=S, use_ddim=S < N,
                        clip_denoised=False)
    return defaults


def scheme_for_checkpoint(config, request):
    """The validated Scheme a SchemeRequest asks of a checkpoint whose flat config is `config`.

    -1 sizes take the checkpoint's values; stage settings the request leaves out take
    `sampler_defaults(config)`, then the preset's. max_frames may not exceed the checkpoint's: the
    model never saw more frames at once.
    """
    settings = {**sampler_defaults(config), **{k: v for k, v in request.settings.items() if v is not None}}
    trained_K = config.get("max_frames")
    K = size_flag("max_frames", request.max_frames, int(trained_K or 20))
    if trained_K and K > int(trained_K):
        raise ConfigError(f"--max_frames {K} exceeds the {trained_K} frames the checkpoint was trained with.")
    T = size_flag("T", request.T, int(config.get("T") or DEFAULT))
    if T == DEFAULT:
        raise ConfigError("the checkpoint does not record a video length; pass --T.")
    n_obs = request.n_obs
    if n_obs not in (None, DEFAULT) and n_obs >= T:
        raise ConfigError(f"--n_obs {n_obs} given frames leave none to generate in a video of --T {T} frames; "
                          "pass a smaller --n_obs (video_sample.py's default is FDM's 36) or a larger --T.")
    scheme = Scheme.from_preset(
        request.sampling_scheme, T=T, max_frames=K, n_obs=size_flag("n_obs", n_obs, None, minimum=0),
        max_latent_frames=size_flag("max_latent_frames", request.max_latent_frames, None),
        chunk_size=request.chunk_size, optimality=request.optimality,
        timestep_respacing=request.timestep_respacing,
        diffusion_config=dataclass_from_dict(DiffusionConfig, config), **settings)
    if scheme.stage.mcmc_steps and not config.get("energy"):
        raise ConfigError(f"--mcmc_steps {scheme.stage.mcmc_steps} refines samples by descending the model's energy, "
                          "but this checkpoint was trained without --energy True, so it has no energy; pass "
                          "--mcmc_steps 0.")
    return scheme


def stabilization_shown(scheme, config):
    """(training-chain timestep the scheme shows stabilized frames at, or None when off; a warning or None).

    A respaced chain keeps only some timesteps (ddim20 of 1000: 0, 50, 100, ...), so a level between
    two of them is rounded down: with ddim20, levels 1 to 50 all show frames at timestep 0 and give
    identical samples. The warning says so and how to get the level asked for.
    """
    level = scheme.stage.stabilization_level
    if not level:
        return None, None
    shown = stabilization_shown_at(scheme.diffusion(dataclass_from_dict(DiffusionConfig, config)), level)
    if shown == level - 1:
        return shown, None
    return shown, (f"warning: stabilization_level {level} asks for timestep {level - 1}, but the respaced chain "
                   f"(--timestep_respacing {scheme.timestep_respacing}) does not keep it, so stabilized frames are "
                   f"shown at timestep {shown}; use --sampling_steps with --use_ddim True instead of "
                   "--timestep_respacing to show them at the level asked for.")
