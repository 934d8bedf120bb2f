"""Cue recall: a procedural long-range memory benchmark and its pixel-only metric.

Each video shows a ball bouncing on a dark background. A coloured square (the cue)
in the top-left corner is visible in frames [0, CUE_VISIBLE), hidden in frames
[CUE_VISIBLE, CUE_RETURN) and visible again, with the same colour, from CUE_RETURN
to the end. The colour is one of NUM_COLOURS well-separated palette colours.

With the defaults the cue is hidden for 10 frames, so the last start frame showing it (3)
and the first return frame (14) are 11 frames apart: more than the 8-frame windows of the
models this benchmark is sized for (a few CPU minutes of training). A sampler gets the
return colour right more often than chance (1 / NUM_COLOURS) only if the frames that
generate the return keep an early frame in their conditioning set, which is what the frame
plans of FDM differ in. Nothing else in the video tells the colour: the ball's motion is
independent of it. The same holds for *when* the cue returns: a network that sees frame
positions only relative to each other (FDM's) cannot tell frames 8-11 from frames 4-7, so a
plan whose context holds only hidden-cue frames must guess the timing (README, `cue_shown`).
For larger windows raise CUE_RETURN (and DEFAULT_T) above the window.
Measured: with a 20-frame return gap (CUE_RETURN 24, T 32) a 20-minute CPU model drew the
returning cue in only 4-23 % of sampled videos; with 10 hidden frames in 25-44 %, often
enough to separate the schemes (README).

`cue_recall` reads the colours from pixels alone (no network), so it can score
samples from any model on this dataset.
"""

import zlib

import numpy as np

from .pixels import to_pixel_scale

DEFAULT_T = 20
DEFAULT_IMAGE_SIZE = 32
NUM_COLOURS = 4
CUE_VISIBLE = 4   # the cue is visible in frames [0, CUE_VISIBLE)
CUE_RETURN = 14   # ... hidden until CUE_RETURN, then visible to the end
NUM_VIDEOS = {"train": 10_000, "test": 100}  # split sizes a dataset loader should use

# RGB cue colours, far apart from each other, from the background and from the ball.
PALETTE = np.array(
    [
        [220, 40, 40],   # red
        [40, 200, 60],   # green
        [50, 90, 230],   # blue
        [230, 200, 40],  # yellow
    ],
    dtype=np.uint8,
)
BACKGROUND = np.array([30, 30, 30], dtype=np.uint8)
BALL = np.array([200, 200, 200], dtype=np.uint8)
assert len(PALETTE) == NUM_COLOURS


