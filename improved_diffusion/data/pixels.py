"""Pixel conversions between the package's float frames in [-1, 1] and uint8 frames on disk."""

import numpy as np
import torch


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
