"""The stage settings of a sampling scheme, each declared once: its field, default, help, check and name.

Everything a user can set about how a stage's frames are denoised is one field of `StageSettings`,
made with `setting(...)`: the default means "off", `help` is the flag's help text, `check` the
condition a value must meet, `choices` the allowed names and `folder` the part of a results folder's
name that the setting writes when it is on. From that one declaration come

- the flags of video_sample.py and compare_schemes.py (`add_stage_flags`, default None: the
  checkpoint's or the preset's value),
- compare_schemes.py's per-scheme overrides, "autoreg:guidance_scale=3" (`parse_setting`),
- the check before any model is loaded (`check_settings`),
- the results folder's name (`folder_suffix`, in field order),
- sampling_config.json and the scheme's JSON (`dataclasses.asdict`, read back by `settings_from_dict`).

To add a setting: add a field here with `setting(...)`, and test it in test_settings.py. Checks that
involve several settings or the diffusion are written out in `check_settings`.

`scheduling_matrix` was called `noise_schedule` until the name was given back to the diffusion's
beta schedule (video_train.py's --noise_schedule); `RENAMED` reads the old name in JSON and
keyword arguments, and video_sample.py's --noise_schedule still works, with a one-line warning.
"""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

from ..cli import str2bool
from ..errors import ConfigError
from .noise_schedules import noise_schedules

STABILIZATIONS = ("generated", "df")
MCMC_CLAMPS = ("signal_noise", "signal", "none")  # bounds on MCMC-refined values, see mcmc.py
RENAMED = {"noise_schedule": "scheduling_matrix"}  # old name -> name


