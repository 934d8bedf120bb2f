"""Frame plans: which frames to observe and which to generate at each stage of sampling a long video.

A plan splits the generation of a video of T frames, whose first `num_obs` frames are given, into
stages ``(obs_indices, latent_indices)``: the model sees at most `max_frames` (K) frames at once and
generates about `step_size` (S) new frames per stage, conditioned on frames that are already known.

The FDM plans (autoreg, long-range, hierarchy-N, adaptive variants, optimal schedules) reproduce the
reference code of "Flexible Diffusion Modeling of Long Videos"
(plai-group/flexible-video-diffusion-modeling, improved_diffusion/sampling_schemes.py) stage by stage,
quirks included: obs lists come in the reference's build order, may repeat a frame, and hierarchy
steps may shrink the step size and retry. Where the reference crashes, these plans raise `PlanError`
instead. `sliding-window` is Diffusion Forcing's rollout (buoyancy99/diffusion-forcing,
algorithms/diffusion_forcing/df_base.py, validation_step).

The objects keep FDM's driving interface, because existing sampling scripts use it:

    scheme = sampling_schemes[name](video_length=T, num_obs=n_obs, max_frames=K, step_size=S,
                                    optimal_schedule_path=None)
    obs, latent = next(scheme)      # lists for one video
    scheme.set_videos(videos)       # afterwards next() returns one list per video, as in FDM

`plan_stages` runs a non-adaptive plan to completion; `presets` names plan x noise-schedule pairs.
"""

import json
import logging
import math
import os

import numpy as np
import torch

from ..errors import PlanError

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


class SamplingScheme:
    """Iterator over the stages of one plan; subclasses define `next_indices`.

    State follows FDM's `SamplingSchemeBase`: `_done_frames` holds every frame known so far and
    `_obs_frames` the frames the plan anchors on (the given frames, or the frames of the unconditional
    first stage when `num_obs` is 0).
    """

    name = None

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
        self.B = None  # batch size once set_videos was called, as in FDM
        logger.info(
            "sampling scheme %s (T=%d, n_obs=%d, max_frames=%d, step_size=%d%s)",
            self.name, self._video_length, self._num_obs, self._max_frames, self._step_size,
            "" if optimal_schedule_path is None else f", optimal schedule {optimal_schedule_path}",
        )

    def __iter__(self):
        return self

    def set_videos(self, videos):
        """Switch to FDM's batch output: next() then returns one (identical) list per video."""
        self.B = len(videos)

    def is_done(self):
        return len(self._done_frames) >= self._video_length

    def next_indices(self):
        """(obs, latent) for the next stage; not called for an unconditional first stage."""
        raise NotImplementedError

    def _unconditional_frames(self):
        """Frames generated without conditioning when `num_obs` is 0 (FDM: the first K frames)."""
        return list(range(self._max_frames))

    def __next__(self):
        if self.is_done():
            raise StopIteration
        unconditional = self._num_obs == 0 and self._current_step == 0
        if unconditional:
            obs, latent = [], self._unconditional_frames()
        else:
            obs, latent = self.next_indices()
            if self.optimal_schedule is not None:
                obs = self._optimal_obs()
        [obs], latent = self._finish_stage([obs], latent, unconditional)
        if self.B is not None:
            return [list(obs) for _ in range(self.B)], [list(latent) for _ in range(self.B)]
        return obs, latent

    def _optimal_obs(self):
        """FDM replaces a stage's obs by the schedule's entry, or by none when the entry is missing."""
        if self._current_step not in self.optimal_schedule:
            logger.warning(
                "optimal schedule has no observed frames for stage %d; observing none.", self._current_step
            )
            return []
        return list(self.optimal_schedule[self._current_step])

    def _finish_stage(self, obs_lists, latent, unconditional):
        """Check a stage, record its frames as done, and return it with plain-int indices."""
        obs_lists = [[int(i) for i in obs] for obs in obs_lists]
        latent = [int(i) for i in latent]
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
        return obs_lists, latent


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


