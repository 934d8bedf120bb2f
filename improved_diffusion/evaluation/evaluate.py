"""Metrics of an eval dir: sampled videos against the ground-truth test videos they continue.

An eval dir is what scripts/video_sample.py writes: `samples/sample_<index:04d>-<sample_idx>.npy`
(uint8 [T x C x H x W]) and `sampling_config.json`. Sample `index` continues test video `index` of
the dataset named in the config, so each sample is compared with that video's first T frames.

Per-frame metrics (PSNR, SSIM, LPIPS) are averaged over samples for every frame index. Their
overall value is the mean over the *generated* frames (n_obs..T-1) only: the observed frames are
copies of the ground truth (infinite PSNR) and would say nothing about the sampler. Video metrics
(FVD, cue recall) use whole videos. `evaluate_eval_dir` writes everything to `metrics.json`
(non-finite numbers as JSON's Infinity / NaN, which Python's json reads back) and one PNG per
per-frame metric.
"""

import copy
import json
import math
import os
import sys

import numpy as np
import torch

from ..data import cue_recall as cue
from .metrics import MetricUnavailable, fvd, load_i3d, load_lpips, lpips_distance, psnr, ssim
from .plots import plot_per_frame
from .. import results
from ..errors import DatasetError, EvalError
from ..results import read_sampling_config
from ..data.datasets import cached_copy, get_dataset, video_length

METRICS = ("psnr", "ssim", "lpips", "fvd", "cue_recall")
PER_FRAME_METRICS = ("psnr", "ssim", "lpips")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fvd": False, "cue_recall": True}


# ---------------------------------------------------------------------------
# Reading an eval dir
# ---------------------------------------------------------------------------


def find_samples(eval_dir, max_videos=None):
    """`results.find_samples`, refusing a folder without samples."""
    found = results.find_samples(eval_dir, max_videos)
    if not found:
        raise EvalError(f"{os.path.join(eval_dir, results.SAMPLE_DIR)} holds no sample_<index>-<sample_idx>.npy files.")
    return found


