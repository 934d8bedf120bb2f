"""Metrics of an eval dir: sampled videos against the ground-truth test videos they continue.

An eval dir is what scripts/video_sample.py writes: `samples/sample_<index:04d>-<sample_idx>.npy`
(uint8 [T x C x H x W]) and `sampling_config.json`. Sample `index` continues test video `index` of
the dataset named in the config, so each sample is compared with that video's first T frames.

Per-frame metrics (PSNR, SSIM, LPIPS) are averaged over samples for every frame index. Their
overall value is the mean over the *generated* frames (n_obs..T-1) only: the observed frames are
copies of the ground truth (infinite PSNR) and would say nothing about the sampler. The on-manifold
metric (bouncing_balls and cue_recall, on_manifold.py) gives the fraction of videos whose frame is
still a valid frame of the dataset per frame index, and overall the fraction over the last quarter of
the frames and the median time to drift. Action following (bouncing_balls_actions,
action_following.py) is the fraction of generated moves of the controlled ball that match the
actions the sampler was given: the run's --actions file, else each test video's own actions (also for
--uncond samples, which then score near chance). Video metrics (FVD, cue recall) use whole videos; WD and PO (CARLA, see carla_coords.py) use the
regressed positions of whole videos. `evaluate_eval_dir` writes everything to `metrics.json`
(non-finite numbers as JSON's Infinity / NaN, which Python's json reads back) and one PNG per
per-frame metric.
"""

import math
import os
import sys

import numpy as np
import torch

from ..data import cue_recall as cue
from ..data.actions import read_actions_file
from ..data.datasets import dataset_folder
from ..errors import ConfigError, EvalError
from ..results import read_sampling_config, write_json_atomic
from . import action_following as following
from . import carla_coords
from . import on_manifold as manifold
from .ground_truth import GroundTruth
from .metrics import MetricUnavailable, fvd, load_i3d, load_lpips, lpips_distance, psnr, ssim
from .plots import plot_per_frame
from ..results import find_samples, read_sample

METRICS = ("psnr", "ssim", "lpips", "fvd", "cue_recall", "on_manifold", "action_following", "wd", "po")
PER_FRAME_METRICS = ("psnr", "ssim", "lpips")  # on_manifold is per frame too, but of its own kind
CARLA_METRICS = ("wd", "po")  # need the CARLA classifier and regressor (carla_coords.py)
CARLA_DATASET = "carla_no_traffic"
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fvd": False, "cue_recall": True, "cue_shown": True,
                    "cue_recall_when_shown": True, "wd": False,
                    "po": False, "action_following": True, "on_manifold": True, "on_manifold_last_quarter": True, "time_to_drift": True}
ON_MANIFOLD_ONLY = ("on_manifold applies to the {} datasets, whose generators define valid frames, "
                    "not to {!r}; leave it out of --metrics.")
ACTION_FOLLOWING_ONLY = ("action_following applies to the {} dataset, whose generator moves a ball by the "
                        "actions, not to {!r}; leave it out of --metrics.")
FVD_NEEDS_I3D = "FVD needs the I3D network: pass --i3d_path i3d_torchscript.pt (from StyleGAN-V)."
CARLA_NEEDS_MODELS = ("WD and PO need the CARLA coordinate networks: pass --carla_classifier PATH and "
                      "--carla_regressor PATH (FDM's classifier_checkpoint.pth and regressor_checkpoint.pth).")


# ---------------------------------------------------------------------------
# Reading an eval dir
# ---------------------------------------------------------------------------


def load_pairs(eval_dir, config, max_videos=None, data_root=None, sample_idx=None):
    """Samples and their ground truth: (names, samples [N x T x C x H x W], truth [N x t x C x H x W], notes).

    t < T when the ground-truth videos are shorter than the samples; then the first t frames are
    compared, and a note says so. `sample_idx` keeps only the samples with that index.
    """
    found = find_samples(eval_dir, max_videos, sample_idx, required=True)
    truth_source = GroundTruth(config, data_root)
    notes = []
    names, samples, truths = [], [], []
    for path, index, _ in found:
        name = os.path.basename(path)
        sample = read_sample(path)
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


