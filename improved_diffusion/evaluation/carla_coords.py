"""CARLA Town01 world coordinates from frames, and the metrics FDM builds on them.

FDM (Harvey et al. 2022, "Flexible Diffusion Modeling of Long Videos") evaluates
CARLA samples by mapping every frame to the car's (x, y) position in Town01 with two
networks (carla_regressor.py) and comparing where sampled and real cars drive.

Dataset layout (FDM's CARLA release): `video_<i>.pt` (a uint8 tensor [T x H x W x 3])
beside `coords_<i>.npy` ([T x D], D >= 2, of which we use x and y), with the
splits listed in `video_train.csv` and `video_test.csv`.

The metrics, WD and PO, are not in FDM's released code. We implement them as we
read the paper: WD is the Wasserstein distance between the distributions of the
final-frame coordinates of sampled and of real videos; PO is the percentage of
sampled positions that are outliers, i.e. farther than a threshold from every
position the car visits in the training data (off the road). The Wasserstein
order (p = 1, in metres) and the threshold (OUTLIER_THRESHOLD) are our choices;
`carla_metrics` also reports PO over final frames only, in case that was meant.
The optimal matching behind WD is scipy's `linear_sum_assignment`.

Where it is used: scripts/video_eval.py (--carla_classifier, --carla_regressor) reports WD and
PO; scripts/video_to_world_coords.py writes each sample's coordinates to `<eval_dir>/coords/`;
scripts/carla_regressor_train.py trains the two networks (carla_training.py).
"""

from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from ..cli import device_flag
from ..errors import ConfigError, DatasetError
from ..results import find_samples, read_sample
from .carla_regressor import load_models, preprocess_frames

# Our choice: a position more than this many metres from every training position is off the road.
OUTLIER_THRESHOLD = 5.0
COORDS_DIR = "coords"  # beside samples/ in a results folder, as in FDM


# ---------------------------------------------------------------------------
# Frames to coordinates
# ---------------------------------------------------------------------------


@torch.no_grad()
def predict_coords(frames, classifier, regressor, batch_size=8):
    """Regressed (x, y) of each frame [N x 3 x H x W]; returns float64 [N x 2].

    The classifier's most likely cell picks the regressor head, as in FDM.
    """
    device = next(regressor.parameters()).device
    out = []
    for start in range(0, len(frames), batch_size):
        x = preprocess_frames(frames[start:start + batch_size]).to(device)
        cells = classifier(x).argmax(dim=1)
        out.append(regressor(x, cells).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2))


def video_coords(videos, classifier, regressor, batch_size=8):
    """Regressed coordinates [B x T x 2] of videos [B x T x 3 x H x W]."""
    return np.stack([predict_coords(v, classifier, regressor, batch_size) for v in videos])


def coords_path(sample_path):
    """Where the coordinates of a sample file go: `<eval_dir>/coords/<sample file name>`, as FDM's
    `video_to_world_coords.py` saves them."""
    sample_path = Path(sample_path)
    return sample_path.parent.parent / COORDS_DIR / sample_path.name


def write_world_coords(eval_dir, classifier_path, regressor_path, batch_size=8, device="cpu", log=print):
    """Regress every sample of a results folder to (x, y) per frame, saved as float64 [T x 2] `.npy`
    files under `<eval_dir>/coords/` (FDM's layout). Files already there are kept, so an
    interrupted run resumes. Returns the paths of the coordinate files."""
    _check_coords_args(batch_size, device)
    jobs = [(coords_path(sample), lambda sample=sample: read_sample(sample, channels=3))
            for sample, _, _ in find_samples(eval_dir, required=True)]
    return _write_coords(jobs, classifier_path, regressor_path, batch_size, device, Path(eval_dir) / COORDS_DIR, log)