def sliding_window_stages(T, n_obs, K, chunk):
    """Diffusion Forcing's rollout: generate `chunk` frames at a time inside a window of K frames.

    Each stage generates the next min(chunk, T - known) frames and observes the known frames just
    before them so that the window holds K frames (as df_base.py's ``start_frame``); the last, shorter
    chunk therefore observes more frames. With n_obs = 0 the first chunk is generated unconditionally.
    """
    validate_plan_args("sliding-window", T, n_obs, K, chunk)
    return [_sliding_window_stage(known, T, K, chunk) for known in range(n_obs, T, chunk)]


def _sliding_window_stage(known, T, K, chunk):
    h = min(chunk, T - known)
    return list(range(max(0, known + h - K), known)), list(range(known, known + h))


class SlidingWindow(SamplingScheme):
    """`sliding_window_stages` behind the scheme interface; step_size is the chunk size."""

    name = "sliding-window"

    def _unconditional_frames(self):
        return _sliding_window_stage(0, self._video_length, self._max_frames, self._step_size)[1]

    def next_indices(self):
        known = max(self._done_frames) + 1
        return _sliding_window_stage(known, self._video_length, self._max_frames, self._step_size)


# ---------------------------------------------------------------------------------------------
# Adaptive plans
# ---------------------------------------------------------------------------------------------


def pixel_embedding(frames, size=8):
    """Built-in frame embedding needing no download: an area-averaged size x size thumbnail.

    frames: [N x C x H x W] in [-1, 1]. Scaled so that the squared distance between two embeddings
    is the mean squared difference of the thumbnails.
    """
    thumbs = torch.nn.functional.adaptive_avg_pool2d(frames.float(), size)
    return thumbs.flatten(1) / math.sqrt(thumbs[0].numel())


def _load_lpips_embedding():
    """FDM's embedding: features of lpips' AlexNet such that squared distance equals LPIPS distance.

    Each layer's unit-normalised features are scaled by the square root of lpips' linear weights and
    by 1/sqrt(H*W), so summing squared differences reproduces lpips' weighted spatial mean.
    Raises if the lpips package or its (downloaded) AlexNet weights are unavailable.
    """
    import lpips  # optional dependency, imported only when an adaptive plan needs it

    model = lpips.LPIPS(net="alex", spatial=False).eval()

    @torch.no_grad()
    def embed(frames):
        model.to(frames.device)
        feats = model.net.forward(model.scaling_layer(frames.float()))
        parts = []
        for k in range(model.L):
            f = lpips.normalize_tensor(feats[k])
            weight = model.lins[k].model[-1].weight  # [1 x C x 1 x 1]
            parts.append((weight.sqrt() * f).flatten(1) / math.sqrt(f.shape[-2] * f.shape[-1]))
        return torch.cat(parts, dim=1)

    return embed


def _farthest_first(embs, n, forced):
    """Greedy farthest-point choice of n rows of embs [P x D], as FDM's select_obs_indices.

    Starts with forced[0]; step k takes forced[k] while forced positions remain, otherwise the row
    whose squared distance to the nearest chosen row is largest (first such row on ties). When n
    exceeds P, rows repeat, as in the reference.
    """
    chosen = [forced[0]]
    nearest = torch.full((embs.shape[0],), math.inf, dtype=torch.float64)
    for k in range(1, n):
        dist = ((embs - embs[chosen[-1]]) ** 2).sum(dim=1).double().cpu()
        nearest = torch.minimum(nearest, dist)
        chosen.append(forced[k] if k < len(forced) else int(np.argmax(nearest.numpy())))
    return chosen


