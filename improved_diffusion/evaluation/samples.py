"""Reading the sample files of a results folder, with one-sentence errors for what can be wrong.

The layout itself (names, folders) lives in `improved_diffusion.results`; this module adds the
checks every reader needs: at least one sample, and files that hold uint8 [T x C x H x W] videos.
"""

import os

import numpy as np

from .. import results
from ..errors import EvalError


def find_samples(eval_dir, max_videos=None, sample_idx=None):
    """`results.find_samples`, refusing a folder without (matching) samples."""
    found = results.find_samples(eval_dir, max_videos, sample_idx)
    if not found:
        which = "" if sample_idx is None else f" with sample_idx {sample_idx}"
        raise EvalError(f"{os.path.join(eval_dir, results.SAMPLE_DIR)} holds no "
                        f"sample_<index>-<sample_idx>.npy files{which}.")
    return found


def read_sample(path, channels=None):
    """A sample file as uint8 [T x C x H x W]; `channels` (e.g. 3) is required when given."""
    try:
        video = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise EvalError(f"Sample {path} could not be read ({type(e).__name__}).") from None
    if video.dtype != np.uint8 or video.ndim != 4 or (channels is not None and video.shape[1] != channels):
        want = "[T x C x H x W]" if channels is None else f"[T x {channels} x H x W]"
        raise EvalError(f"Sample {path} is {video.dtype} of shape {video.shape}, not uint8 {want}.")
    return video
