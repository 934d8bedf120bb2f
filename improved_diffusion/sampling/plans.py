"""Frame plans: which frames to observe and which to generate at each stage of sampling a long video.

A plan splits the generation of a video of T frames, whose first `num_obs` frames are given, into
stages: the model sees at most `max_frames` (K) frames at once and generates about `step_size` (S)
new frames per stage, conditioned on frames that are already known.

The FDM plans (autoreg, long-range, hierarchy-N, adaptive variants, optimal schedules) reproduce the
reference code of "Flexible Diffusion Modeling of Long Videos"
(plai-group/flexible-video-diffusion-modeling, improved_diffusion/sampling_schemes.py) stage by stage,
quirks included: obs lists come in the reference's build order, may repeat a frame, and hierarchy
steps may shrink the step size and retry. Where the reference crashes, these plans raise `PlanError`
instead. `sliding-window` is Diffusion Forcing's rollout (buoyancy99/diffusion-forcing,
algorithms/diffusion_forcing/df_base.py, validation_step).

One interface drives every plan:

    plan = sampling_schemes[name](video_length=T, num_obs=n_obs, max_frames=K, step_size=S)
    stage = plan.next_stage(videos)   # a Stage of per-video lists, or None when the video is complete

`videos` ([B x T x C x H x W], the samples so far) is required by adaptive plans, which choose
observed frames from it; other plans accept None (one video). Every plan knows the non-adaptive
plan that generates the same frames (`counterpart`), so a plan can be checked and drawn without
videos (`plan_stages`). FDM's own driving loop (`next(plan)`, `plan.set_videos(videos)`) is kept as
a compatibility layer on top of `next_stage`. Presets of plan x noise schedule are in scheme.py.
"""

import json
import logging
import os
from typing import List, NamedTuple

import numpy as np
import torch