def cue_box(image_size):
    """(top, bottom, left, right) pixel bounds of the cue square in a square frame."""
    margin = max(1, image_size // 16)
    size = max(2, image_size // 4)
    return margin, margin + size, margin, margin + size


def _rng(split, index, seed):
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index} and seed={seed}.")
    # crc32 rather than hash(): Python salts string hashes per process.
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def cue_colour_index(split, index, seed=0):
    """The palette index of video (split, index, seed)'s cue colour."""
    return int(_rng(split, index, seed).integers(NUM_COLOURS))


def make_video(split, index, seed=0, T=DEFAULT_T, image_size=DEFAULT_IMAGE_SIZE):
    """One benchmark video, uint8 [T x H x W x 3], a pure function of (split, index, seed).

    `split` is any name ("train", "test", ...); different names give independent videos.
    """
    if T <= CUE_RETURN:
        raise ValueError(f"Videos must be longer than CUE_RETURN={CUE_RETURN} frames so the cue returns, got T={T}.")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
    rng = _rng(split, index, seed)
    colour = PALETTE[rng.integers(NUM_COLOURS)]  # first draw: must match cue_colour_index

    # The ball bounces off the frame edges with constant speed.
    radius = max(2, image_size // 10)
    low, high = radius, image_size - 1 - radius
    position = rng.uniform(low, high, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.04, 0.08) * image_size  # pixels per frame
    velocity = speed * np.array([np.cos(angle), np.sin(angle)])
    centres = np.empty((T, 2))
    for t in range(T):
        centres[t] = position
        position = position + velocity
        for axis in range(2):
            if position[axis] < low:
                position[axis] = 2 * low - position[axis]
                velocity[axis] = -velocity[axis]
            elif position[axis] > high:
                position[axis] = 2 * high - position[axis]
                velocity[axis] = -velocity[axis]

    video = np.empty((T, image_size, image_size, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    yy, xx = np.mgrid[:image_size, :image_size]
    inside = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2 <= radius**2
    video[inside] = BALL
    top, bottom, left, right = cue_box(image_size)
    video[:CUE_VISIBLE, top:bottom, left:right] = colour  # drawn over the ball
    video[CUE_RETURN:, top:bottom, left:right] = colour
    return video


def make_videos(split, n, seed=0, T=DEFAULT_T, image_size=DEFAULT_IMAGE_SIZE):
    """Videos 0..n-1 of a split, stacked as uint8 [n x T x H x W x 3]."""
    return np.stack([make_video(split, i, seed=seed, T=T, image_size=image_size) for i in range(n)])


NO_CUE = -1  # classify_cue's answer when the square shows the background, not a cue


def classify_cue(video, frames, palette=PALETTE):
    """Palette index nearest to the mean colour of the cue square over `frames`, or NO_CUE
    when the background colour is nearer than every palette colour (no cue drawn).

    `video` is [T x C x H x W], uint8 or float in [-1, 1]; `frames` indexes its time axis.
    """
    video = to_pixel_scale(video)
    if video.ndim != 4 or video.shape[1] != 3 or video.shape[2] != video.shape[3]:
        raise ValueError(f"Each video must be a square RGB [T x C x H x W] array, got shape {video.shape}.")
    top, bottom, left, right = cue_box(video.shape[2])
    patch = video[frames][:, :, top:bottom, left:right]
    if patch.shape[0] == 0:
        raise ValueError(f"No frames selected from a video of {video.shape[0]} frames.")
    mean_colour = patch.mean(axis=(0, 2, 3))
    distances = np.linalg.norm(np.asarray(palette, dtype=np.float64) - mean_colour, axis=1)
    if np.linalg.norm(BACKGROUND.astype(np.float64) - mean_colour) < distances.min():
        return NO_CUE
    return int(np.argmin(distances))


def cue_recall(videos, start_frames=CUE_VISIBLE, return_frame=CUE_RETURN, palette=PALETTE):
    """Fraction of videos whose returning cue has the colour shown at the start.

    videos: [B x T x C x H x W] (or a list of [T x C x H x W]), uint8 or float in [-1, 1].
    The start colour is read from frames [0, start_frames), the return colour from
    frames [return_frame, T). Real videos score 1.0; a model that draws the returning cue
    in a random colour scores about `chance` = 1 / len(palette), and one that does not draw
    it at all scores 0 (a missing cue is never a match). `shown` is the fraction of videos
    whose cue square shows a cue colour at the return, whatever the colour, and
    `recall_when_shown` the recall among those videos (memory of the colour, apart from
    knowing when the cue returns; None when no video shows it).
    """
    if len(videos) == 0:
        raise ValueError("cue_recall needs at least one video.")
    starts, returns = [], []
    for video in videos:
        if len(video) <= return_frame:
            raise ValueError(f"Videos must be longer than return_frame={return_frame} frames, got {len(video)}.")
        starts.append(classify_cue(video, slice(0, start_frames), palette))
        returns.append(classify_cue(video, slice(return_frame, None), palette))
    matches = [s == r != NO_CUE for s, r in zip(starts, returns)]
    shown_matches = [m for m, r in zip(matches, returns) if r != NO_CUE]
    return dict(
        recall=float(np.mean(matches)),
        shown=float(np.mean([r != NO_CUE for r in returns])),
        recall_when_shown=float(np.mean(shown_matches)) if shown_matches else None,
        chance=1.0 / len(palette),
        n_videos=len(matches),
        matches=matches,
        start_colours=starts,
        return_colours=returns,
    )