def _stored_length(dataset, index):
    """Frames available in test video `index`, or None when any length can be made (procedural data)."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return int(lengths[index])
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return video_length(cached_copy(paths[index], dataset.source_root))
    return None


def to_uint8(video):
    """float [-1, 1] -> uint8, rounded the way video_sample.py saves samples."""
    x = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class GroundTruth:
    """The test videos a sampling run conditioned on, as uint8 [t x C x H x W] with t <= T.

    The dataset is built the way video_sample.py builds it (T = max(n_obs, 1)), so that for folder
    datasets, which leave out videos shorter than T, an index names the same video.
    """

    def __init__(self, config, data_root=None):
        self.config = config
        self.data_root = data_root
        # Datasets do not depend on the training seed; a sampling config may record another one.
        self.seed = int(config.get("data_seed", 0))
        self.dataset = self._dataset(max(int(config.get("n_obs", 0)), 1))
        self._procedural = {}  # T -> dataset: generated videos come at any length

    def _dataset(self, T):
        try:
            return get_dataset(self.config["dataset"], split="test", T=T, image_size=int(self.config["image_size"]),
                               seed=self.seed, data_root=self.data_root)
        except DatasetError as e:
            raise EvalError(f"The ground truth is unavailable: {e}") from None
        except KeyError as e:
            raise EvalError(f"sampling_config.json has no {e.args[0]!r} entry.") from None

    def video(self, index, T):
        if not 0 <= index < len(self.dataset):
            raise EvalError(f"Ground-truth video {index} does not exist: the test split of "
                            f"{self.config['dataset']!r} has {len(self.dataset)} videos.")
        try:
            length = _stored_length(self.dataset, index)
            if length is None:
                if T not in self._procedural:
                    self._procedural[T] = self._dataset(T)
                return to_uint8(self._procedural[T].video(index))
            view = copy.copy(self.dataset)  # the same files, read up to T frames
            view.T = min(T, length)
            return to_uint8(view.video(index))
        except DatasetError as e:
            raise EvalError(f"Ground-truth video {index} could not be read: {e}") from None


def load_pairs(eval_dir, config, max_videos=None, data_root=None):
    """Samples and their ground truth: (names, samples [N x T x C x H x W], truth [N x t x C x H x W], notes).

    t < T when the ground-truth videos are shorter than the samples; then the first t frames are
    compared, and a note says so.
    """
    found = find_samples(eval_dir, max_videos)
    truth_source = GroundTruth(config, data_root)
    notes = []
    names, samples, truths = [], [], []
    for path, index, _ in found:
        name = os.path.basename(path)
        try:
            sample = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EvalError(f"Sample {path} could not be read ({e}).") from None
        if sample.dtype != np.uint8 or sample.ndim != 4:
            raise EvalError(f"Sample {name} is {sample.dtype} of shape {sample.shape}, not uint8 [T x C x H x W].")
        if samples and sample.shape != samples[0].shape:
            raise EvalError(f"Sample {name} has shape {sample.shape} but {names[0]} has {samples[0].shape}.")
        truth = truth_source.video(index, len(sample))
        if truth.shape[1:] != sample.shape[1:]:
            raise EvalError(f"Sample {name} has frames of shape {sample.shape[1:]} but ground-truth video {index} "
                            f"has {truth.shape[1:]}.")
        names.append(name)
        samples.append(sample)
        truths.append(truth)
    t = min(len(x) for x in truths)
    T = len(samples[0])
    if t < T:
        notes.append(f"ground-truth videos have only {t} frames, so only frames 0..{t - 1} of the "
                     f"{T}-frame samples are compared")
    n_obs = min(int(config.get("n_obs", 0)), t)
    differ = [n for n, s, g in zip(names, samples, truths)
              if n_obs and np.abs(s[:n_obs].astype(int) - g[:n_obs].astype(int)).max() > 1]
    if differ:
        notes.append(f"the observed frames of {len(differ)} of {len(names)} samples (e.g. {differ[0]}) differ from "
                     "the ground truth, which may then not be the videos they were sampled from")
    return names, np.stack(samples), np.stack([g[:t] for g in truths]), notes


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def parse_metrics(text, dataset, have_i3d=False):
    """The metrics to compute: `text` ("psnr,ssim,...") or, if empty, every one that applies.

    By default that is PSNR, SSIM and LPIPS, FVD when an I3D file is given, and cue recall on the
    cue_recall dataset.
    """
    if text:
        names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
        unknown = [m for m in names if m not in METRICS]
        if unknown:
            raise EvalError(f"Unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}.")
        if "fvd" in names and not have_i3d:
            raise EvalError("FVD needs the I3D network: pass --i3d_path i3d_torchscript.pt (from StyleGAN-V).")
        return list(dict.fromkeys(names))
    names = ["psnr", "ssim", "lpips"]
    if have_i3d:
        names.append("fvd")
    if dataset == "cue_recall":
        names.append("cue_recall")
    return names


def _mean(values):
    """Mean in float64; +inf when a value is +inf (a frame identical to the ground truth)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def compute_metrics(samples, truth, n_obs, metrics, dataset=None, i3d_path=None, lpips_model=None, detector=None):
    """Metrics of samples [N x T x C x H x W] against truth [N x t x C x H x W] (uint8), t <= T.

    Returns dict(per_frame={name: [t values]}, overall={name: value}, skipped={name: reason},
    details={name: extra values}). `metrics` comes from `parse_metrics`.
    """
    t = truth.shape[1]
    frames = samples[:, :t]
    generated = slice(n_obs, t) if n_obs < t else slice(0, t)
    result = dict(per_frame={}, overall={}, skipped={}, details={})
    for name in metrics:
        try:
            if name in PER_FRAME_METRICS:
                if name == "psnr":
                    values = psnr(frames, truth)
                elif name == "ssim":
                    values = ssim(frames, truth)
                else:
                    model = load_lpips() if lpips_model is None else lpips_model
                    values = lpips_distance(frames, truth, model=model)
                result["per_frame"][name] = [_mean(values[:, f]) for f in range(t)]
                result["overall"][name] = _mean(values[:, generated])
            elif name == "fvd":
                result["overall"]["fvd"], result["details"]["fvd"] = _fvd(frames, truth, i3d_path, detector)
            elif name == "cue_recall":
                if dataset != "cue_recall":
                    raise MetricUnavailable(f"cue recall skipped: it applies to the cue_recall dataset, "
                                            f"not {dataset!r}.")
                if t <= cue.CUE_RETURN:
                    raise MetricUnavailable(f"cue recall skipped: videos must be longer than {cue.CUE_RETURN} frames "
                                            f"for the cue to return, got {t}.")
                scores = cue.cue_recall(frames)
                result["overall"]["cue_recall"] = scores["recall"]
                result["details"]["cue_recall"] = dict(chance=scores["chance"], shown=scores["shown"],
                                                       recall_when_shown=scores["recall_when_shown"],
                                                       matches=scores["matches"],
                                                       ground_truth_recall=cue.cue_recall(truth)["recall"])
        except MetricUnavailable as e:
            result["skipped"][name] = str(e)
        except RuntimeError as e:  # LPIPS's network refusing frames (e.g. too small for its layers)
            if name != "lpips":
                raise
            result["skipped"][name] = f"LPIPS skipped: its network failed on these frames ({str(e).splitlines()[0]})."
        except ValueError as e:  # e.g. frames too small for SSIM's window
            result["skipped"][name] = f"{name} skipped: {e}"
    return result