def write_dataset_world_coords(dataset_dir, classifier_path, regressor_path, batch_size=8, device="cpu",
                               results_root="results", log=print):
    """FDM's `--dataset_dir` mode: the coordinates the networks give for every `video_*.pt` of a CARLA
    folder, as `<results_root>/<dataset_dir>/coords/<video name>.npy` (where FDM writes them), so
    the networks' error on real videos can be measured. Existing files are kept."""
    _check_coords_args(batch_size, device)
    folder = Path(dataset_dir)
    if folder.is_absolute() or ".." in folder.parts:
        raise ConfigError(f"--dataset_dir {dataset_dir} must be a relative path inside this folder (no '..'): "
                          "its coordinates go to results/<dataset_dir>/coords.")
    if not folder.is_dir():
        raise DatasetError(f"--dataset_dir {dataset_dir} is not a folder.")
    videos = sorted(folder.glob("video_*.pt"))
    if not videos:
        raise DatasetError(f"--dataset_dir {dataset_dir} holds no video_*.pt files.")
    out_dir = Path(results_root) / folder / COORDS_DIR
    jobs = [(out_dir / f"{video.stem}.npy", lambda video=video: load_video(video)) for video in videos]
    return _write_coords(jobs, classifier_path, regressor_path, batch_size, device, out_dir, log)


def _check_coords_args(batch_size, device):
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}.")
    device_flag(device)


def _write_coords(jobs, classifier_path, regressor_path, batch_size, device, out_dir, log):
    """Run the networks on each (target path, video reader) whose target does not exist yet."""
    classifier, regressor = load_models(classifier_path, regressor_path, device)
    written = []
    for target, read_video in tqdm(jobs, desc="world coordinates"):
        if not target.exists():
            coords = predict_coords(read_video(), classifier, regressor, batch_size)
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part.npy")
            np.save(part, coords)
            part.replace(target)
        written.append(target)
    log(f"Wrote the coordinates of {len(written)} videos to {out_dir}.")
    return written


# ---------------------------------------------------------------------------
# Dataset files
# ---------------------------------------------------------------------------


def read_split(data_dir, split):
    """(video path, coords path) pairs listed in `video_<split>.csv` of a CARLA directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"The CARLA folder {data_dir} does not exist.")
    split_file = data_dir / f"video_{split}.csv"
    if not split_file.exists():
        raise DatasetError(f"No split file {split_file}; a CARLA directory lists its videos in video_<split>.csv.")
    pairs = []
    for line in split_file.read_text().splitlines():
        name = line.strip().split("/")[-1]
        if not name.startswith("video_") or not name.endswith((".pt", ".npy")):
            continue  # the header and blank lines
        video_path = data_dir / name
        coords_path = data_dir / (Path(name).stem.replace("video_", "coords_", 1) + ".npy")
        for p in (video_path, coords_path):
            if not p.exists():
                raise DatasetError(f"{split_file} lists {name} but {p} does not exist.")
        pairs.append((video_path, coords_path))
    if not pairs:
        raise DatasetError(f"{split_file} lists no videos.")
    return pairs


def load_video(path):
    """A CARLA video as uint8 [T x 3 x H x W], from `.pt` ([T x H x W x 3]) or `.npy`."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            video = torch.load(str(path), map_location="cpu", weights_only=True)
            video = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        else:
            video = np.load(path)
    except Exception as e:
        raise DatasetError(f"Could not read a video from {path} ({type(e).__name__}).") from None
    if video.ndim != 4 or 3 not in (video.shape[1], video.shape[3]):
        raise DatasetError(f"{path} holds shape {video.shape}, not an RGB video.")
    if video.shape[1] != 3:  # channels last, as FDM's .pt files
        video = video.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(video)


def load_coords(path):
    """The (x, y) columns of a coords file, float64 [T x 2]."""
    try:
        coords = np.load(path)
    except Exception as e:
        raise DatasetError(f"Could not read coordinates from {path} ({type(e).__name__}).") from None
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise DatasetError(f"{path} holds shape {coords.shape}; coordinates must be [T x D] with D >= 2.")
    return coords[:, :2].astype(np.float64)


# ---------------------------------------------------------------------------
# Metrics on coordinates
# ---------------------------------------------------------------------------


def wasserstein_distance(coords_a, coords_b, p=1):
    """p-Wasserstein distance between two equal-size empirical distributions of points.

    With N points each and uniform weights an optimal transport plan is a
    permutation (Birkhoff), so W_p = (min over matchings of mean ||a - b||^p)^(1/p);
    scipy's `linear_sum_assignment` finds that matching. p = 1 is the earth mover's
    distance, in the coordinates' units (metres).
    """
    a, b = np.asarray(coords_a, dtype=np.float64), np.asarray(coords_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"Need two N x D point sets of the same size, got {a.shape} and {b.shape}.")
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1) ** p
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** (1.0 / p))