def given_actions(config, eval_dir, T, data_root=None, max_videos=None, sample_idx=None):
    """The actions each sample was driven by, [N x T x D] (or [N x T] integers), in sample order.

    The run's --actions file for every video (its first T rows), else each test video's own
    actions over T frames: what a conditional run used, and what an --uncond run is scored against.
    """
    found = find_samples(eval_dir, max_videos, sample_idx, required=True)
    if config.get("actions_source") == "file":
        path = config.get("actions_file")
        try:
            stored = read_actions_file(path)
        except Exception as e:
            raise EvalError(f"The actions the samples were driven by are unavailable: {e}") from None
        if len(stored) < T:
            raise EvalError(f"Actions file {path} holds {len(stored)} actions, fewer than the {T} frames sampled.")
        return np.stack([stored[:T]] * len(found))
    truth_source = GroundTruth(config, data_root)
    return np.stack([truth_source.actions(index, T) for _, index, _ in found])


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def parse_metrics(text, dataset, have_i3d=False, have_carla=False):
    """The metrics to compute: `text` ("psnr,ssim,...") or, if empty, every one that applies.

    By default that is PSNR, SSIM and LPIPS, FVD when an I3D file is given, WD and PO when the
    CARLA networks are given, cue recall on the cue_recall dataset, and the on-manifold metric on
    bouncing_balls and cue_recall, action following on bouncing_balls_actions (asked for on another
    dataset, either is an error).
    """
    if text:
        names = [m.strip().lower() for m in str(text).split(",") if m.strip()]
        unknown = [m for m in names if m not in METRICS]
        if unknown:
            raise EvalError(f"Unknown metric {unknown[0]!r} in --metrics; choose from {', '.join(METRICS)}.")
        if "fvd" in names and not have_i3d:
            raise EvalError(FVD_NEEDS_I3D)
        if any(m in CARLA_METRICS for m in names) and not have_carla:
            raise EvalError(CARLA_NEEDS_MODELS)
        if "on_manifold" in names and dataset not in manifold.DATASETS:
            raise EvalError(ON_MANIFOLD_ONLY.format(" and ".join(manifold.DATASETS), dataset))
        if "action_following" in names and dataset != following.DATASET:
            raise EvalError(ACTION_FOLLOWING_ONLY.format(following.DATASET, dataset))
        return list(dict.fromkeys(names))
    names = ["psnr", "ssim", "lpips"]
    if have_i3d:
        names.append("fvd")
    if dataset == "cue_recall":
        names.append("cue_recall")
    if dataset in manifold.DATASETS:
        names.append("on_manifold")
    if dataset == following.DATASET:
        names.append("action_following")
    if have_carla:
        names.extend(CARLA_METRICS)
    return names