class _Adaptive:
    """Mixin for FDM's adaptive plans: observed frames chosen per video by embedding distance.

    Call `set_videos(videos)` ([B x T x C x H x W], current samples) before every `next()`; it then
    returns one obs list per video and B copies of the latent list, as FDM's AdaptiveSamplingSchemeBase.
    Frames are embedded with LPIPS (AlexNet) like FDM when the optional `lpips` package and its
    weights load, otherwise with `pixel_embedding`; `embedding_name` says which. Pass `embedder`
    (frames [N x C x H x W] -> [N x D]) to use another embedding.

    Differences from the reference: candidates are considered in sorted order rather than a set's
    iteration order (this only changes tie-breaking), and an optimal schedule is rejected instead of
    being silently ignored.
    """

    def __init__(self, *args, embedder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.videos = None
        self._embedder = embedder
        self._embedding_name = None if embedder is None else "custom"

    def set_videos(self, videos):
        self.videos = videos

    @property
    def embedding_name(self):
        """Which embedding ranks frames: 'lpips-alex', 'pixels-8x8' or 'custom'."""
        if self._embedder is None:
            self._choose_embedder()
        return self._embedding_name

    def _choose_embedder(self):
        channels = None if self.videos is None else self.videos.shape[2]
        try:
            if channels not in (None, 3):
                raise ValueError(f"LPIPS needs RGB frames, got {channels} channels")
            self._embedder, self._embedding_name = _load_lpips_embedding(), "lpips-alex"
            logger.info("%s ranks frames by LPIPS (AlexNet) distance.", self.name)
        except Exception as e:  # missing package, missing weights, no network, non-RGB frames
            self._embedder, self._embedding_name = pixel_embedding, "pixels-8x8"
            logger.warning("%s ranks frames by 8x8 thumbnail distance because LPIPS is unavailable (%s).",
                           self.name, str(e).splitlines()[0] if str(e) else type(e).__name__)

    def _embed(self, frames):
        """[B x P] frames of the current videos -> [B x P x D] embeddings."""
        if self._embedder is None:
            self._choose_embedder()
        x = self.videos[:, frames]
        B, P = x.shape[:2]
        with torch.no_grad():  # in chunks, so long videos do not exhaust memory
            embs = torch.cat([self._embedder(chunk) for chunk in x.reshape(B * P, *x.shape[2:]).split(256)])
        return embs.reshape(B, P, -1)

    def _select_obs(self, candidates, n, forced):
        """One list of n frames per video: forced frames first, then farthest-first by embedding."""
        embs = self._embed(candidates)
        position = {frame: p for p, frame in enumerate(candidates)}
        forced = [position[i] for i in forced]
        return [[candidates[p] for p in _farthest_first(embs[b], n, forced)] for b in range(len(embs))]

    def __next__(self):
        if self.videos is None:
            raise PlanError(f"{self.name} chooses frames from the videos, so call set_videos(videos) first.")
        if self.is_done():
            raise StopIteration
        B = len(self.videos)
        unconditional = self._num_obs == 0 and self._current_step == 0
        if unconditional:
            obs_lists, latent = [[] for _ in range(B)], self._unconditional_frames()
        else:
            obs_lists, latent = self.next_indices()
        obs_lists, latent = self._finish_stage(obs_lists, latent, unconditional)
        return obs_lists, [list(latent) for _ in range(B)]


class AdaptiveAutoregressive(_Adaptive, Autoregressive):
    """FDM's adaptive-autoreg: autoreg's latents; obs = newest frame, then the most dissimilar ones."""

    name = "adaptive-autoreg"

    def next_indices(self):
        start = max(self._done_frames) + 1
        latent = list(range(start, min(start + self._step_size, self._video_length)))
        candidates = sorted(self._done_frames, reverse=True)
        n = self._max_frames - self._step_size
        return self._select_obs(candidates, n, forced=candidates[:1]), latent


class AdaptiveHierarchy(_Adaptive, Hierarchy):
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
    name = f"{base.prefix}-{n}"
    return type(f"{base.__name__}{n}", (base,), dict(name=name, levels=n))


sampling_schemes = {
    "autoreg": Autoregressive,
    "long-range": LongRangeAutoregressive,
    **{f"hierarchy-{n}": _with_levels(Hierarchy, n) for n in (2, 3, 4, 5)},
    "adaptive-autoreg": AdaptiveAutoregressive,
    **{f"adaptive-hierarchy-{n}": _with_levels(AdaptiveHierarchy, n) for n in (2, 3)},
    "optimal": OptimalSchedule,
    "sliding-window": SlidingWindow,
}

ADAPTIVE_PLANS = ("adaptive-autoreg", "adaptive-hierarchy-2", "adaptive-hierarchy-3")
HIERARCHY_PLANS = tuple(name for name in sampling_schemes if "hierarchy" in name)


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
        if not os.path.isfile(os.fspath(optimal_schedule_path)):
            raise PlanError(f"optimal schedule file {os.fspath(optimal_schedule_path)} does not exist.")


def plan_stages(name, T, n_obs, K, S, optimal_schedule_path=None):
    """All stages of a non-adaptive plan as a list of (obs, latent) lists, in the plan's order."""
    validate_plan_args(name, T, n_obs, K, S, optimal_schedule_path)
    if name in ADAPTIVE_PLANS:
        raise PlanError(f"{name} chooses observed frames from the videos, so it has no plan without videos.")
    scheme = sampling_schemes[name](
        video_length=T, num_obs=n_obs, max_frames=K, step_size=S, optimal_schedule_path=optimal_schedule_path
    )
    return list(scheme)


# Registry names -> settings on the two axes (frame plan x within-stage noise schedule).
# Every plan name is a preset with FDM's behaviour: full_sequence, no stabilization, no chunking.
# chunk_size None means "the step size", which defaults to max_frames // 2 (FDM's default).
# The two Diffusion Forcing presets roll out a sliding window of max_frames frames with stabilization:
# - df-pyramid: max_frames // 2 new frames per stage, pyramid schedule with uncertainty_scale 1 (DF's
#   default), stabilization_level 15 (DF's df_video setting: generated context frames are shown to the
#   model noised to timestep 14 of the 1000-step training chain);
# - stabilized-autoreg: one new frame per stage, all noise levels falling together, stabilization 15.
# stabilization_level counts training-chain steps, as in Diffusion Forcing (see video_sampler.py).
presets = {
    name: dict(plan=name, noise_schedule="full_sequence", uncertainty_scale=1.0, stabilization_level=0,
               chunk_size=None if name == "sliding-window" else 0)
    for name in sampling_schemes
}
presets["df-pyramid"] = dict(
    plan="sliding-window", noise_schedule="pyramid", uncertainty_scale=1.0, stabilization_level=15, chunk_size=None
)
presets["stabilized-autoreg"] = dict(
    plan="sliding-window", noise_schedule="full_sequence", uncertainty_scale=1.0, stabilization_level=15, chunk_size=1
)


def resolve_scheme(name, max_frames, max_latent_frames=None, **overrides):
    """Concrete settings for a registry name: its preset, with any non-None override applied.

    Returns a dict with the preset keys plus `max_frames` and `step_size`. The step size is
    `max_latent_frames`, or max_frames // 2 when that is None. A chunk_size > 0 turns autoreg into
    `sliding-window` with that chunk as step size; for sliding-window without a chunk the chunk is
    the step size.
    """
    if name not in presets:
        raise PlanError(f"unknown sampling scheme {name!r}; valid names are {', '.join(presets)}.")
    unknown = set(overrides) - set(presets[name])
    if unknown:
        raise TypeError(f"resolve_scheme got unknown settings {sorted(unknown)}")
    config = dict(presets[name])
    config.update({k: v for k, v in overrides.items() if v is not None})
    step = max_frames // 2 if max_latent_frames is None else max_latent_frames
    chunk = config["chunk_size"]
    if chunk is not None and chunk < 0:
        raise PlanError(f"chunk_size must be 0 (off) or positive, got {chunk}.")
    if chunk:
        if config["plan"] not in ("autoreg", "sliding-window"):
            raise PlanError(f"chunk_size applies to autoreg and sliding-window plans only, not {config['plan']}.")
        config["plan"], step = "sliding-window", chunk
    elif config["plan"] == "sliding-window":
        config["chunk_size"] = step
    config.update(max_frames=max_frames, step_size=step)
    return config