def outliers(points, reference, threshold=OUTLIER_THRESHOLD):
    """Whether each point is farther than `threshold` from every reference point.

    Exact, via a grid of `threshold`-sized cells: only reference points in the
    3 x 3 cells around a point can be within the threshold.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 2)
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}.")
    ref_cells = np.floor(reference / threshold).astype(np.int64)
    buckets = {key: reference[idx] for key, idx in _group(ref_cells)}
    point_cells = np.floor(points / threshold).astype(np.int64)
    result = np.ones(len(points), dtype=bool)
    for key, idx in _group(point_cells):
        near = [buckets[(key[0] + dx, key[1] + dy)] for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                if (key[0] + dx, key[1] + dy) in buckets]
        if not near:
            continue
        near = np.concatenate(near)
        d2 = ((points[idx][:, None, :] - near[None, :, :]) ** 2).sum(-1).min(axis=1)
        result[idx] = d2 > threshold**2
    return result


def _group(cells):
    """Yield (cell as a tuple, indices of rows in that cell) for integer cells [N x 2]."""
    if len(cells) == 0:
        return []
    keys, inverse = np.unique(cells, axis=0, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.searchsorted(inverse.reshape(-1)[order], np.arange(len(keys) + 1))
    return [(tuple(int(c) for c in keys[k]), order[bounds[k]:bounds[k + 1]]) for k in range(len(keys))]


def percentage_outliers(coords, reference, threshold=OUTLIER_THRESHOLD):
    """Percentage of positions (any shape [... x 2]) off the road: see `outliers`."""
    return float(100.0 * outliers(coords, reference, threshold).mean())


def mean_distance_per_frame(coords_a, coords_b):
    """Mean Euclidean distance between paired trajectories at each frame index, [T].

    For completions of test videos: how far, on average, the sampled car is from
    the real one after t frames.
    """
    a, b = np.asarray(coords_a, dtype=np.float64), np.asarray(coords_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"Need two [N x T x 2] coordinate arrays of the same shape, got {a.shape} and {b.shape}.")
    return np.linalg.norm(a - b, axis=-1).mean(axis=0)


def carla_metrics(sample_coords, real_coords, train_coords, threshold=OUTLIER_THRESHOLD, p=1):
    """FDM's CARLA metrics from coordinates [N x T x 2] of sampled and real videos.

    - wd: p-Wasserstein distance between final-frame positions of the N sampled and
      the N real (test) videos.
    - po: percentage of all sampled positions that are outliers relative to the
      training positions `train_coords` (any shape [... x 2]).
    - po_final: the same over final frames only.
    Regress both sampled and real frames with the same networks (FDM's README
    regresses the dataset too) so the regressor's own error affects both sides.
    """
    samples, real = np.asarray(sample_coords, dtype=np.float64), np.asarray(real_coords, dtype=np.float64)
    if samples.ndim != 3 or real.ndim != 3 or len(samples) != len(real):
        raise ValueError(f"Need [N x T x 2] sampled and real coordinates with the same N, got {samples.shape} and "
                         f"{real.shape}.")
    is_outlier = outliers(samples.reshape(-1, 2), train_coords, threshold).reshape(samples.shape[:2])
    return dict(
        wd=wasserstein_distance(samples[:, -1], real[:, -1], p=p),
        po=float(100.0 * is_outlier.mean()),
        po_final=float(100.0 * is_outlier[:, -1].mean()),
        n_videos=len(samples),
        threshold=float(threshold),
    )


def training_positions(data_dir):
    """Every (x, y) the car visits in the training split of a CARLA folder, [N x 2]: PO's road."""
    return np.concatenate([load_coords(coords) for _, coords in read_split(data_dir, "train")])


def carla_metrics_of_videos(samples, truth, classifier, regressor, train_coords, batch_size=8):
    """`carla_metrics` of sampled and real videos [N x T x 3 x H x W], both regressed by the same networks."""
    return carla_metrics(video_coords(samples, classifier, regressor, batch_size),
                         video_coords(truth, classifier, regressor, batch_size), train_coords)
