"""
Bouncing balls: a procedural video dataset that needs no download.

Each video is a few coloured, anti-aliased discs on a black background moving at
constant velocity and bouncing elastically off the walls (balls pass through each
other). It is meant to be easy: a tiny diffusion model trained for minutes on a CPU
should learn it, so the toolkit can be demonstrated and tested end to end.

Videos are a pure function of (split, index, seed): nothing is stored on disk.

Defaults (all are keyword arguments of `make_video`):

    parameter       default             meaning
    --------------  ------------------  ----------------------------------------------
    T               DEFAULT_T = 100     frames per video
    start           0                   first frame (a window of a longer video)
    image_size      32                  height = width in pixels
    num_balls       (1, 2)              inclusive range; drawn per video
    radius          1/8                 ball radius as a fraction of image_size
    speed           (1.0, 2.0)          pixels per frame at image_size 32; scaled with
                                        image_size so motion looks the same at any size
    colours         PALETTE             distinct saturated colours, no repeats in a video

    split   number of videos (NUM_VIDEOS)
    train   10,000 (any non-negative index works; this is the default dataset length)
    test    100
"""

import numpy as np

DEFAULT_T = 100
DEFAULT_IMAGE_SIZE = 32
DEFAULT_NUM_BALLS = (1, 2)
DEFAULT_RADIUS = 1 / 8
DEFAULT_SPEED = (1.0, 2.0)
REFERENCE_SIZE = 32  # speeds are given in pixels per frame at this image size

NUM_VIDEOS = {"train": 10_000, "test": 100}

# Distinct fully saturated colours; a video never uses one twice.
PALETTE = np.array(
    [
        [255, 40, 40],  # red
        [40, 255, 40],  # green
        [60, 110, 255],  # blue
        [255, 235, 40],  # yellow
        [40, 235, 255],  # cyan
        [255, 40, 255],  # magenta
        [255, 150, 30],  # orange
        [255, 255, 255],  # white
    ],
    dtype=np.float64,
)

# Mixed into the seed so that the streams of different splits never coincide.
_SPLIT_IDS = {"train": 0, "test": 1}


def video_rng(split, index, seed=0):
    """The generator that defines video `index` of `split`; separate splits get separate streams."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r} for bouncing_balls; expected one of {sorted(_SPLIT_IDS)}.")
    if index < 0:
        raise ValueError(f"Video index must be non-negative, got {index}.")
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]))


def _fold(x, lo, hi):
    """Position on [lo, hi] of a point that moved freely to `x` and bounced elastically off both ends."""
    length = hi - lo
    if length <= 0:
        return np.full_like(x, (lo + hi) / 2)
    y = np.mod(x - lo, 2 * length)
    return lo + np.where(y <= length, y, 2 * length - y)


def ball_trajectories(rng, T, image_size, num_balls, radius, speed, start=0):
    """
    Centres of every ball in frames start .. start + T - 1, [T x N x 2] (x, y) in pixel units.

    Bounces are computed in closed form (a triangle wave), so a long video never
    drifts and every ball stays fully inside the frame.
    """
    lo, hi = radius, image_size - radius
    origin = rng.uniform(lo, hi, size=(num_balls, 2))
    angle = rng.uniform(0, 2 * np.pi, size=num_balls)
    scale = image_size / REFERENCE_SIZE
    magnitude = rng.uniform(speed[0], speed[1], size=num_balls) * scale
    velocity = np.stack([np.cos(angle), np.sin(angle)], axis=-1) * magnitude[:, None]
    t = np.arange(start, start + T, dtype=np.float64)[:, None, None]
    return _fold(origin[None] + velocity[None] * t, lo, hi)


def render(centres, colours, radius, image_size):
    """
    Draw discs with analytically anti-aliased edges: each pixel is covered in
    proportion to how far its centre lies inside the circle (a one-pixel ramp).

    centres: [T x N x 2], colours: [N x 3] -> uint8 [T x H x W x 3]
    """
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    frames = np.zeros((centres.shape[0], image_size, image_size, 3), dtype=np.float64)
    for n in range(centres.shape[1]):
        dx = coords[None, None, :] - centres[:, n, 0, None, None]
        dy = coords[None, :, None] - centres[:, n, 1, None, None]
        distance = np.sqrt(dx**2 + dy**2)
        alpha = np.clip(radius - distance + 0.5, 0.0, 1.0)[..., None]
        frames = frames * (1 - alpha) + colours[n] * alpha
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def make_video(
    split,
    index,
    seed=0,
    T=DEFAULT_T,
    image_size=DEFAULT_IMAGE_SIZE,
    num_balls=DEFAULT_NUM_BALLS,
    radius=DEFAULT_RADIUS,
    speed=DEFAULT_SPEED,
    start=0,
):
    """
    Video `index` of `split` as uint8 [T x H x W x 3]; the same arguments always give the same video.

    num_balls and speed are (low, high) ranges (an int / float fixes them); radius is
    a fraction of image_size. start skips that many frames: make_video(..., T=8, start=5)
    equals make_video(..., T=13)[5:], without drawing the skipped frames.
    See the module docstring for the defaults.
    """
    rng = video_rng(split, index, seed)
    if isinstance(num_balls, int):
        num_balls = (num_balls, num_balls)
    if isinstance(speed, (int, float)):
        speed = (speed, speed)
    if not 1 <= num_balls[0] <= num_balls[1] <= len(PALETTE):
        raise ValueError(f"num_balls must lie in [1, {len(PALETTE)}], got {num_balls}.")
    n = int(rng.integers(num_balls[0], num_balls[1] + 1))
    radius_px = radius * image_size
    colours = PALETTE[rng.choice(len(PALETTE), size=n, replace=False)]
    centres = ball_trajectories(rng, T, image_size, n, radius_px, speed, start)
    return render(centres, colours, radius_px, image_size)
