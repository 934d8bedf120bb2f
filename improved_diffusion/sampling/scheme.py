"""A sampling scheme as one object: frame plan x within-stage noise schedule x stabilization.

A `Scheme` holds everything, besides the checkpoint, the data and the seed, that decides what a
sampling run produces: the frame plan and its geometry (T, n_obs, max_frames, step size, optimal
schedule file), the within-stage settings (`StageSettings`: noise schedule, stabilization, number
of noise levels, DDIM) and the diffusion's respacing. It is

- built from a registry name plus overrides (`Scheme.from_preset`; the registry is `PRESETS`),
- checked before any model is loaded (`validate`; with a `DiffusionConfig` also against the diffusion),
- saved as flat JSON beside the samples (`to_dict`, in sampling_config.json) and rebuilt from it
  exactly (`from_dict`),
- the one source of a results folder's name (`folder_name`), of the plan's stages (`stages`) and
  of the plan object the sampler drives (`make_plan`).

Stabilization comes in two variants (`StageSettings.stabilization`, saved in the JSON and named in
the folder): "generated" (`_stab<k>`), ours, stabilizes only observed frames the model generated,
noising them with fresh noise; "df" (`_dfstab<k>`), Diffusion Forcing's `sample_step` and the
df-* presets' behaviour, shows every observed frame, given ones included, at timestep k - 1 scaled by
sqrt(alpha_bar) with zero noise, and uses DF's update (sampler.py, df_step.py).

To add a setting (guidance, a cache...): give `StageSettings` (or `Scheme`) a field
with a default that means "off", check it in `check_settings`, and name it in `folder_name` when it
is on. JSON written before the field existed then reads back with the default.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError, PlanError, ScheduleError
from .noise_schedules import noise_levels, noise_schedules
from .plans import plan_stages, sampling_schemes, validate_plan_args


STABILIZATIONS = ("generated", "df")
MCMC_CLAMPS = ("signal_noise", "signal", "none")  # bounds on MCMC-refined values, see mcmc.py


@dataclass(frozen=True)
class StageSettings:
    """How one stage's latent frames are denoised (sampler.py reads these; its docstring has the details).

    stabilization names how observed frames are shown and which update is used:
    "generated" (ours): only observed frames the model generated are stabilized, noised with fresh
    noise; improved-diffusion's DDIM/DDPM update. "df" (Diffusion Forcing's `sample_step`): every
    observed frame, given ones included, is shown at timestep k - 1 scaled by sqrt(alpha_bar) with
    zero noise (DDIM); DF's update (df_step.py), which clamps a pred_noise output and every noise draw
    to +-clip_noise. clip_noise also bounds the initial noise of a stage (0: no bound).
    """

    noise_schedule: str = "full_sequence"
    uncertainty_scale: float = 1.0
    sampling_steps: int = 0  # levels per schedule; 0: the diffusion's number of (respaced) steps
    stabilization_level: int = 0  # 0: off; k: observed frames shown at timestep k - 1 of the training chain
    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True
    stabilization: str = "generated"  # "generated" | "df", see above
    clip_noise: float = 0.0  # 0: Gaussian draws are not clamped
    guidance_scale: float = 1.0  # classifier-free guidance (guidance.py): 1 = the conditional model, off
    # MCMC refinement of an energy model (mcmc.py): after each transition, mcmc_steps steps of size
    # mcmc_step_size on the latent frames that moved and are still noisy; 0 steps: off.
    mcmc_steps: int = 0
    mcmc_step_size: float = 0.01
    mcmc_noise: bool = False  # Langevin proposals with Metropolis-Hastings (MALA) instead of energy descent
    mcmc_clamp: str = "signal_noise"  # bound on refined values: signal_noise | signal | none (mcmc.py)


def training_steps(diffusion):
    """Length of the chain the model was trained on (before respacing)."""
    return getattr(diffusion, "original_num_steps", diffusion.num_timesteps)


def check_settings(settings, diffusion=None):
    """Raise a one-sentence ConfigError for settings that cannot be sampled; with `diffusion`, for it."""
    if settings.noise_schedule not in noise_schedules:
        raise ConfigError(f"unknown noise schedule {settings.noise_schedule!r}; valid names are "
                          f"{', '.join(noise_schedules)}.")
    if not (math.isfinite(settings.uncertainty_scale) and settings.uncertainty_scale >= 0):
        raise ConfigError(f"uncertainty_scale must be a finite number >= 0, got {settings.uncertainty_scale}.")
    if settings.sampling_steps < 0:
        raise ConfigError(f"sampling_steps must be 0 (the diffusion's steps) or positive, got {settings.sampling_steps}.")
    if settings.stabilization_level < 0:
        raise ConfigError(f"stabilization_level must be 0 (off) or positive, got {settings.stabilization_level}.")
    if not (math.isfinite(settings.eta) and settings.eta >= 0):
        raise ConfigError(f"eta must be a finite number >= 0, got {settings.eta}.")
    if settings.stabilization not in STABILIZATIONS:
        raise ConfigError(f"unknown stabilization {settings.stabilization!r}; valid names are "
                          f"{', '.join(STABILIZATIONS)}.")
    if settings.stabilization == "df" and settings.stabilization_level < 1:
        raise ConfigError("stabilization 'df' shows observed frames at timestep stabilization_level - 1, so it "
                          f"needs stabilization_level >= 1, got {settings.stabilization_level}; pass "
                          "--stabilization generated to show them clean.")
    if not (math.isfinite(settings.clip_noise) and settings.clip_noise >= 0):
        raise ConfigError(f"clip_noise must be 0 (no bound) or a positive number, got {settings.clip_noise}.")
    if not (math.isfinite(settings.guidance_scale) and settings.guidance_scale >= 0):
        raise ConfigError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got "
                          f"{settings.guidance_scale}.")
    steps = settings.mcmc_steps
    whole = isinstance(steps, int) or (isinstance(steps, float) and steps.is_integer())
    if isinstance(steps, bool) or not whole or steps < 0:
        raise ConfigError(f"mcmc_steps must be 0 (off) or a positive integer, got {settings.mcmc_steps}.")
    if not (math.isfinite(settings.mcmc_step_size) and settings.mcmc_step_size > 0):
        raise ConfigError(f"mcmc_step_size must be a finite number > 0, got {settings.mcmc_step_size}.")
    if settings.mcmc_clamp not in MCMC_CLAMPS:
        raise ConfigError(f"unknown mcmc_clamp {settings.mcmc_clamp!r}; valid names are {', '.join(MCMC_CLAMPS)}.")
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


@dataclass(frozen=True)
class Preset:
    """A registry entry: defaults on each axis. chunk_size None: the step size; 0: no sliding window."""

    plan: str
    noise_schedule: str = "full_sequence"
    uncertainty_scale: float = 1.0
    stabilization_level: int = 0
    chunk_size: Optional[int] = 0
    stabilization: str = "generated"
    clip_denoised: bool = True


# Every plan name is a preset with FDM's behaviour: full_sequence, no stabilization, no chunking.
# The two Diffusion Forcing presets roll out a sliding window of max_frames frames with DF's sampler
# (stabilization "df": every context frame shown at timestep 14 of the 1000-step training chain,
# scaled without noise; DF's update, which never clips x0_hat):
# - df-pyramid: max_frames // 2 new frames per stage, pyramid schedule with uncertainty_scale 1 (DF's
#   default), stabilization_level 15 (DF's df_video setting);
# - stabilized-autoreg: one new frame per stage, all noise levels falling together, stabilization 15.
# --stabilization generated gives them our variant (only generated frames, fresh noise).
PRESETS = {
    **{name: Preset(plan=name, chunk_size=None if name == "sliding-window" else 0) for name in sampling_schemes},
    "df-pyramid": Preset(plan="sliding-window", noise_schedule="pyramid", stabilization_level=15, chunk_size=None,
                         stabilization="df", clip_denoised=False),
    "stabilized-autoreg": Preset(plan="sliding-window", stabilization_level=15, chunk_size=1, stabilization="df",
                                 clip_denoised=False),
}


@dataclass(frozen=True)
class Scheme:
    """One sampling scheme, complete: build it with `from_preset`, rebuild it with `from_dict`."""

    sampling_scheme: str  # the registry name it was made from
    plan: str  # a name in plans.sampling_schemes
    T: int
    n_obs: int
    max_frames: int
    step_size: int  # new frames per stage (max_latent_frames; the chunk of a sliding window)
    optimality: Optional[str] = None  # optimal schedule file: stage -> observed frames
    stage: StageSettings = field(default_factory=StageSettings)
    timestep_respacing: str = ""

    # ---- building

    @classmethod
    def from_preset(cls, name, *, T, max_frames, n_obs=None, max_latent_frames=None, noise_schedule=None,
                    uncertainty_scale=None, stabilization_level=None, chunk_size=None, optimality=None,
                    sampling_steps=0, use_ddim=False, eta=0.0, clip_denoised=None, timestep_respacing="",
                    stabilization=None, clip_noise=0.0, guidance_scale=1.0, mcmc_steps=0, mcmc_step_size=0.01,
                    mcmc_noise=False, mcmc_clamp="signal_noise", diffusion_config=None):
        """The preset `name` with the given overrides (None: the preset's), validated.

        The step size is `max_latent_frames`, or max_frames // 2 when that is None. A chunk_size > 0
        turns autoreg into `sliding-window` with that chunk as step size; a sliding window without
        a chunk uses the step size. n_obs defaults to max_frames - step size.
        """
        if name not in PRESETS:
            raise PlanError(f"unknown sampling scheme {name!r}; valid names are {', '.join(PRESETS)}.")
        preset = PRESETS[name]
        plan = preset.plan
        step = max_frames // 2 if max_latent_frames is None else max_latent_frames
        chunk = preset.chunk_size if chunk_size is None else chunk_size
        if chunk is not None and chunk < 0:
            raise PlanError(f"chunk_size must be 0 (off) or positive, got {chunk}.")
        if chunk:
            if plan not in ("autoreg", "sliding-window"):
                raise PlanError(f"chunk_size applies to autoreg and sliding-window plans only, not {plan}.")
            if chunk >= max_frames:
                raise PlanError(f"chunk_size ({chunk}) must be smaller than max_frames ({max_frames}) to leave "
                                "room for observed frames.")
            plan, step = "sliding-window", chunk
        stage = StageSettings(
            noise_schedule=preset.noise_schedule if noise_schedule is None else noise_schedule,
            uncertainty_scale=float(preset.uncertainty_scale if uncertainty_scale is None else uncertainty_scale),
            sampling_steps=sampling_steps,
            stabilization_level=preset.stabilization_level if stabilization_level is None else stabilization_level,
            use_ddim=bool(use_ddim), eta=float(eta),
            clip_denoised=bool(preset.clip_denoised if clip_denoised is None else clip_denoised),
            stabilization=preset.stabilization if stabilization is None else stabilization,
            clip_noise=float(clip_noise),
            guidance_scale=float(guidance_scale),
            mcmc_steps=mcmc_steps, mcmc_step_size=float(mcmc_step_size), mcmc_noise=bool(mcmc_noise),
            mcmc_clamp=mcmc_clamp,
        )
        scheme = cls(sampling_scheme=name, plan=plan, T=T, n_obs=max_frames - step if n_obs is None else n_obs,
                     max_frames=max_frames, step_size=step,
                     optimality=None if optimality is None else str(optimality), stage=stage,
                     timestep_respacing=str(timestep_respacing or ""))
        scheme.validate(diffusion_config)
        return scheme

    def validate(self, diffusion_config=None):
        """Raise a one-sentence UserError if this scheme cannot run; cheap, so call it before loading a model.

        Checks the plan's parameters, runs the plan once without a model (some plans fail only
        part-way; adaptive ones fail where their non-adaptive counterparts do) and checks the stage
        settings, against the diffusion `diffusion_config` describes when given (respacing,
        sampling_steps, stabilization_level).
        """
        validate_plan_args(self.plan, self.T, self.n_obs, self.max_frames, self.step_size, self.optimality)
        self.stages()
        check_settings(self.stage)
        if diffusion_config is not None:
            check_settings(self.stage, self.diffusion(diffusion_config))

    def diffusion(self, diffusion_config):
        """The (respaced) diffusion this scheme samples with."""
        from ..diffusion import create_diffusion  # the diffusion package is only needed with a model

        return create_diffusion(diffusion_config, self.timestep_respacing)

    # ---- the plan

    @property
    def adaptive(self):
        """Whether the plan chooses observed frames from the videos (then `stages` shows its counterpart)."""
        return sampling_schemes[self.plan].adaptive

    def make_plan(self):
        """A fresh plan object for one batch of videos (drive it with next_stage(videos))."""
        return sampling_schemes[self.plan](video_length=self.T, num_obs=self.n_obs, max_frames=self.max_frames,
                                           step_size=self.step_size, optimal_schedule_path=self.optimality)

    def stages(self):
        """[(obs, latent)] for one video; for an adaptive plan, of the plan that generates the same frames."""
        return plan_stages(sampling_schemes[self.plan].counterpart(), self.T, self.n_obs, self.max_frames,
                           self.step_size, self.optimality)

    def describe(self):
        """JSON-able description: the scheme's settings and, per stage, its frames and noise-level matrix.

        Needs sampling_steps > 0 (the matrices' S) and a non-adaptive plan (known observed frames).
        """
        if self.adaptive:
            raise PlanError(f"{self.plan} chooses observed frames from the videos, so its stages cannot be "
                            f"listed without them; {sampling_schemes[self.plan].counterpart()} generates the "
                            "same frames.")
        if self.stage.sampling_steps < 1:
            raise ScheduleError(f"sampling_steps must be a positive integer, got {self.stage.sampling_steps}.")
        st = self.stage
        return {
            **self.to_dict(),
            "max_latent_frames": self.step_size,
            "chunk_size": self.step_size if self.plan == "sliding-window" else 0,
            "stages": [
                {"obs": sorted(obs), "latent": sorted(latent),
                 "noise_levels": noise_levels(st.noise_schedule, len(latent), st.sampling_steps,
                                              st.uncertainty_scale).tolist()}
                for obs, latent in self.stages()
            ],
        }

    # ---- names and JSON

    def folder_name(self):
        """The results folder of this scheme: the preset and geometry, then every setting that is not off."""
        st = self.stage
        name = f"{self.sampling_scheme}_K{self.max_frames}_S{self.step_size}_obs{self.n_obs}_T{self.T}"
        if st.noise_schedule != "full_sequence":
            name += f"_{st.noise_schedule}{st.uncertainty_scale:g}"
        if st.stabilization == "df":
            name += f"_dfstab{st.stabilization_level}"
        elif st.stabilization_level:
            name += f"_stab{st.stabilization_level}"
        if st.sampling_steps:
            name += f"_steps{st.sampling_steps}"
        if st.use_ddim:
            name += "_ddim" if st.eta == 0 else f"_ddim{st.eta:g}"
        if st.clip_noise:
            name += f"_clipnoise{st.clip_noise:g}"
        if not st.clip_denoised:
            name += "_noclip"
        if st.guidance_scale != 1:
            name += f"_cfg{st.guidance_scale:g}"
        if st.mcmc_steps:
            name += f"_mcmc{st.mcmc_steps}x{st.mcmc_step_size:g}" + ("_langevin" if st.mcmc_noise else "")
            if st.mcmc_clamp != "signal_noise":
                name += f"_clamp-{st.mcmc_clamp}"
        if self.timestep_respacing:
            name += f"_{self.timestep_respacing}"
        return name

    def to_dict(self):
        """Flat JSON-able dict: the scheme's fields with the stage settings inlined."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stage"}
        return {**flat, **dataclasses.asdict(self.stage)}

    def to_json(self):
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data):
        """The Scheme a `to_dict` (or a sampling_config.json holding one) describes; other keys are ignored.

        Stage settings missing from the dict take their defaults; files written before they were
        inlined hold them under "settings".
        """
        stage_data = {**data.get("settings", {}), **data}
        stage = StageSettings(**{f.name: stage_data[f.name] for f in dataclasses.fields(StageSettings)
                                 if f.name in stage_data})
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "stage":
                continue
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"the scheme description has no {f.name!r} entry.")
        return cls(stage=stage, **values)
