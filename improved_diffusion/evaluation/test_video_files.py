"""Tests for video_files.py: the panels of a results folder's videos, and which ground truth they show."""

import json
from pathlib import Path

import numpy as np
import pytest

from improved_diffusion.errors import ConfigError, EvalError
from improved_diffusion.evaluation import video_files
from improved_diffusion.evaluation.video_files import BORDER

SIZE = 8


def folder_dataset(root):
    """A folder dataset whose first test video is shorter than the others.

    Sampling with n_obs = 4 builds it with T = 4, which leaves out the 3-frame video, so test
    video 0 is `1.npy`; built with T = None (the shortest length, 3) it would be `0.npy`.
    """
    rng = np.random.default_rng(0)
    for split, lengths in (("train", (6, 6)), ("test", (3, 6, 6))):
        (root / split).mkdir(parents=True)
        for i, length in enumerate(lengths):
            np.save(root / split / f"{i}.npy", rng.integers(0, 256, (length, SIZE, SIZE, 3), dtype=np.uint8))
    return root


def make_eval_dir(path, dataset, samples, n_obs):
    (path / "samples").mkdir(parents=True)
    config = dict(dataset=str(dataset), n_obs=n_obs, T=len(samples[0]), image_size=SIZE, data_seed=0)
    (path / "sampling_config.json").write_text(json.dumps(config))
    for i, sample in enumerate(samples):
        np.save(path / "samples" / f"sample_{i:04d}-0.npy", sample)
    return path


def panels(frames, width):
    """The sample and ground-truth images inside their borders, from side_by_side's frames (scale 1)."""
    inner = slice(BORDER, BORDER + width)
    right = 2 * BORDER + width + 2  # past the left panel and the 2-pixel gap
    return frames[:, inner, inner], frames[:, inner, right + BORDER:right + BORDER + width]


def test_ground_truth_is_the_video_the_sample_continued(tmp_path):
    data = folder_dataset(tmp_path / "data")
    continued = np.load(data / "test" / "1.npy")  # what test video 0 is when sampling with n_obs = 4
    sample = np.ascontiguousarray(continued.transpose(0, 3, 1, 2))
    eval_dir = make_eval_dir(tmp_path / "e", data, [sample], n_obs=4)
    [(path, frames)] = list(video_files.video_frames(eval_dir, scale=1))
    left, right = panels(frames, SIZE)
    np.testing.assert_array_equal(left, continued)
    np.testing.assert_array_equal(right, continued)
    # Observed frames are framed blue, generated ones red.
    assert tuple(frames[3, 0, 0]) == video_files.OBSERVED_COLOUR
    assert tuple(frames[4, 0, 0]) == video_files.GENERATED_COLOUR


def test_write_videos_and_errors(tmp_path):
    data = folder_dataset(tmp_path / "data")
    sample = np.load(data / "test" / "1.npy").transpose(0, 3, 1, 2).copy()
    eval_dir = make_eval_dir(tmp_path / "e", data, [sample, sample], n_obs=2)
    written = video_files.write_videos(eval_dir, scale=2, max_videos=1, log=lambda line: None)
    assert [Path(p).name for p in written] == ["sample_0000-0.mp4", "sample_0000-0.gif"]
    assert all(Path(p).stat().st_size > 0 for p in written)
    with pytest.raises(ConfigError, match="--fps must be positive"):
        video_files.write_videos(eval_dir, fps=0)
    with pytest.raises(ConfigError, match="--scale"):
        list(video_files.video_frames(eval_dir, scale=0))
    missing = make_eval_dir(tmp_path / "m", tmp_path / "no-such-data", [sample], n_obs=2)
    with pytest.raises(EvalError, match="The ground truth is unavailable"):
        list(video_files.video_frames(missing))
    assert len(list(video_files.video_frames(missing, ground_truth=False))) == 1


def test_fdms_flags_choose_videos_seeds_format_and_given_frames(tmp_path):
    """FDM's --do_n / --n_seeds / --format / --obs_length, on a folder with two videos x two sample_idx."""
    data = folder_dataset(tmp_path / "data")
    sample = np.load(data / "test" / "1.npy").transpose(0, 3, 1, 2).copy()
    eval_dir = make_eval_dir(tmp_path / "e", data, [sample, sample], n_obs=2)
    for i in range(2):
        np.save(eval_dir / "samples" / f"sample_{i:04d}-1.npy", sample)
    written = video_files.write_videos(eval_dir, scale=1, max_videos=1, n_seeds=2, formats=["gif"],
                                       ground_truth=False, log=lambda line: None)
    assert sorted(Path(p).name for p in written) == ["sample_0000-0.gif", "sample_0000-1.gif"]
    [(_, frames)] = list(video_files.video_frames(eval_dir, scale=1, max_videos=1, n_seeds=1, obs_length=5,
                                                  ground_truth=False))
    assert tuple(frames[4, 0, 0]) == video_files.OBSERVED_COLOUR  # frame 4 is given with --obs_length 5
    assert tuple(frames[5, 0, 0]) == video_files.GENERATED_COLOUR
    with pytest.raises(ConfigError, match="--format"):
        video_files.write_videos(eval_dir, formats=["avi"])
