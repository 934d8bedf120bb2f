"""Writing sampled videos to look at: mp4 (imageio-ffmpeg) and gif, side by side with
ground truth, observed frames framed in one colour and generated frames in another.

`write_videos` does it for a whole results folder (scripts/video_make_mp4.py); its ground truth
comes from `GroundTruth`, the same videos evaluation compares with.
"""

import os

import imageio.v2 as imageio
import numpy as np

from ..errors import ConfigError, EvalError
from ..results import read_sampling_config
from .ground_truth import GroundTruth
from ..results import find_samples, read_sample

OBSERVED_COLOUR = (40, 110, 255)  # blue border: a frame the model was given
GENERATED_COLOUR = (230, 40, 40)  # red border: a frame the model generated
BORDER = 2


def to_hwc_uint8(frames):
    """uint8 [T x C x H x W] or [T x H x W x C] -> uint8 [T x H x W x 3]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if frames.ndim != 4:
        raise ValueError(f"expected 4-d frames, got shape {frames.shape}")
    if frames.shape[1] in (1, 3) and frames.shape[-1] not in (1, 3):
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def add_borders(frames, observed):
    """Frame each image [T x H x W x 3] with the observed or generated colour."""
    T, H, W, _ = frames.shape
    out = np.empty((T, H + 2 * BORDER, W + 2 * BORDER, 3), dtype=np.uint8)
    for t in range(T):
        out[t] = OBSERVED_COLOUR if observed[t] else GENERATED_COLOUR
        out[t, BORDER:BORDER + H, BORDER:BORDER + W] = frames[t]
    return out


def upscale(frames, factor):
    """Nearest-neighbour upscaling so small videos are visible (and ffmpeg-friendly sizes)."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def side_by_side(sample, observed, ground_truth=None, scale=4):
    """[T x H' x W' x 3]: the bordered sample, and the ground truth to its right when given.

    Ground truth shorter than the sample is padded with black frames.
    """
    sample = to_hwc_uint8(sample)
    left = add_borders(sample, observed)
    panels = [left]
    if ground_truth is not None:
        gt = to_hwc_uint8(ground_truth)[: len(sample)]
        if len(gt) < len(sample):
            gt = np.concatenate([gt, np.zeros((len(sample) - len(gt), *gt.shape[1:]), dtype=np.uint8)])
        panels.append(add_borders(gt, np.ones(len(sample), dtype=bool)))
    gap = np.full((len(sample), left.shape[1], 2, 3), 255, dtype=np.uint8)
    frames = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=2)
    frames = upscale(frames, scale)
    # H.264 wants even sizes.
    H, W = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))


def write_mp4(frames, path, fps=8):
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)


def write_gif(frames, path, fps=8):
    imageio.mimsave(path, list(frames), duration=1.0 / fps, loop=0)


def video_frames(eval_dir, scale=4, max_videos=None, ground_truth=True, data_root=None, n_seeds=None,
                 obs_length=0):
    """Yield (sample path, frames [T x H' x W' x 3]) for the samples of test videos 0..max_videos-1.

    n_seeds: only sample_idx 0..n_seeds-1 of each video (default: all). obs_length > 0 marks that many
    frames as given instead of the run's n_obs (FDM's flag). Every flag is checked, and the ground
    truth found, before the first video is made.
    """
    if not scale >= 1:
        raise ConfigError(f"--scale must be a whole number of at least 1, got {scale}.")
    for flag, value in (("max_videos", max_videos), ("n_seeds", n_seeds)):
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {value}.")
    if obs_length < 0:
        raise ConfigError(f"--obs_length must be 0 (the run's n_obs) or positive, got {obs_length}.")
    config = read_sampling_config(eval_dir)
    found = [f for f in find_samples(eval_dir, max_videos, required=True) if n_seeds is None or f[2] < n_seeds]
    try:
        n_obs = obs_length or int(config["n_obs"])
    except (KeyError, TypeError, ValueError):
        raise EvalError(f"{eval_dir}'s sampling_config.json has no whole-number 'n_obs' entry.") from None
    truth = GroundTruth(config, data_root) if ground_truth else None
    for path, index, _ in found:
        sample = read_sample(path)
        gt = truth.video(index, len(sample)) if truth is not None else None
        yield path, side_by_side(sample, np.arange(len(sample)) < n_obs, gt, scale=scale)


VIDEO_FORMATS = ("mp4", "gif")


def write_videos(eval_dir, out_dir=None, fps=8, scale=4, max_videos=None, ground_truth=True, data_root=None,
                 n_seeds=None, obs_length=0, formats=VIDEO_FORMATS, log=print):
    """A video file per sample and format of a results folder, in `out_dir` (default `<eval_dir>/videos`).

    Returns the paths written. A missing ground-truth dataset is an EvalError naming it; pass
    ground_truth=False (--no_ground_truth) to show the samples alone.
    """
    if not fps > 0:
        raise ConfigError(f"--fps must be positive, got {fps}.")
    unknown = [f for f in formats if f not in VIDEO_FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format must name one or more of {', '.join(VIDEO_FORMATS)}, got {', '.join(formats)}.")
    out_dir = out_dir or os.path.join(eval_dir, "videos")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out_dir {out_dir} is a file, not a folder.")
    writers = {"mp4": write_mp4, "gif": write_gif}
    written = []
    for path, frames in video_frames(eval_dir, scale, max_videos, ground_truth, data_root, n_seeds, obs_length):
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, os.path.basename(path)[: -len(".npy")])
        for fmt in formats:
            writers[fmt](frames, f"{stem}.{fmt}", fps=fps)
            log(f"{stem}.{fmt}")
            written.append(f"{stem}.{fmt}")
    return written