def setting(default, help, check=None, choices=None, folder=None):
    """A StageSettings field. check: (predicate of the value, what a value must be); folder: settings -> name part."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "folder": folder})


def finite_at_least(low):
    return lambda v: math.isfinite(v) and v >= low


def finite_above(low):
    return lambda v: math.isfinite(v) and v > low


def whole_number(v):
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) and v >= 0


def schedule_part(s):
    return "" if s.scheduling_matrix == "full_sequence" else f"_{s.scheduling_matrix}{s.uncertainty_scale:g}"


def stabilization_part(s):
    if s.stabilization == "df":
        return f"_dfstab{s.stabilization_level}"
    return f"_stab{s.stabilization_level}" if s.stabilization_level else ""


def mcmc_part(s):
    if not s.mcmc_steps:
        return ""
    name = f"_mcmc{s.mcmc_steps}x{s.mcmc_step_size:g}" + ("_langevin" if s.mcmc_noise else "")
    return name + ("" if s.mcmc_clamp == "signal_noise" else f"_clamp-{s.mcmc_clamp}")


@dataclass(frozen=True)
class StageSettings:
    """How one stage's latent frames are denoised (sampler.py reads these; its docstring has the details).

    stabilization names how observed frames are shown and which update is used: "generated" (ours):
    only observed frames the model generated are stabilized, noised with fresh noise; improved-diffusion's
    DDIM/DDPM update. "df" (Diffusion Forcing's `sample_step`): every observed frame, given ones
    included, is shown at timestep k - 1 scaled by sqrt(alpha_bar) with zero noise (DDIM); DF's update
    (df_step.py), which clamps a pred_noise output and every noise draw to +-clip_noise.
    """

    scheduling_matrix: str = setting(
        "full_sequence", choices=tuple(noise_schedules), folder=schedule_part,
        help="how the new frames' noise levels fall within a stage (Diffusion Forcing's name): full_sequence "
             "(together, FDM's), pyramid, autoregressive, trapezoid (default: the scheme's)")
    uncertainty_scale: float = setting(
        1.0, check=(finite_at_least(0), "a finite number >= 0"),
        help="pyramid/trapezoid: noise levels a frame lags behind the one before it (default 1)")
    stabilization: str = setting(
        "generated", choices=STABILIZATIONS, folder=stabilization_part,
        help="generated: stabilize only frames the model generated, with fresh noise (ours); df: every observed "
             "frame, scaled without noise, with DF's update (default: df for df-* presets and DF checkpoints)")
    stabilization_level: int = setting(
        0, check=(lambda v: v >= 0, "0 (off) or positive"),
        help="show observed frames at timestep k - 1 of the training chain (0: off; default: the scheme's, or "
             "the DF config's)")
    sampling_steps: int = setting(
        0, check=(lambda v: v >= 0, "0 (the diffusion's steps) or positive"),
        folder=lambda s: f"_steps{s.sampling_steps}" if s.sampling_steps else "",
        help="noise levels per stage (0: the diffusion's (respaced) steps; default 0, a DF config's "
             "sampling_timesteps)")
    use_ddim: bool = setting(
        False, folder=lambda s: ("_ddim" if s.eta == 0 else f"_ddim{s.eta:g}") if s.use_ddim else "",
        help="DDIM updates (default False; with a DF config, True when sampling_steps < its timesteps)")
    eta: float = setting(
        0.0, check=(finite_at_least(0), "a finite number >= 0"),
        help="DDIM's eta (default 0, a DF config's ddim_sampling_eta)")
    clip_noise: float = setting(
        0.0, check=(finite_at_least(0), "0 (no bound) or a positive number"),
        folder=lambda s: f"_clipnoise{s.clip_noise:g}" if s.clip_noise else "",
        help="clamp the sampler's Gaussian noise (and a pred_noise output under df) to +-this (0: off; default: "
             "the checkpoint's)")
    clip_denoised: bool = setting(
        True, folder=lambda s: "" if s.clip_denoised else "_noclip",
        help="clip x0 predictions to [-1, 1] (default True; False for df-* presets and DF checkpoints)")
    guidance_scale: float = setting(
        1.0, check=(finite_at_least(0), "a finite number >= 0 (1: no guidance)"),
        folder=lambda s: f"_cfg{s.guidance_scale:g}" if s.guidance_scale != 1 else "",
        help="classifier-free guidance scale w: uncond + w (cond - uncond) on the network's output (1: off; needs "
             "a model trained with --cond_drop_prob > 0)")
    # MCMC refinement of an energy model (mcmc.py): after each transition, mcmc_steps steps of size
    # mcmc_step_size on the latent frames that moved and are still noisy; 0 steps: off.
    mcmc_steps: int = setting(
        0, check=(whole_number, "0 (off) or a positive integer"), folder=mcmc_part,
        help="energy checkpoints (--energy True): MCMC steps on the latent frames after every denoising "
             "transition (default 0: off)")
    mcmc_step_size: float = setting(
        0.01, check=(finite_above(0), "a finite number > 0"),
        help="step size a of x <- x - a grad E (in the energy's eps units; default 0.01)")
    mcmc_noise: bool = setting(
        False, help="True: Langevin proposals (noise sqrt(2 a sigma_t)) with Metropolis-Hastings acceptance; "
                    "default False: energy descent, a frame's step undone when it raises its energy")
    mcmc_clamp: str = setting(
        "signal_noise", choices=MCMC_CLAMPS,
        help="bound on refined values: signal_noise (default) +-(2 sqrt(abar_t) + 6 sigma_t); signal: "
             "+-2 sqrt(abar_t), the energy trainer's (erases noise at large t); none")


FIELDS = {f.name: f for f in dataclasses.fields(StageSettings)}


def canonical(values):
    """`values` (a dict of settings) with old setting names replaced by their new ones."""
    return {RENAMED.get(k, k): v for k, v in values.items()}


def settings_from_dict(values, base=None):
    """StageSettings from the entries of `values` that are settings (old names read too), over `base`'s values.

    Other entries are ignored, so a sampling_config.json can be passed whole; settings it lacks
    (written before they existed) take base's value, by default the field's default.
    """
    values = {k: typed(k, v) for k, v in canonical(values).items() if k in FIELDS}
    return dataclasses.replace(base or StageSettings(), **values)


def typed(name, value):
    """A number given for a float setting as a float, a 0/1 given for a boolean one as a bool; else as it is."""
    kind = FIELDS[name].type
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, int):
        return bool(value)
    return value


def check_value(name, value):
    """Raise a one-sentence ConfigError unless `value` is allowed for the setting `name`."""
    meta = FIELDS[name].metadata
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"unknown {name} {value!r}; valid names are {', '.join(meta['choices'])}.")
    if meta["check"] is not None:
        ok, requirement = meta["check"]
        try:
            allowed = ok(value)
        except TypeError:
            allowed = False
        if not allowed:
            raise ConfigError(f"{name} must be {requirement}, got {value}.")


def training_steps(diffusion):
    """Length of the chain the model was trained on (before respacing)."""
    return getattr(diffusion, "original_num_steps", diffusion.num_timesteps)


def check_settings(settings, diffusion=None):
    """Raise a one-sentence ConfigError for settings that cannot be sampled; with `diffusion`, for it."""
    for name in FIELDS:
        check_value(name, getattr(settings, name))
    if settings.stabilization == "df" and settings.stabilization_level < 1:
        raise ConfigError("stabilization 'df' shows observed frames at timestep stabilization_level - 1, so it "
                          f"needs stabilization_level >= 1, got {settings.stabilization_level}; pass "
                          "--stabilization generated to show them clean.")
    if diffusion is None:
        return
    N = diffusion.num_timesteps
    S = settings.sampling_steps or N
    if not 1 <= S <= N:
        raise ConfigError(f"sampling_steps must be between 1 and the diffusion's {N} (respaced) steps, got {S}.")
    if S < N and not settings.use_ddim:
        raise ConfigError(f"sampling_steps={S} skips some of the diffusion's {N} steps, which only DDIM can do; "
                          "pass --use_ddim True, or --timestep_respacing instead of --sampling_steps.")
    if settings.stabilization_level > training_steps(diffusion):
        raise ConfigError(f"stabilization_level must be between 0 (off) and the {training_steps(diffusion)} "
                          f"training diffusion steps, got {settings.stabilization_level}.")


def folder_suffix(settings):
    """The part of a results folder's name that the settings which are on write, in field order."""
    return "".join(meta["folder"](settings) for meta in (f.metadata for f in FIELDS.values()) if meta["folder"])


def parse_setting(name, text):
    """The value of setting `name` written as `text` ("3", "true", "pyramid"), typed as its field; ConfigError."""
    name = RENAMED.get(name, name)
    if name not in FIELDS:
        raise ConfigError(f"{name!r} is not a stage setting; settings are {', '.join(FIELDS)}.")
    kind = FIELDS[name].type
    try:
        return str2bool(text) if kind is bool else kind(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{name} must be {'boolean' if kind is bool else kind.__name__}, got {text!r}.") from None


class DeprecatedName(argparse.Action):
    """An old flag name: stores its value under the new name and says so in one line on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is now --{self.dest}; the old name will be removed.",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_stage_flags(parser):
    """One --flag per stage setting, default None (the checkpoint's or the preset's value), plus old names."""
    for name, f in FIELDS.items():
        kind = str2bool if f.type is bool else f.type
        parser.add_argument(f"--{name}", default=None, type=kind, choices=f.metadata["choices"],
                            help=f.metadata["help"])
    for old, new in RENAMED.items():
        parser.add_argument(f"--{old}", dest=new, action=DeprecatedName, type=FIELDS[new].type,
                            choices=FIELDS[new].metadata["choices"], help=f"old name of --{new}")


def given_settings(args):
    """{setting: value} of the stage flags given on a command line (parsed by add_stage_flags)."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