def _fvd(frames, truth, i3d_path, detector):
    if len(frames) < 2:
        raise EvalError(f"FVD needs at least 2 videos, but there is {len(frames)}; sample more videos.")
    if detector is None:
        if not i3d_path:
            raise EvalError("FVD needs the I3D network: pass --i3d_path i3d_torchscript.pt (from StyleGAN-V).")
        try:
            detector = load_i3d(i3d_path, device="cuda" if torch.cuda.is_available() else "cpu")
        except ValueError as e:
            raise EvalError(str(e)) from None
    try:
        out = fvd(frames, truth, detector)
    except Exception as e:  # a detector that cannot take these videos: report it in one sentence
        raise EvalError(f"FVD could not be computed with {i3d_path or 'the given detector'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    return out["fvd"], dict(n_videos=out["n_videos"], n_videos_ground_truth=out["n_videos_b"])


# ---------------------------------------------------------------------------
# One eval dir, end to end
# ---------------------------------------------------------------------------


def evaluate(eval_dir, metrics=None, i3d_path=None, max_videos=None, data_root=None, lpips_model=None, detector=None):
    """Everything metrics.json holds, for the samples in `eval_dir` (indices < max_videos if given)."""
    config = read_sampling_config(eval_dir)
    dataset = config.get("dataset")
    names_to_compute = parse_metrics(metrics, dataset, have_i3d=bool(i3d_path) or detector is not None)
    names, samples, truth, notes = load_pairs(eval_dir, config, max_videos, data_root)
    n_obs = int(config.get("n_obs", 0))
    t = truth.shape[1]
    scores = compute_metrics(samples, truth, n_obs, names_to_compute, dataset, i3d_path, lpips_model, detector)
    return {
        "eval_dir": os.path.abspath(eval_dir),
        "dataset": dataset,
        "n_videos": len(names),
        "samples": names,
        "T": int(samples.shape[1]),
        "frames_compared": int(t),
        "n_obs": n_obs,
        "overall_frames": (f"generated frames {n_obs}..{t - 1}" if n_obs < t else f"all frames 0..{t - 1}"),
        "metrics": names_to_compute,
        **scores,
        "notes": notes,
    }


def plot_path(eval_dir, metric):
    return os.path.join(eval_dir, f"{metric}_per_frame.png")


def write_metrics(eval_dir, result):
    """Write metrics.json and a per-frame plot for each per-frame metric; returns the json path."""
    plots = {}
    for name, values in result["per_frame"].items():
        path = plot_path(eval_dir, name)
        plot_per_frame({name: values}, path, title=f"{name} per frame ({result['n_videos']} videos)",
                       ylabel=name, n_obs=result["n_obs"])
        plots[name] = os.path.basename(path)
    result = {**result, "plots": plots}
    path = os.path.join(eval_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return path


def evaluate_eval_dir(eval_dir, metrics=None, i3d_path=None, max_videos=None, data_root=None, log=sys.stderr):
    """`evaluate` and `write_metrics`; notes and skipped metrics are printed to `log`."""
    result = evaluate(eval_dir, metrics, i3d_path, max_videos, data_root)
    for line in result["notes"] + list(result["skipped"].values()):
        print(f"note: {line}", file=log)
    write_metrics(eval_dir, result)
    return result


def format_value(value):
    """A metric value for a table: 4 significant digits, 'inf' for infinity, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"
