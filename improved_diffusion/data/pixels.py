"""Pixel conventions: the package's float frames in [-1, 1], uint8 frames on disk, and the [0, 255] scale of metrics."""

import numpy as np
import torch

# How far outside [-1, 1] a float frame may stray (rounding) before we refuse it.
FLOAT_RANGE_TOLERANCE = 1e-3


def to_uint8(frames):
    """Float frames in [-1, 1] -> uint8 in [0, 255], rounded to the nearest level and clipped.

    A tensor gives a CPU uint8 tensor, anything else a numpy array. Every sample file, preview and
    ground-truth video goes through here, so all of them quantise the same way.
    """
    if torch.is_tensor(frames):
        return ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = np.asarray(frames, dtype=np.float64)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(frames):
    """uint8 frames in [0, 255] -> float32 in [-1, 1] (a tensor for a tensor, else a numpy array)."""
    if torch.is_tensor(frames):
        return frames.float() / 127.5 - 1.0
    return np.asarray(frames, dtype=np.float32) / 127.5 - 1.0


def to_numpy(x):
    """A numpy array of a tensor (detached, on the CPU) or of anything numpy can read."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_float_frames(x):
    """ValueError unless numpy array `x` is float and within [-1, 1] (up to FLOAT_RANGE_TOLERANCE)."""
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Frames must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}.")
    if x.size and (x.min() < -1 - FLOAT_RANGE_TOLERANCE or x.max() > 1 + FLOAT_RANGE_TOLERANCE):
        raise ValueError(
            f"Float frames must lie in [-1, 1] (got [{x.min():.3g}, {x.max():.3g}]); clip them or pass uint8."
        )


def to_pixel_scale(x):
    """Frames as float64 in [0, 255]: uint8 as is, float [-1, 1] mapped linearly.

    Float frames are not quantised, so a float frame and its uint8 rounding differ
    by at most half a grey level.
    """
    x = to_numpy(x)
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    check_float_frames(x)
    return (x.astype(np.float64) + 1.0) * 127.5
