"""The results folder of a sampling run: how samples and their settings are laid out on disk.

    <eval_dir>/sampling_config.json       the settings (scheme, T, n_obs, dataset, checkpoint, ...)
    <eval_dir>/samples/sample_<video:04d>-<sample_idx>.npy   uint8 [T x C x H x W]

Sampling writes these files and evaluation, the report and video_make_mp4 read them, so the
names (and the checks every reader needs) live here once.
"""

import json
import os
import re

import numpy as np

from .errors import EvalError

CONFIG_FILE = "sampling_config.json"
SAMPLE_DIR = "samples"
SAMPLE_RE = re.compile(r"sample_(\d+)-(\d+)\.npy")  # use with fullmatch


def sample_path(eval_dir, video_index, sample_idx):
    return os.path.join(eval_dir, SAMPLE_DIR, f"sample_{video_index:04d}-{sample_idx}.npy")


def write_json_atomic(path, data):
    """Write JSON so that readers see the old file or the whole new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def write_sampling_config(eval_dir, config):
    os.makedirs(eval_dir, exist_ok=True)
    write_json_atomic(os.path.join(eval_dir, CONFIG_FILE), config)


def read_sampling_config(eval_dir):
    path = os.path.join(eval_dir, CONFIG_FILE)
    if not os.path.exists(eval_dir):
        raise EvalError(f"{eval_dir} does not exist; pass a video_sample.py output folder.")
    if not os.path.isdir(eval_dir):
        raise EvalError(f"{eval_dir} is not a folder; pass a video_sample.py output folder.")
    if not os.path.isfile(path):
        raise EvalError(f"{eval_dir} has no {CONFIG_FILE}; is it a video_sample.py output folder?")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path} is not readable JSON ({e}).") from None
    if not isinstance(config, dict):
        raise EvalError(f"{path} does not hold a JSON object.")
    return config


def find_samples(eval_dir, max_videos=None, sample_idx=None, required=False):
    """[(path, video index, sample_idx)] of the samples in eval_dir, sorted by (index, sample_idx).

    Only video indices < max_videos and only the given sample_idx, when given. required: an
    EvalError when nothing matches (readers need samples; a resuming sampler does not).
    """
    sample_dir = os.path.join(eval_dir, SAMPLE_DIR)
    if not os.path.isdir(sample_dir):
        raise EvalError(f"{eval_dir} has no {SAMPLE_DIR}/ folder; sample into it with video_sample.py first.")
    found = []
    for name in os.listdir(sample_dir):
        match = SAMPLE_RE.fullmatch(name)
        if not match:
            continue
        index, idx = int(match.group(1)), int(match.group(2))
        if (max_videos is None or index < max_videos) and (sample_idx is None or idx == sample_idx):
            found.append((os.path.join(sample_dir, name), index, idx))
    if required and not found:
        which = "" if sample_idx is None else f" with sample_idx {sample_idx}"
        raise EvalError(f"{sample_dir} holds no sample_<index>-<sample_idx>.npy files{which}.")
    return sorted(found, key=lambda item: (item[1], item[2]))


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
