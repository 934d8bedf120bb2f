"""Is a generated frame still a frame of its dataset? A drift metric measured from pixels alone.

Diffusion Forcing claims that stabilised rollouts stay on the data manifold far past the training
length. For the two embedded procedural datasets the manifold is known exactly (it is the
generator), so each frame can be checked against it without a learned network:

- `bouncing_balls` (data/bouncing_balls.py): anti-aliased discs of radius DEFAULT_RADIUS *
  image_size, each in its own PALETTE colour, drawn by `bouncing_balls.render` on an exactly
  black background. A video keeps its balls (count and colours) in every frame.
- `cue_recall` (data/cue_recall.py): one hard-edged disc of colour BALL and radius
  max(2, image_size // 10) (as in `cue_recall.make_video`) on the BACKGROUND colour, and a cue
  square (`cue_box`) drawn over everything in frames [0, CUE_VISIBLE) and [CUE_RETURN, T). The
  cue's colour and presence are the `cue_recall` metric's business, so in those frames the
  square's pixels are ignored here; the ball may then be partly or wholly under it (the
  generator draws the cue over the ball), so zero visible balls are accepted in cue frames.

A frame is *on-manifold* when all of these hold, within one of two sets of TOLERANCES:
"generator" (the default: as close as the generator's own frames) or "model" (as close as a small
model's frames next to its given ones; see TOLERANCES for the measurement behind it):

1. Background: the pixels farther than RIM px from every ball differ from the generator's
   background colour by at most `background_mean` on average and `background_peak`
   at any pixel (fractions of the ball/background contrast). The generator's background is
   exact, so these only leave room for a model's noise; the peak bound catches faint
   ("ghost") balls that stay under the ball threshold.
2. Balls: blobs are the connected components (scipy.ndimage.label, 4-connected) of the pixels
   at least half-way from the background to the ball colour. With the generator's one-pixel
   anti-aliasing ramp, coverage 1/2 is reached exactly at distance `radius` from a centre, so
   a blob is the set of pixel centres inside a disc (or a union of overlapping discs).
   Every blob must be the generator's own rendering of one (or, for overlapping balls, two) of
   the video's balls: the best-placed rendering (centres searched on a grid down to 1/32 px)
   must leave an *edge error* of at most `edge` px. The edge error is the summed absolute
   difference over the blob, the RIM px around it and any background pixel the rendering draws
   on, divided by (the ball's contrast x its circumference): a disc drawn `edge` px off
   along its whole rim scores about that. This one check
   covers the radius, the roundness, the sharpness of the edge (a blurred disc has an error
   of ~0.5-0.8 px) and the colour (a wrong colour leaves an error all over the blob).
3. Count and colours (bouncing_balls): the balls explaining the blobs are exactly the video's
   balls, each colour once (colours never repeat within a video). The video's balls are read
   from its ground-truth video: the PALETTE colours that appear exactly on at least two pixels
   of one ground-truth frame. The count is compared with the video's own, not with the
   dataset's num_balls range (1-2): a one-ball frame is a valid frame of the dataset but not of
   a video that had two, and a ball that vanishes or appears is exactly the drift to catch.
   cue_recall: exactly one ball (or none in cue frames, see above).
   A blob larger than MAX_COVERAGE x all the video's balls cannot be balls; its pixels are
   judged as background (so a frame of noise fails the background criterion).

Overlaps: balls pass through each other, and then two balls make one blob. A blob in which a
video colour is missing (another ball's colour) is explained by two of the generator's discs,
the missing one partly hidden, in either drawing order, when that fit is within `edge`
and is either needed (the one-ball fit fails) or better than the one-ball fit by more than
HIDDEN_BALL_EVIDENCE px. Even exactly coincident balls are told apart this way: render() draws
the upper ball's anti-aliased rim over the lower one, so the rim shows up to a quarter of the
lower colour (measured: pairs of every two palette colours at centre distances 0 to 1 px are all
on-manifold at 16 and 32 px). A model that draws two coinciding balls as one clean disc is
scored as missing a ball: a clean single disc is exactly what an erased ball looks like.

Aggregates (`summarize`): the fraction of videos on-manifold per frame index; per video the
time to drift, the first generated frame (index >= n_obs) that is off-manifold, or the video's
length T for a video that never leaves (censored: then the true time is > T - 1, and a median
equal to T means at least half the videos never drifted); the median time to drift; the
on-manifold fraction over the last quarter of the frames (`last_quarter`); and two diagnostic
curves, the mean blob count (blobs of plausible size) and the mean background error (mean absolute deviation of the background pixels
from the generator's background, in grey levels) per frame.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data import bouncing_balls as bb
from ..data import cue_recall as cue
from ..data.pixels import to_pixel_scale

DATASETS = ("bouncing_balls", "cue_recall")

BALL_THRESHOLD = 0.5  # coverage at the disc's radius with the one-pixel ramp (see module docstring)
RIM = 1.5  # px beyond a blob that belong to its ball: the ramp reaches radius + 0.5, one pixel step away
HIDDEN_BALL_EVIDENCE = 0.02  # px: a two-ball fit must beat the one-ball fit by this much; 3x the most a
#                              hidden second ball improved the fit of a single ground-truth disc (0.006 px,
#                              measured on 1,200 discs at 16 and 32 px: uint8 rounding and the search grid)
MAX_COVERAGE = 1.5  # a blob covering more than this many times all the video's balls is not balls (its
#                     best fit would leave an edge error > radius / 4 >= 0.5 px): it is judged as background
SEARCH_GRID = 5  # centres are searched on 5 x 5 grids, each spanning one step of the last either side ...
SEARCH_PRECISION = 1 / 32  # ... down to a step below this (px)


@dataclass(frozen=True)
class Tolerances:
    """How far a frame may be from the generator's drawing and still count as on-manifold.

    background_mean, background_peak: fractions of the ball/background contrast (criterion 1);
    edge: px of edge error (criterion 2).
    """

    background_mean: float
    background_peak: float
    edge: float


TOLERANCES = {
    # The generator's own frames: its background is exact, its discs are drawn to a one-pixel ramp.
    # background_mean 1/32 of the contrast (8 grey levels on black), background_peak half-way to the
    # ball threshold, edge a quarter of the one-pixel ramp.
    "generator": Tolerances(background_mean=1 / 32, background_peak=1 / 4, edge=0.25),
    # What a small model draws next to its given frames, inside its training window: on the demo
    # model (16 px, `make demo`), frames 4..7 of 24 autoreg samples have a background error of
    # 0.029 (median) to 0.053 (max) of the contrast and edge errors of 0.21 px (median); 17 % of
    # them fail "generator" on the background alone. "model" doubles the background and edge
    # tolerances (16 grey levels; half the ramp), so that 83 % of those frames pass and what
    # fails is a missing/extra ball or a misshapen one. It still fails noise, a washed-out
    # background and extra or missing balls, but accepts most frames under a 3 x 3 box blur (83-100 %
    # of them, measured on test_on_manifold.py's videos): it measures drift into noise and lost or
    # added balls, not softness.
    "model": Tolerances(background_mean=1 / 16, background_peak=1 / 4, edge=0.5),
}


def tolerances_named(name):
    """The Tolerances of a TOLERANCES name; ValueError naming the choices otherwise."""
    if name not in TOLERANCES:
        raise ValueError(f"Unknown on_manifold tolerance {name!r}; choose from {', '.join(TOLERANCES)}.")
    return TOLERANCES[name]


def cue_ball_radius(image_size):
    """The cue_recall ball's radius in pixels, as cue_recall.make_video draws it."""
    return max(2, image_size // 10)


@dataclass(frozen=True)
class Look:
    """What one dataset's generator draws at one image size."""

    dataset: str
    image_size: int
    radius: float  # px
    background: np.ndarray  # [3] grey levels
    contrast: float  # grey levels from background to a ball, along the ball-coverage axis
    disc_area: float  # coverage of one ball, px^2

    @classmethod
    def of(cls, dataset, image_size):
        if dataset == "bouncing_balls":
            # Every palette colour has a channel at 255, so a pixel's largest channel / 255 is its coverage.
            assert (bb.PALETTE.max(axis=1) == 255).all()
            r = bb.DEFAULT_RADIUS * image_size
            # Coverage of render()'s disc: the integral of clip(r - d + 1/2, 0, 1) over the plane.
            return cls(dataset, image_size, r, np.zeros(3), 255.0, np.pi * (r * r + 1 / 12))
        if dataset == "cue_recall":
            r = cue_ball_radius(image_size)
            background = cue.BACKGROUND.astype(np.float64)
            return cls(dataset, image_size, float(r), background, float(cue.BALL.mean() - background.mean()),
                       float(np.pi * r * r))
        raise ValueError(f"on_manifold applies to {' and '.join(DATASETS)}, not {dataset!r}.")

    def coverage(self, frame):
        """Per-pixel ball coverage in [0, 1] of an [H x W x 3] float frame (0: background, 1: ball)."""
        if self.dataset == "bouncing_balls":
            values = frame.max(axis=-1) / 255.0
        else:
            values = (frame.mean(axis=-1) - self.background.mean()) / self.contrast
        return np.clip(values, 0.0, 1.0)

    def render(self, centres, colours, y0, x0, h, w):
        """The generator's drawing of balls [K x k x 2] ((x, y) px) in colours [k x 3], crop of [K x h x w x 3]."""
        centres = np.asarray(centres, dtype=np.float64) - np.array([x0, y0], dtype=np.float64)
        if self.dataset == "bouncing_balls":
            return bb.render(centres, np.asarray(colours, np.float64), self.radius, max(h, w))[:, :h, :w]
        # cue_recall.make_video: pixel (row, col) is the ball when (row - y)^2 + (col - x)^2 <= radius^2.
        rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
        out = np.broadcast_to(self.background, (len(centres), h, w, 3)).astype(np.uint8)
        for n in range(centres.shape[1]):
            dy = rows[None, :, None] - centres[:, n, 1, None, None]
            dx = cols[None, None, :] - centres[:, n, 0, None, None]
            out = np.where((dy**2 + dx**2 <= self.radius**2)[..., None], np.asarray(colours[n], np.uint8), out)
        return out

    def ignored(self, frame_index):
        """Pixels not judged in frame `frame_index` (the cue square while it shows), or None."""
        if self.dataset != "cue_recall" or cue.CUE_VISIBLE <= frame_index < cue.CUE_RETURN:
            return None
        mask = np.zeros((self.image_size, self.image_size), dtype=bool)
        top, bottom, left, right = cue.cue_box(self.image_size)
        mask[top:bottom, left:right] = True
        return mask


def video_colours(reference):
    """The bouncing_balls PALETTE colours of a ground-truth video [T x H x W x 3] (float levels), [n x 3].

    A colour counts when it appears exactly (within one grey level, for rounding) on at least two
    pixels of one frame: a ball's interior shows its colour unblended, overlap blends do not.
    """
    found = set()
    for frame in reference:
        for k, colour in enumerate(bb.PALETTE):
            if (np.abs(frame - colour).max(axis=-1) <= 1).sum() >= 2:
                found.add(k)
    return bb.PALETTE[sorted(found)]


# ---------------------------------------------------------------------------
# One frame
# ---------------------------------------------------------------------------


class _Blob:
    """One blob's crop and the residual of renderings against it."""

    def __init__(self, look, frame, coverage, region, label, pad):
        ys, xs = np.nonzero(region == label)
        size = look.image_size
        self.y0, self.x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
        y1, x1 = min(ys.max() + pad + 1, size), min(xs.max() + pad + 1, size)
        self.h, self.w = y1 - self.y0, x1 - self.x0
        crop = np.s_[self.y0:y1, self.x0:x1]
        self.frame = frame[crop]
        self.look = look
        # Judged pixels: the blob's region, and background pixels where a rendering draws a ball (it
        # may not spill); other background pixels are the background criterion's, other blobs'
        # regions theirs, IGNORED pixels nobody's.
        self.own = region[crop] == label
        self.background_near = region[crop] == 0
        # A ball partly under the cue square may have its centre up to a radius from its visible part.
        self.span = look.radius if (region[crop] == IGNORED).any() else 1.0
        weights = coverage[crop] * self.own
        self.coverage = float(weights.sum())
        yy, xx = np.mgrid[self.y0:y1, self.x0:x1] + (0.5 if look.dataset == "bouncing_balls" else 0.0)
        self.centroid = np.array([(weights * xx).sum(), (weights * yy).sum()]) / max(self.coverage, 1e-12)
        self.xx, self.yy = xx, yy

    def residual(self, centres, colours):
        """Summed absolute difference (grey levels) between the frame and each rendering, [K]."""
        drawn = self.look.render(centres, colours, self.y0, self.x0, self.h, self.w).astype(np.float64)
        judged = self.own | (self.background_near & (drawn != self.look.background).any(axis=-1))
        return (np.abs(drawn - self.frame) * judged[..., None]).sum(axis=(1, 2, 3))

    def centroid_of(self, mask):
        mask = mask & self.own
        return np.array([self.xx[mask].mean(), self.yy[mask].mean()]) if mask.any() else None


def _search(score, start, span):
    """The centre within `span` px of `start` minimising score(centres [K x 2]), coarse to fine; (centre, score)."""
    best = np.asarray(start, dtype=np.float64)
    value = None
    half = span
    while True:
        offsets = np.linspace(-half, half, SEARCH_GRID)
        grid = best + np.stack(np.meshgrid(offsets, offsets), axis=-1).reshape(-1, 2)
        values = score(grid)
        k = int(np.argmin(values))
        if value is None or values[k] < value:
            best, value = grid[k], float(values[k])
        half = offsets[1] - offsets[0]  # the next grid spans one step of this one either side
        if half < SEARCH_PRECISION:
            return best, value


def _fit_one(blob, colour):
    """Best single ball of `colour` for the blob: (centre, summed residual)."""
    return _search(lambda grid: blob.residual(grid[:, None], [colour]), blob.centroid, blob.span)


def _fit_two(blob, colour, centre, hidden, look):
    """Best pair of balls (the blob's `colour` near `centre`, and `hidden`), either drawing order."""
    nearest = _nearest_colour_mask(blob, [colour, hidden])
    seeds = [blob.centroid_of(nearest == k) for k in (0, 1)]  # where each colour shows, if it does
    seeds = [centre if s is None else s for s in seeds]
    best = None
    for order in ((0, 1), (1, 0)):  # the later one is drawn on top
        colours = np.array([colour, hidden])[list(order)]
        centres = list(seeds)  # indexed like (colour, hidden)
        value = None
        for spans in ((look.radius, 1.0), (0.5, 0.5)):  # coordinate descent: hidden ball, then the visible one
            for which, span in zip((1, 0), spans):
                def score(grid, which=which):
                    pair = np.repeat(np.array(centres)[None], len(grid), axis=0)
                    pair[:, which] = grid
                    return blob.residual(pair[:, list(order)], colours)
                centres[which], value = _search(score, centres[which], span)
        if best is None or value < best:
            best = value
    return best


def _nearest_colour_mask(blob, colours):
    """Index into `colours` of the colour nearest each pixel's chromaticity (pixel / its largest channel)."""
    chroma = blob.frame / np.maximum(blob.frame.max(axis=-1, keepdims=True), 1.0)
    palette = np.asarray(colours, np.float64) / 255.0
    return np.argmin(((chroma[:, :, None] - palette[None, None]) ** 2).sum(-1), axis=-1)


IGNORED = -1  # the region label of pixels nobody judges (the cue square while it shows)


def segment(frame, look, frame_index=0, max_coverage=np.inf):
    """(coverage, number of blobs, regions) of a frame [H x W x 3] in grey levels.

    Blobs are the 4-connected components of coverage >= BALL_THRESHOLD that cover at most
    `max_coverage` px^2 (a larger one cannot be balls: its pixels are judged as background); a
    blob's region adds the pixels within RIM of it (nearest blob first); region 0 is the
    background, IGNORED the cue square.
    """
    ignored = look.ignored(frame_index)
    coverage = look.coverage(frame)
    if ignored is not None:
        coverage = np.where(ignored, 0.0, coverage)
    ball = coverage >= BALL_THRESHOLD
    if ignored is None:
        labels, n_blobs = ndimage.label(ball)
    else:  # pieces of a ball cut apart by the cue square are one blob
        labels, _ = ndimage.label(ball | ignored)
        _, labels = np.unique(np.where(ball, labels, 0), return_inverse=True)
        labels = labels.reshape(ball.shape)
        n_blobs = int(labels.max())
    sizes = ndimage.sum(coverage, labels, index=np.arange(1, n_blobs + 1))
    if (sizes > max_coverage).any():
        keep = np.concatenate([[0], np.cumsum(sizes <= max_coverage) * (sizes <= max_coverage)])
        labels, n_blobs = keep[labels], int((sizes <= max_coverage).sum())
    distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    region = np.where(distance <= RIM, labels[iy, ix], 0)
    if ignored is not None:
        region = np.where(ignored, IGNORED, region)
    return coverage, int(n_blobs), region


def judge_frame(frame, look, colours, frame_index=0, tolerances=TOLERANCES["generator"]):
    """(on-manifold, reason, blob count, background error) of one frame [H x W x 3] in grey levels.

    `colours` [n x 3]: the video's balls (bouncing_balls: from `video_colours`; cue_recall: [BALL]).
    `reason` is "" for an on-manifold frame, else the first failed criterion: "background", "count"
    (balls missing, extra or of the wrong colour) or "shape" (a blob the generator cannot draw).
    """
    n = len(colours)
    coverage, n_blobs, region = segment(frame, look, frame_index, MAX_COVERAGE * n * look.disc_area)
    background = np.abs(frame - look.background)[region == 0]
    background_error = float(background.mean()) if background.size else 0.0
    result = dict(blobs=int(n_blobs), background_error=background_error)
    peak = float(background.max()) if background.size else 0.0
    if (background_error > tolerances.background_mean * look.contrast
            or peak > tolerances.background_peak * look.contrast):
        return dict(on=False, reason="background", **result)
    may_hide = look.ignored(frame_index) is not None  # the cue square may cover the whole ball
    if n_blobs > n or (n_blobs == 0 and not may_hide):
        return dict(on=False, reason="count", **result)
    pad = int(np.ceil(look.radius)) + 2
    blobs = [_Blob(look, frame, coverage, region, label, pad) for label in range(1, n_blobs + 1)]

    # Each blob's main colour: the video colour most of its coverage is nearest to.
    mains = []
    for b in blobs:
        nearest = _nearest_colour_mask(b, colours)
        weights = np.bincount(nearest[b.own], weights=b.frame.max(-1)[b.own], minlength=n)
        mains.append(int(np.argmax(weights)))
    if len(set(mains)) < len(mains):
        return dict(on=False, reason="count", **result)
    fits = [_fit_one(b, colours[k]) for b, k in zip(blobs, mains)]
    scale = [2 * np.pi * look.radius * np.abs(colours[k] - look.background).sum() for k in mains]
    errors = [value / s for (_, value), s in zip(fits, scale)]

    missing = [k for k in range(n) if k not in mains]
    if missing and not (may_hide and n_blobs == 0):
        if len(missing) > len(blobs):  # at most one hidden ball per blob
            return dict(on=False, reason="count", **result)
        free = list(range(len(blobs)))
        for k in missing:
            best = None
            for i in free:
                e2 = _fit_two(blobs[i], colours[mains[i]], fits[i][0], colours[k], look) / scale[i]
                if e2 <= tolerances.edge and (errors[i] > tolerances.edge or errors[i] - e2 > HIDDEN_BALL_EVIDENCE):
                    if best is None or e2 < best[1]:
                        best = (i, e2)
            if best is None:
                return dict(on=False, reason="count", **result)
            errors[best[0]] = best[1]
            free.remove(best[0])
    if any(e > tolerances.edge for e in errors):
        return dict(on=False, reason="shape", **result)
    return dict(on=True, reason="", **result)


# ---------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------


def _frames_hwc(videos):
    """[N x T x C x H x W] uint8 or float [-1, 1] -> float64 [N x T x H x W x 3] grey levels."""
    x = to_pixel_scale(videos)
    if x.ndim != 5 or x.shape[2] != 3 or x.shape[3] != x.shape[4]:
        raise ValueError(f"on_manifold needs square RGB videos [N x T x 3 x H x W], got shape {x.shape}.")
    return np.moveaxis(x, 2, -1)


def judge_videos(videos, dataset, reference=None, tolerances=TOLERANCES["generator"]):
    """Per-frame verdicts of videos [N x T x C x H x W]; dict of [N x T] arrays: on, reason, blobs, background_error.

    `reference` [N x t x C x H x W]: each video's ground truth, which names its balls (bouncing_balls
    only; cue_recall's one ball is known).
    """
    frames = _frames_hwc(videos)
    look = Look.of(dataset, frames.shape[-2])
    if dataset == "bouncing_balls":
        if reference is None:
            raise ValueError("on_manifold on bouncing_balls needs the ground-truth videos, which name each video's balls.")
        reference = _frames_hwc(reference)
        if len(reference) != len(frames):
            raise ValueError(f"on_manifold got {len(frames)} videos but {len(reference)} ground-truth videos.")
    N, T = frames.shape[:2]
    out = dict(on=np.zeros((N, T), bool), reason=np.full((N, T), "", dtype=object),
               blobs=np.zeros((N, T), int), background_error=np.zeros((N, T)))
    for v in range(N):
        colours = video_colours(reference[v]) if dataset == "bouncing_balls" else cue.BALL[None].astype(np.float64)
        if len(colours) == 0:
            raise ValueError(f"Ground-truth video {v} shows no bouncing_balls palette colour.")
        for f in range(T):
            verdict = judge_frame(frames[v, f], look, colours, f, tolerances)
            out["on"][v, f] = verdict["on"]
            out["reason"][v, f] = verdict["reason"]
            out["blobs"][v, f] = verdict["blobs"]
            out["background_error"][v, f] = verdict["background_error"]
    return out


def last_quarter(T):
    """The frames [T - max(1, T // 4), T) over which the last-quarter fraction is taken."""
    return range(T - max(1, T // 4), T)


def summarize(on, n_obs=0, blobs=None, background_error=None):
    """Aggregates of a boolean [N x T] on-manifold array (see the module docstring); a JSON-ready dict."""
    on = np.asarray(on, dtype=bool)
    N, T = on.shape
    drift = []
    for row in on:
        off = np.flatnonzero(~row[n_obs:])
        drift.append(int(n_obs + off[0]) if off.size else T)
    quarter = last_quarter(T)
    out = dict(
        per_frame=[float(x) for x in on.mean(axis=0)],
        time_to_drift=drift,
        censored=[d == T for d in drift],
        median_time_to_drift=float(np.median(drift)),
        last_quarter_fraction=float(on[:, quarter.start:].mean()),
        # Per video, so a difference between schemes can be weighed against the spread over videos.
        last_quarter_per_video=[float(x) for x in on[:, quarter.start:].mean(axis=1)],
        last_quarter_frames=[quarter.start, T - 1],
    )
    if blobs is not None:
        out["blob_count"] = [float(x) for x in np.asarray(blobs).mean(axis=0)]
    if background_error is not None:
        out["background_error"] = [float(x) for x in np.asarray(background_error).mean(axis=0)]
    return out


def on_manifold(videos, dataset, reference=None, n_obs=0, tolerance="generator"):
    """Judge videos [N x T x C x H x W] and summarise; adds `off_reasons` (frames per failed criterion).

    tolerance: a TOLERANCES name, recorded in the result.
    """
    verdicts = judge_videos(videos, dataset, reference, tolerances_named(tolerance))
    out = summarize(verdicts["on"], n_obs, verdicts["blobs"], verdicts["background_error"])
    reasons = verdicts["reason"][~verdicts["on"]]
    out["off_reasons"] = {r: int((reasons == r).sum()) for r in ("background", "count", "shape") if (reasons == r).any()}
    out["tolerance"] = tolerance
    return out