from ..errors import PlanError
from .adaptive_choice import Adaptive

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Optimal schedules (FDM's --optimality)
# ---------------------------------------------------------------------------------------------


def load_optimal_schedule(path):
    """Read an optimal schedule: a mapping from stage number to the frames observed in that stage.

    FDM's scripts/video_optimal_schedule.py writes it with ``torch.save`` as a dict
    ``{stage: sorted list of frame indices}``, stage 0 being the first stage. We read that format with
    ``weights_only=True`` (a schedule never executes code); a ``.json`` file with the same mapping
    (keys as strings) is read as well, for schedules written by hand.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PlanError(f"optimal schedule file {path} does not exist.")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                raw = json.load(f)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        return {int(stage): [int(i) for i in frames] for stage, frames in raw.items()}
    except Exception as e:  # any unreadable or oddly shaped file is the same user error
        raise PlanError(
            f"optimal schedule file {path} is not a mapping from stage number to frame indices ({e})."
        ) from None


# ---------------------------------------------------------------------------------------------
# Non-adaptive plans
# ---------------------------------------------------------------------------------------------


class Stage(NamedTuple):
    """One stage for a batch of videos: per video, the frames to observe and the frames to generate."""

    obs: List[List[int]]
    latent: List[List[int]]


class SamplingScheme:
    """A frame plan; subclasses define `next_indices`, the driver is `next_stage`.

    State follows FDM's `SamplingSchemeBase`: `_done_frames` holds every frame known so far and
    `_obs_frames` the frames the plan anchors on (the given frames, or the frames of the unconditional
    first stage when `num_obs` is 0).
    """

    name = None
    adaptive = False  # True: observed frames are chosen from the videos, so next_stage needs them
    non_adaptive = None  # adaptive plans: the plan that generates the same frames in the same stages

    @classmethod
    def counterpart(cls):
        """The registry name of the non-adaptive plan with this plan's latent frames (its own for most)."""
        return cls.non_adaptive or cls.name

    def __init__(self, video_length, num_obs, max_frames, step_size, optimal_schedule_path=None):
        validate_plan_args(self.name, video_length, num_obs, max_frames, step_size, optimal_schedule_path)
        self._video_length = int(video_length)
        self._num_obs = int(num_obs)
        self._max_frames = int(max_frames)
        self._step_size = int(step_size)
        self._done_frames = set(range(self._num_obs))
        self._obs_frames = list(range(self._num_obs))
        self._current_step = 0
        self.optimal_schedule = None
        if optimal_schedule_path is not None:
            self.optimal_schedule = load_optimal_schedule(optimal_schedule_path)
        self._fdm_videos = None  # FDM compatibility: what set_videos last received
        logger.info(
            "sampling scheme %s (T=%d, n_obs=%d, max_frames=%d, step_size=%d%s)",
            self.name, self._video_length, self._num_obs, self._max_frames, self._step_size,
            "" if optimal_schedule_path is None else f", optimal schedule {optimal_schedule_path}",
        )

    def is_done(self):
        return len(self._done_frames) >= self._video_length

    def next_stage(self, videos=None):
        """The next Stage for `videos` [B x T x C x H x W] (None: one video), or None when all frames are known."""
        if self.is_done():
            return None
        B = 1 if videos is None else len(videos)
        if self._num_obs == 0 and self._current_step == 0:
            obs_lists, latent = [[] for _ in range(B)], self._unconditional_frames()
            self._finish_stage(obs_lists, latent, unconditional=True)
        else:
            obs_lists, latent = self._observed_and_latent(videos, B)
            self._finish_stage(obs_lists, latent, unconditional=False)
        return Stage([[int(i) for i in obs] for obs in obs_lists], [[int(i) for i in latent] for _ in range(B)])

    def _observed_and_latent(self, videos, B):
        """(obs per video, latent) of a conditional stage; adaptive plans override this."""
        obs, latent = self.next_indices()
        if self.optimal_schedule is not None:
            obs = self._optimal_obs()
        return [list(obs) for _ in range(B)], latent

    def next_indices(self):
        """(obs, latent) for the next stage; not called for an unconditional first stage."""
        raise NotImplementedError

    def _unconditional_frames(self):
        """Frames generated without conditioning when `num_obs` is 0 (FDM: the first K frames)."""
        return list(range(self._max_frames))

    def _optimal_obs(self):
        """FDM replaces a stage's obs by the schedule's entry, or by none when the entry is missing."""
        if self._current_step not in self.optimal_schedule:
            logger.warning(
                "optimal schedule has no observed frames for stage %d; observing none.", self._current_step
            )
            return []
        return list(self.optimal_schedule[self._current_step])

    def _finish_stage(self, obs_lists, latent, unconditional):
        """Check a stage and record its frames as done."""
        for obs in obs_lists:
            for i in obs:
                if i not in self._done_frames:
                    raise PlanError(
                        f"{self.name} stage {self._current_step} observes frame {i} before it is known."
                    )
        if any(not 0 <= i < self._video_length for i in latent):
            raise PlanError(f"{self.name} stage {self._current_step} generates a frame outside 0..T-1.")
        new = set(latent) - self._done_frames
        if not new:  # guarantees termination whatever a subclass does
            raise PlanError(f"{self.name} stage {self._current_step} generates no new frame.")
        self._done_frames.update(new)
        if unconditional:
            # FDM: the unconditional frames take the place of the given frames from now on.
            self._obs_frames = list(latent)
        self._current_step += 1

    # ---- FDM compatibility: FDM's sampling loop drives plans as iterators ------------------------
    #
    #     obs, latent = next(plan)      # lists for one video
    #     plan.set_videos(videos)       # afterwards next() returns one list per video
    #
    # Both are thin wrappers of next_stage; new code calls next_stage(videos) instead.

    def __iter__(self):
        return self

    def set_videos(self, videos):
        """FDM: hand over the current samples; next() then returns one list per video."""
        self._fdm_videos = videos

    def __next__(self):
        if self.adaptive and self._fdm_videos is None:
            raise PlanError(f"{self.name} chooses frames from the videos, so call set_videos(videos) first.")
        stage = self.next_stage(self._fdm_videos)
        if stage is None:
            raise StopIteration
        if self._fdm_videos is None:
            return stage.obs[0], stage.latent[0]
        return stage.obs, stage.latent


class Autoregressive(SamplingScheme):
    """FDM's autoreg: observe the last K - S known frames (fewer if fewer exist), generate the next S."""

    name = "autoreg"

    def next_indices(self):
        obs = sorted(self._done_frames)[-(self._max_frames - self._step_size):]
        start = obs[-1] + 1
        return obs, list(range(start, min(start + self._step_size, self._video_length)))


class LongRangeAutoregressive(SamplingScheme):
    """FDM's long-range: half the obs budget on recent frames, the rest on the anchor frames.

    The budget is K - S; (K - S) // 2 of it goes to the newest known frames, then anchor frames
    (`_obs_frames`), newest first, are added until the budget is full. Quirk kept from the
    reference: when (K - S) // 2 is 0 the slice ``[-0:]`` keeps *every* known frame, so such stages
    observe all known frames and exceed K.
    """

    name = "long-range"

    def next_indices(self):
        budget = self._max_frames - self._step_size
        n_recent = budget // 2
        chosen = set(sorted(self._done_frames)[-n_recent:])
        for i in sorted(self._obs_frames, reverse=True):
            chosen.add(i)
            if len(chosen) == budget:
                break
        start = max(self._done_frames) + 1
        return sorted(chosen), list(range(start, min(start + self._step_size, self._video_length)))


class Hierarchy(SamplingScheme):
    """FDM's hierarchy-N: sparse frames over the whole video first, then fill the gaps level by level.

    Level 1 spreads S frames evenly over the missing part of the video; each later level fills gaps
    with a smaller spacing, level N with spacing 1. Each stage observes the known frames between its
    latents, up to half of the remaining budget after them and the rest before them. When fewer than
    two obs slots would remain for before/after frames, the reference retries the stage with step
    size S - 1 (which also changes the spacing and the budget); we do the same.
    """

    prefix = "hierarchy"
    levels = None  # N

    def _unconditional_frames(self):
        return [int(i) for i in np.linspace(0, self._video_length - 1, self._max_frames)]

    def _spacing(self):
        """Distance between latents on the current level: (missing / (S - 1)) ** ((N - level) / (N - 1))."""
        if self._step_size == 1:
            raise PlanError(
                f"{self.name} cannot fit frames both before and after the new frames within "
                f"max_frames={self._max_frames} even after lowering the step size to 1; "
                "use a larger max_frames, a smaller max_latent_frames or another plan."
            )
        level_1 = (self._video_length - len(self._obs_frames)) / (self._step_size - 1)
        return int(level_1 ** ((self.levels - self._level) / (self.levels - 1)))

    def next_indices(self):
        T, done = self._video_length, self._done_frames
        if len(done) == len(self._obs_frames):  # first stage after the given (or unconditional) frames
            self._level = 1
            self._cursor = max(self._obs_frames)
        n_to_condition_on = self._max_frames - self._step_size

        idx = self._cursor + self._spacing()
        if all(i in done for i in range(idx, T)):
            # Next level. As in the reference, its cursor restarts at (first missing - 1 + spacing),
            # so with spacing >= 2 the first missing frame is skipped on this level.
            self._level += 1
            self._cursor = 0
            first_missing = min(i for i in range(T) if i not in done)
            idx = first_missing - 1 + self._spacing()

        if self._level == 1:
            first = max(self._obs_frames) + 1
            latent = [int(i) for i in np.linspace(first, T - 0.001, self._step_size)]
        else:
            latent = []
            spacing = self._spacing()
            while len(latent) < self._step_size and idx < T:
                if idx in done:
                    idx += 1
                else:
                    latent.append(idx)
                    idx += spacing
        if not latent:
            raise PlanError(
                f"{self.name} finds no frame to generate on level {self._level}: the level starts "
                f"after the last missing frame; try another max_frames or max_latent_frames."
            )

        between = [i for i in range(min(latent), max(latent)) if i in done]
        if n_to_condition_on - len(between) < 2:
            self._step_size -= 1
            try:
                return self.next_indices()
            finally:
                self._step_size += 1

        obs = self._conditioning_frames(latent, between, n_to_condition_on)
        self._cursor = max(latent)
        return obs, latent

    def _conditioning_frames(self, latent, between, n_to_condition_on):
        """Obs in the reference's build order: between, then after, then before the latents."""
        T, done = self._video_length, self._done_frames
        obs = list(between)
        n_after = (n_to_condition_on - len(between)) // 2
        obs += [i for i in range(max(latent) + 1, T) if i in done][:n_after]
        n_before = n_to_condition_on - len(obs)
        if self._level == 1:
            # Evenly spaced over the anchor frames; repeats a frame when too few exist.
            top = max(self._obs_frames) + 0.999
            obs += [int(i) for i in np.linspace(0, top, n_before).astype(np.int32)]
        else:
            obs += [i for i in range(min(latent) - 1, -1, -1) if i in done][:n_before]
        return obs


class OptimalSchedule(Autoregressive):
    """Autoreg's latent frames with the observed frames read from an optimal-schedule file.

    Every plan accepts `optimal_schedule_path` as in FDM (the file then overrides its obs);
    `optimal` is the name for the autoreg skeleton, for which the file is required.
    """

    name = "optimal"


class SlidingWindow(SamplingScheme):
    """Diffusion Forcing's rollout: generate `step_size` frames at a time inside a window of K frames.

    Each stage generates the next min(step_size, T - known) frames and observes the known frames just
    before them so that the window holds K frames (as df_base.py's ``start_frame``); the last, shorter
    chunk therefore observes more frames. With n_obs = 0 the first chunk is generated unconditionally.
    """

    name = "sliding-window"

    def _window(self, known):
        new = min(self._step_size, self._video_length - known)
        return list(range(max(0, known + new - self._max_frames), known)), list(range(known, known + new))

    def _unconditional_frames(self):
        return self._window(0)[1]

    def next_indices(self):
        return self._window(max(self._done_frames) + 1)


class AdaptiveAutoregressive(Adaptive, Autoregressive):
    """FDM's adaptive-autoreg: autoreg's latents; obs = newest frame, then the most dissimilar ones."""

    name = "adaptive-autoreg"
    non_adaptive = "autoreg"

    def next_indices(self):
        start = max(self._done_frames) + 1
        latent = list(range(start, min(start + self._step_size, self._video_length)))
        candidates = sorted(self._done_frames, reverse=True)
        n = self._max_frames - self._step_size
        return self._select_obs(candidates, n, forced=candidates[:1]), latent


class AdaptiveHierarchy(Adaptive, Hierarchy):
    """FDM's adaptive-hierarchy-N: hierarchy latents; obs chosen per video by embedding distance.

    Always observed: known frames between the latents, the two nearest known frames before them and
    the nearest after; the rest of the K - S budget is filled farthest-first. Where only one known
    frame precedes the latents the reference loops forever looking for a second; we take the one.
    """

    prefix = "adaptive-hierarchy"

    def _conditioning_frames(self, latent, between, n_to_condition_on):
        T, done = self._video_length, self._done_frames
        before = [i for i in range(min(latent) - 1, -1, -1) if i in done][:2]
        after = [i for i in range(max(latent) + 1, T) if i in done][:1]
        forced = list(between) + before + after
        return self._select_obs(sorted(done), n_to_condition_on, forced)


def _with_levels(base, n):
    """A hierarchy class with N = n levels, named like its registry entry."""
    attributes = dict(name=f"{base.prefix}-{n}", levels=n)
    if base.adaptive:
        attributes["non_adaptive"] = f"{Hierarchy.prefix}-{n}"
    return type(f"{base.__name__}{n}", (base,), attributes)


sampling_schemes = {
    "autoreg": Autoregressive,
    "long-range": LongRangeAutoregressive,
    **{f"hierarchy-{n}": _with_levels(Hierarchy, n) for n in (2, 3, 4, 5)},
    "adaptive-autoreg": AdaptiveAutoregressive,
    **{f"adaptive-hierarchy-{n}": _with_levels(AdaptiveHierarchy, n) for n in (2, 3)},
    "optimal": OptimalSchedule,
    "sliding-window": SlidingWindow,
}

ADAPTIVE_PLANS = tuple(name for name, plan in sampling_schemes.items() if plan.adaptive)
HIERARCHY_PLANS = tuple(name for name, plan in sampling_schemes.items() if issubclass(plan, Hierarchy))


# ---------------------------------------------------------------------------------------------
# Checks and helpers
# ---------------------------------------------------------------------------------------------


def validate_plan_args(name, T, n_obs, K, S, optimal_schedule_path=None):
    """Raise PlanError (one sentence) for parameters with which a plan cannot be built.

    Besides plain range checks this rejects, up front, the cases where FDM's reference crashes
    predictably: hierarchies with S = 1 (spacing divides by S - 1) or K < 4 (no room for frames
    before and after), unless the unconditional first stage already covers the video; and
    autoreg-like plans with n_obs = 0 and K > T (the first stage would index past the video).
    """
    if name not in sampling_schemes:
        raise PlanError(f"unknown sampling scheme {name!r}; valid names are {', '.join(sampling_schemes)}.")
    for label, value in (("T", T), ("n_obs", n_obs), ("max_frames", K), ("max_latent_frames", S)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PlanError(f"{label} must be an integer, got {value!r}.")
    if T < 1:
        raise PlanError(f"T must be at least 1, got {T}.")
    if not 0 <= n_obs < T:
        raise PlanError(f"n_obs must be between 0 and T - 1 = {T - 1}, got {n_obs}.")
    if K < 2:
        raise PlanError(f"max_frames must be at least 2 (an observed and a new frame), got {K}.")
    if S < 1:
        raise PlanError(f"max_latent_frames must be at least 1, got {S}.")
    if S >= K:
        raise PlanError(f"max_latent_frames ({S}) must be smaller than max_frames ({K}) to leave room for observed frames.")
    covered_at_once = n_obs == 0 and K >= T
    if name in HIERARCHY_PLANS and not covered_at_once:
        if S == 1:
            raise PlanError(f"{name} needs max_latent_frames >= 2 because its frame spacing divides by max_latent_frames - 1.")
        if K < 4:
            raise PlanError(f"{name} needs max_frames >= 4 to observe frames both before and after the new ones.")
    if name not in HIERARCHY_PLANS and name != "sliding-window" and n_obs == 0 and K > T:
        raise PlanError(f"{name} with n_obs = 0 first generates max_frames = {K} frames, more than T = {T}.")
    if name == "optimal" and optimal_schedule_path is None:
        raise PlanError("the 'optimal' plan needs an optimal schedule file (--optimality PATH).")
    if optimal_schedule_path is not None:
        if name in ADAPTIVE_PLANS:
            raise PlanError(f"{name} chooses its observed frames itself and cannot use an optimal schedule.")
        path = os.fspath(optimal_schedule_path)
        if not os.path.isfile(path):
            problem = "is not a file" if os.path.exists(path) else "does not exist"
            raise PlanError(f"optimal schedule file {path} {problem}.")


def plan_stages(name, T, n_obs, K, S, optimal_schedule_path=None):
    """All stages of a non-adaptive plan as a list of (obs, latent) lists for one video, in the plan's order.

    Running a plan to the end is also how a plan is checked without a model: some fail only part-way.
    """
    validate_plan_args(name, T, n_obs, K, S, optimal_schedule_path)
    if name in ADAPTIVE_PLANS:
        raise PlanError(f"{name} chooses observed frames from the videos, so it has no plan without videos; "
                        f"{sampling_schemes[name].counterpart()} generates the same frames.")
    plan = sampling_schemes[name](
        video_length=T, num_obs=n_obs, max_frames=K, step_size=S, optimal_schedule_path=optimal_schedule_path
    )
    stages = []
    while (stage := plan.next_stage()) is not None:
        stages.append((stage.obs[0], stage.latent[0]))
    return stages
