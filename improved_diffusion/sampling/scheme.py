"""A sampling scheme as one object: frame plan x within-stage noise schedule x stabilization.

A `Scheme` holds everything, besides the checkpoint, the data and the seed, that decides what a
sampling run produces: the frame plan and its geometry (T, n_obs, max_frames, step size, optimal
schedule file), the within-stage settings (`StageSettings`, settings.py: scheduling matrix,
stabilization, number of noise levels, DDIM, guidance, MCMC) and the diffusion's respacing. It is

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

A stage setting (guidance, MCMC, a solver...) is declared once, in settings.py; the JSON, the
folder name and the checks here take it from there. JSON written before a setting existed reads back
with its default.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from ..diffusion import create_diffusion
from ..errors import ConfigError, PlanError, ScheduleError
from .noise_schedules import noise_levels
from .plans import plan_stages, sampling_schemes, validate_plan_args
from .settings import FIELDS, RENAMED, StageSettings, check_settings, folder_suffix, settings_from_dict


@dataclass(frozen=True)
class Preset:
    """A registry entry: a plan, its chunking (None: the step size; 0: no sliding window) and stage-setting defaults."""

    plan: str
    chunk_size: Optional[int] = 0
    settings: dict = field(default_factory=dict)  # StageSettings values that differ from the defaults


# Every plan name is a preset with FDM's behaviour: full_sequence, no stabilization, no chunking.
# The two Diffusion Forcing presets roll out a sliding window of max_frames frames with DF's sampler
# (stabilization "df": every context frame shown at timestep 14 of the 1000-step training chain,
# scaled without noise; DF's update, which never clips x0_hat):
# - df-pyramid: max_frames // 2 new frames per stage, pyramid schedule with uncertainty_scale 1 (DF's
#   default), stabilization_level 15 (DF's df_video setting);
# - stabilized-autoreg: one new frame per stage, all noise levels falling together, stabilization 15.
# --stabilization generated gives them our variant (only generated frames, fresh noise).
DF_SAMPLER = dict(stabilization="df", stabilization_level=15, clip_denoised=False)
PRESETS = {
    **{name: Preset(plan=name, chunk_size=None if name == "sliding-window" else 0) for name in sampling_schemes},
    "df-pyramid": Preset(plan="sliding-window", chunk_size=None, settings=dict(scheduling_matrix="pyramid",
                                                                               **DF_SAMPLER)),
    "stabilized-autoreg": Preset(plan="sliding-window", chunk_size=1, settings=DF_SAMPLER),
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
    def from_preset(cls, name, *, T, max_frames, n_obs=None, max_latent_frames=None, chunk_size=None,
                    optimality=None, timestep_respacing="", diffusion_config=None, **settings):
        """The preset `name` with the given overrides (None: the preset's), validated.

        settings: StageSettings fields (settings.py); those left out or None take the preset's value.
        The step size is `max_latent_frames`, or max_frames // 2 when that is None. A chunk_size > 0
        turns autoreg into `sliding-window` with that chunk as step size; a sliding window without
        a chunk uses the step size. n_obs defaults to max_frames - step size.
        """
        if name not in PRESETS:
            raise PlanError(f"unknown sampling scheme {name!r}; valid names are {', '.join(PRESETS)}.")
        unknown = set(settings) - set(FIELDS) - set(RENAMED)
        if unknown:
            raise TypeError(f"Scheme.from_preset got settings that do not exist: {', '.join(sorted(unknown))}")
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
        given = {k: v for k, v in settings.items() if v is not None}
        stage = settings_from_dict(given, base=settings_from_dict(preset.settings))
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
                 "noise_levels": noise_levels(st.scheduling_matrix, len(latent), st.sampling_steps,
                                              st.uncertainty_scale).tolist()}
                for obs, latent in self.stages()
            ],
        }

    # ---- names and JSON

    def folder_name(self):
        """The results folder of this scheme: the preset and geometry, then every setting that is not off."""
        name = f"{self.sampling_scheme}_K{self.max_frames}_S{self.step_size}_obs{self.n_obs}_T{self.T}"
        name += folder_suffix(self.stage)
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
        inlined hold them under "settings"; old setting names are read too (settings.RENAMED).
        """
        stage = settings_from_dict({**data.get("settings", {}), **data})
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "stage":
                continue
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"the scheme description has no {f.name!r} entry.")
        return cls(stage=stage, **values)