def _mean(values):
    """Mean in float64; +inf when a value is +inf (a frame identical to the ground truth)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_detector(i3d_path):
    """The I3D network for FVD, checked before any video is read."""
    if not os.path.isfile(i3d_path):
        raise EvalError(f"--i3d_path {i3d_path} does not exist or is not a file.")
    try:
        return load_i3d(i3d_path, device=_device())
    except ValueError as e:
        raise EvalError(f"--i3d_path: {e}") from None


def load_carla(classifier_path, regressor_path, dataset, data_root=None):
    """(classifier, regressor, training positions) for WD and PO, checked before any video is read.

    The training positions (PO's road) exist only for the CARLA dataset; elsewhere they are None
    and WD/PO are reported as skipped.
    """
    if classifier_path is None or regressor_path is None:
        raise ConfigError(CARLA_NEEDS_MODELS)
    classifier, regressor = carla_coords.load_models(classifier_path, regressor_path, _device())
    train = None
    if dataset == CARLA_DATASET:
        train = carla_coords.training_positions(dataset_folder(CARLA_DATASET, data_root))
    return classifier, regressor, train


def compute_metrics(samples, truth, n_obs, metrics, dataset=None, i3d_path=None, lpips_model=None, detector=None,
                    carla=None, fvd_batch_size=8, actions=None, on_manifold_tolerance="generator"):
    """Metrics of samples [N x T x C x H x W] against truth [N x t x C x H x W] (uint8), t <= T.

    Returns dict(per_frame={name: [t values]}, overall={name: value}, skipped={name: reason},
    details={name: extra values}). `metrics` comes from `parse_metrics`; `carla` from `load_carla`;
    `actions` ([N x T] integers or [N x T x D]) from `given_actions`, for action following;
    `on_manifold_tolerance` a name of on_manifold.TOLERANCES.
    """
    t = truth.shape[1]
    frames = samples[:, :t]
    result = dict(per_frame={}, overall={}, skipped={}, details={})
    run = dict(n_obs=n_obs, dataset=dataset, i3d_path=i3d_path, lpips_model=lpips_model, detector=detector,
               carla=carla, fvd_batch_size=fvd_batch_size, actions=actions, tolerance=on_manifold_tolerance,
               carla_scores=None)  # one CARLA regression serves both of its metrics
    for name in metrics:
        family = "per_frame" if name in PER_FRAME_METRICS else "carla" if name in CARLA_METRICS else name
        try:
            METRIC_FAMILIES[family](result, name, frames, truth, run)
        except MetricUnavailable as e:
            result["skipped"][name] = str(e)
        except RuntimeError as e:  # LPIPS's network refusing frames (e.g. too small for its layers)
            if name != "lpips":
                raise
            result["skipped"][name] = f"LPIPS skipped: its network failed on these frames ({str(e).splitlines()[0]})."
        except ValueError as e:  # e.g. frames too small for SSIM's window, or not RGB for the CARLA networks
            result["skipped"][name] = f"{name} skipped: {e}"
    return result


def _per_frame_metric(result, name, frames, truth, run):
    """PSNR, SSIM or LPIPS per frame, and its mean over the generated frames (all frames when none is)."""
    t = truth.shape[1]
    if name == "psnr":
        values = psnr(frames, truth)
    elif name == "ssim":
        values = ssim(frames, truth)
    else:
        values = lpips_distance(frames, truth, model=load_lpips() if run["lpips_model"] is None else run["lpips_model"])
    generated = slice(run["n_obs"], t) if run["n_obs"] < t else slice(0, t)
    result["per_frame"][name] = [_mean(values[:, f]) for f in range(t)]
    result["overall"][name] = _mean(values[:, generated])


def _fvd_metric(result, name, frames, truth, run):
    if run["detector"] is None:
        run["detector"] = load_detector(run["i3d_path"]) if run["i3d_path"] else None
    result["overall"]["fvd"], result["details"]["fvd"] = _fvd(frames, truth, run["i3d_path"], run["detector"],
                                                              run["fvd_batch_size"])


def _cue_recall_metric(result, name, frames, truth, run):
    t = truth.shape[1]
    if run["dataset"] != "cue_recall":
        raise MetricUnavailable(f"cue recall skipped: it applies to the cue_recall dataset, not {run['dataset']!r}.")
    if t <= cue.CUE_RETURN:
        raise MetricUnavailable(f"cue recall skipped: videos must be longer than {cue.CUE_RETURN} frames "
                                f"for the cue to return, got {t}.")
    scores = cue.cue_recall(frames)
    result["overall"]["cue_recall"] = scores["recall"]
    # Timing (does the cue come back at all?) and memory (its colour, when it does) apart,
    # so that tables and their spread over runs show both; None when no video shows the cue.
    result["overall"]["cue_shown"] = scores["shown"]
    result["overall"]["cue_recall_when_shown"] = scores["recall_when_shown"]
    result["details"]["cue_recall"] = dict(chance=scores["chance"], shown=scores["shown"],
                                           recall_when_shown=scores["recall_when_shown"],
                                           matches=scores["matches"],
                                           ground_truth_recall=cue.cue_recall(truth)["recall"])


def _on_manifold_metric(result, name, frames, truth, run):
    dataset = run["dataset"]
    if dataset not in manifold.DATASETS:
        raise EvalError(ON_MANIFOLD_ONLY.format(" and ".join(manifold.DATASETS), dataset))
    scores = manifold.on_manifold(frames, dataset, truth, min(run["n_obs"], truth.shape[1]), run["tolerance"])
    result["per_frame"]["on_manifold"] = scores.pop("per_frame")
    result["overall"]["on_manifold_last_quarter"] = scores["last_quarter_fraction"]
    result["overall"]["time_to_drift"] = scores["median_time_to_drift"]
    result["details"]["on_manifold"] = scores


def _action_following_metric(result, name, frames, truth, run):
    t, actions = truth.shape[1], run["actions"]
    if run["dataset"] != following.DATASET:
        raise EvalError(ACTION_FOLLOWING_ONLY.format(following.DATASET, run["dataset"]))
    if actions is None:
        raise EvalError("action_following needs the actions the samples were driven by.")
    first = max(min(run["n_obs"], t) - 1, 0)  # the first move into a generated frame
    if first >= t - 1:
        raise MetricUnavailable(f"action_following skipped: no generated move in {t} frames.")
    scores = following.action_following(frames, actions, first=first)
    result["overall"]["action_following"] = scores["score"]
    result["details"]["action_following"] = dict(
        chance=scores["chance"], found=scores["found"], n_transitions=scores["n_transitions"],
        first_transition=first, per_video=scores["per_video"],
        ground_truth=following.action_following(truth, actions, first=first)["score"])


def _carla_metric(result, name, frames, truth, run):
    carla, dataset = run["carla"], run["dataset"]
    if carla is None:
        raise EvalError(CARLA_NEEDS_MODELS)
    if dataset != CARLA_DATASET or carla[2] is None:
        raise MetricUnavailable(f"{name} skipped: it applies to the {CARLA_DATASET} dataset, not {dataset!r}.")
    if run["carla_scores"] is None:
        run["carla_scores"] = carla_coords.carla_metrics_of_videos(frames, truth, *carla)
    scores = run["carla_scores"]
    result["overall"][name] = scores[name]
    result["details"][name] = (dict(n_videos=scores["n_videos"], frame=truth.shape[1] - 1) if name == "wd" else
                               dict(po_final=scores["po_final"], threshold_m=scores["threshold"]))


METRIC_FAMILIES = {"per_frame": _per_frame_metric, "fvd": _fvd_metric, "cue_recall": _cue_recall_metric,
                   "on_manifold": _on_manifold_metric, "action_following": _action_following_metric,
                   "carla": _carla_metric}


def _fvd(frames, truth, i3d_path, detector, batch_size=8):
    if len(frames) < 2:
        raise EvalError(f"FVD needs at least 2 videos, but there is {len(frames)}; sample more videos.")
    if detector is None:
        raise EvalError(FVD_NEEDS_I3D)
    try:
        out = fvd(frames, truth, detector, batch_size=batch_size)
    except Exception as e:  # a detector that cannot take these videos: report it in one sentence
        raise EvalError(f"FVD could not be computed with {i3d_path or 'the given detector'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    return out["fvd"], dict(n_videos=out["n_videos"], n_videos_ground_truth=out["n_videos_b"])


# ---------------------------------------------------------------------------
# One eval dir, end to end
# ---------------------------------------------------------------------------


def evaluate(eval_dir, metrics=None, i3d_path=None, max_videos=None, data_root=None, lpips_model=None, detector=None,
             *, carla_classifier=None, carla_regressor=None, sample_idx=None, fvd_batch_size=8,
             on_manifold_tolerance="generator"):
    """Everything metrics.json holds, for the samples in `eval_dir` (indices < max_videos if given).

    Every flag and file (metric names, I3D and CARLA weights, the dataset) is checked before any
    sample is read.
    """
    if max_videos is not None and max_videos < 1:
        raise ConfigError(f"--max_videos must be at least 1, got {max_videos}.")
    if fvd_batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {fvd_batch_size}.")
    if (carla_classifier is None) != (carla_regressor is None):
        raise ConfigError(CARLA_NEEDS_MODELS)
    if on_manifold_tolerance not in manifold.TOLERANCES:
        raise ConfigError(f"--on_manifold_tolerance must be one of {', '.join(manifold.TOLERANCES)}, "
                          f"got {on_manifold_tolerance!r}.")
    config = read_sampling_config(eval_dir)
    dataset = config.get("dataset")
    have_carla = carla_classifier is not None
    names_to_compute = parse_metrics(metrics, dataset, have_i3d=bool(i3d_path) or detector is not None,
                                     have_carla=have_carla)
    if "fvd" in names_to_compute and detector is None:
        detector = load_detector(i3d_path)
    carla = None
    if any(m in CARLA_METRICS for m in names_to_compute):
        carla = load_carla(carla_classifier, carla_regressor, dataset, data_root)
    names, samples, truth, notes = load_pairs(eval_dir, config, max_videos, data_root, sample_idx)
    n_obs = int(config.get("n_obs", 0))
    t = truth.shape[1]
    actions = None
    if "action_following" in names_to_compute:
        actions = given_actions(config, eval_dir, samples.shape[1], data_root, max_videos, sample_idx)
    scores = compute_metrics(samples, truth, n_obs, names_to_compute, dataset, i3d_path, lpips_model, detector,
                             carla, fvd_batch_size, actions, on_manifold_tolerance)
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
    write_json_atomic(path, result)
    return path


def evaluate_eval_dir(eval_dir, metrics=None, i3d_path=None, max_videos=None, data_root=None, log=sys.stderr,
                      **options):
    """`evaluate` (with its keyword `options`) and `write_metrics`; notes and skipped metrics go to `log`."""
    result = evaluate(eval_dir, metrics, i3d_path, max_videos, data_root, **options)
    _print_notes(result, log)
    write_metrics(eval_dir, result)
    return result


def _print_notes(result, log):
    for line in result["notes"] + list(result["skipped"].values()):
        print(f"note: {line}", file=log)


def fvd_of_eval_dir(eval_dir, i3d_path, num_videos=None, sample_idx=0, batch_size=8, data_root=None,
                    log=sys.stderr):
    """FVD of one sample per test video (`sample_idx`) against the test videos; FDM's video_fvd.py.

    Like FDM, the value is also saved as `<eval_dir>/fvd-<videos>-<sample_idx>.txt`. Returns
    (fvd, that path).
    """
    if not i3d_path:
        raise EvalError(FVD_NEEDS_I3D)
    result = evaluate(eval_dir, "fvd", i3d_path, num_videos, data_root, sample_idx=sample_idx,
                      fvd_batch_size=batch_size)
    _print_notes(result, log)
    value = result["overall"]["fvd"]
    path = os.path.join(eval_dir, f"fvd-{result['n_videos']}-{sample_idx}.txt")
    np.savetxt(path, np.array([value]))
    return value, path


def format_value(value):
    """A metric value for a table: 4 significant digits, 'inf' for infinity, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"
