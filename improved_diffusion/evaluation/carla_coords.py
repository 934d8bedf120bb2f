"""CARLA Town01 world coordinates from frames, and the metrics FDM builds on them.

FDM (Harvey et al. 2022, "Flexible Diffusion Modeling of Long Videos") evaluates
CARLA samples by mapping every frame to the car's (x, y) position in Town01 and
comparing where sampled and real cars drive. Their code
(plai-group/flexible-video-diffusion-modeling, `improved_diffusion/carla_regressor.py`)
runs two ResNet-152s in tandem:

- a classifier from a frame to one of 100 cells of a 10 x 10 grid over
  [-10, 400]^2 metres (Town01's extent), and
- a multi-head regressor: a ResNet-152 trunk with one Linear(2048, 2) head per
  cell; the classifier's argmax picks the head.

Frames are scaled to [0, 1] and normalised with the ImageNet mean and std. Our
modules use torchvision's parameter names, so FDM's released
`classifier_checkpoint.pth` / `regressor_checkpoint.pth` state dicts load as they
are, without torchvision.

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
scripts/carla_regressor_train.py trains the two networks.
"""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from ..checkpoints import read_checkpoint_file
from ..cli import device_flag
from ..errors import CheckpointError, ConfigError, DatasetError
from .metrics import to_pixel_scale
from ..results import find_samples, read_sample

# FDM's grid for the classifier: 10 x 10 cells over [-10, 400]^2 metres.
TOWN01_RANGE = (-10.0, 400.0)
GRID_BINS = 10
NUM_CELLS = GRID_BINS * GRID_BINS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET152_LAYERS = (3, 8, 36, 3)
# Our choice: a position more than this many metres from every training position is off the road.
OUTLIER_THRESHOLD = 5.0
KINDS = ("classifier", "regressor")
COORDS_DIR = "coords"  # beside samples/ in a results folder, as in FDM


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoordinateModelConfig:
    """Architecture of the classifier and regressor; the defaults are FDM's ResNet-152."""

    layers: tuple = RESNET152_LAYERS
    width: int = 64
    num_cells: int = NUM_CELLS

    def to_dict(self):
        return dict(layers=list(self.layers), width=self.width, num_cells=self.num_cells)

    @classmethod
    def from_dict(cls, d):
        return cls(layers=tuple(d["layers"]), width=int(d["width"]), num_cells=int(d["num_cells"]))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3x3 conv), same parameter names."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A bottleneck ResNet with torchvision's module names; ResNet-152 by default.

    `num_outputs=None` replaces the final layer by an identity, returning the
    pooled features (as FDM does for the regressor's trunk).
    """

    def __init__(self, layers=RESNET152_LAYERS, width=64, num_outputs=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride=2 if (b == 0 and i > 0) else 1))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_layers = len(layers)
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity() if num_outputs is None else nn.Linear(inplanes, num_outputs)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MultiHeadRegressor(nn.Module):
    """FDM's regressor: a ResNet trunk and one linear (x, y) head per grid cell."""

    def __init__(self, config=CoordinateModelConfig()):
        super().__init__()
        self.resnet = ResNet(config.layers, config.width, num_outputs=None)
        self.regressors = nn.ModuleList([nn.Linear(self.resnet.num_features, 2) for _ in range(config.num_cells)])

    def forward(self, frames, cells):
        """frames: normalised [N x 3 x H x W]; cells: [N] head indices. Returns [N x 2]."""
        emb = self.resnet(frames)
        weight = torch.stack([head.weight for head in self.regressors])[cells]  # [N x 2 x F]
        bias = torch.stack([head.bias for head in self.regressors])[cells]  # [N x 2]
        return torch.einsum("nof,nf->no", weight, emb) + bias


def build_model(kind, config=CoordinateModelConfig()):
    """A freshly initialised classifier (ResNet, 100 logits) or multi-head regressor."""
    if kind == "classifier":
        return ResNet(config.layers, config.width, num_outputs=config.num_cells)
    if kind == "regressor":
        return MultiHeadRegressor(config)
    raise ConfigError(f"Unknown model kind {kind!r}; choose one of {KINDS}.")


def save_model(path, model, kind, config):
    """Save plain tensors plus a JSON-able config (loadable with weights_only=True)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(dict(kind=kind, config=config.to_dict(), state_dict=state), str(path))


def load_model(path, kind, device="cpu", config=None):
    """Load one of our checkpoints, or a bare state dict such as FDM's released ones.

    A bare state dict carries no config; it is read as `config`, by default FDM's
    ResNet-152.
    """
    checkpoint = _read_state(path, f"the weights of a {kind}")
    if "state_dict" in checkpoint:
        if checkpoint.get("kind", kind) != kind:
            raise CheckpointError(f"{path} holds a {checkpoint['kind']}, not a {kind}.")
        config = CoordinateModelConfig.from_dict(checkpoint["config"])
        state = checkpoint["state_dict"]
    else:
        config, state = config or CoordinateModelConfig(), checkpoint
    model = build_model(kind, config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} does not hold weights for a {kind} with config {config} ({first_line}).") from None
    return model.to(device).eval()


def _read_state(path, what):
    """The dict a weights file holds (read with weights_only=True), or a CheckpointError naming the file."""
    data = read_checkpoint_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' holds a {type(data).__name__}, not {what}.")
    return data


def load_models(classifier_path, regressor_path, device="cpu"):
    """The classifier and regressor that together map frames to coordinates."""
    return load_model(classifier_path, "classifier", device), load_model(regressor_path, "regressor", device)


# ---------------------------------------------------------------------------
# Frames to coordinates
# ---------------------------------------------------------------------------


def coords_to_cells(coords):
    """Grid cell index (x_bin * 10 + y_bin) of each (x, y), as FDM's `get_cell`.

    FDM uses numpy.histogram2d with 10 bins per axis over [-10, 400]; positions
    outside that range (which FDM cannot handle) go to the nearest edge cell.
    """
    coords = np.asarray(coords, dtype=np.float64)[..., :2]
    low, high = TOWN01_RANGE
    bins = np.floor((coords - low) / (high - low) * GRID_BINS).astype(np.int64)
    bins = np.clip(bins, 0, GRID_BINS - 1)
    return bins[..., 0] * GRID_BINS + bins[..., 1]


def preprocess_frames(frames):
    """Frames [N x 3 x H x W] (uint8 or [-1, 1] float) to ImageNet-normalised float32."""
    x = torch.from_numpy(to_pixel_scale(frames) / 255.0).float()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"Frames must have shape [N x 3 x H x W], got {tuple(x.shape)}.")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


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


def frame_batches(pairs, batch_size, rng, videos_per_chunk=8, frames_per_video=None):
    """Shuffled (frames, coords) batches that touch every listed frame once.

    Whole CARLA splits do not fit in memory, so videos are loaded a chunk at a time
    (in random order) and their frames shuffled within the chunk.
    `frames_per_video` keeps a random subset of each video's frames.
    """
    order = rng.permutation(len(pairs))
    for start in range(0, len(order), videos_per_chunk):
        frames, coords = [], []
        for i in order[start:start + videos_per_chunk]:
            video, xy = load_video(pairs[i][0]), load_coords(pairs[i][1])
            if len(video) != len(xy):
                raise DatasetError(f"{pairs[i][0]} has {len(video)} frames but {pairs[i][1]} has {len(xy)} rows.")
            keep = np.arange(len(video))
            if frames_per_video is not None and frames_per_video < len(video):
                keep = np.sort(rng.choice(len(video), frames_per_video, replace=False))
            frames.append(video[keep])
            coords.append(xy[keep])
        frames, coords = np.concatenate(frames), np.concatenate(coords)
        perm = rng.permutation(len(frames))
        for b in range(0, len(perm), batch_size):
            sel = perm[b:b + batch_size]
            yield frames[sel], coords[sel]


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _loss(model, kind, frames, coords, device):
    x = preprocess_frames(frames).to(device)
    cells = torch.from_numpy(coords_to_cells(coords)).to(device)
    if kind == "classifier":
        return nn.functional.cross_entropy(model(x), cells)
    return nn.functional.mse_loss(model(x, cells), torch.from_numpy(coords).float().to(device))


def train_coordinate_model(data_dir, kind, config=CoordinateModelConfig(), epochs=25, batch_size=4, lr=1e-3,
                           device="cpu", seed=0, videos_per_chunk=8, frames_per_video=None, init_state=None,
                           progress=True, log=print):
    """Train FDM's classifier or regressor on a CARLA directory; returns (model, history).

    Follows FDM's recipe: SGD (momentum 0.9), learning rate decayed 10x every 7
    epochs, MSE on (x, y) for the regressor (trained on the true cells' heads),
    keeping the weights with the lowest test-split loss. Differences: the classifier
    uses cross-entropy over the 100 cells (FDM's BCE on integer cells does not
    match its output shape), and FDM's blur/colour-jitter augmentations and
    ImageNet-pretrained start are left out (no torchvision). Pass `init_state`, a
    ResNet state dict such as torchvision's ImageNet ResNet-152 weights, to start
    from pretrained features; its final layer is ignored.
    """
    if kind not in KINDS:
        raise ConfigError(f"Unknown model kind {kind!r}; choose one of {KINDS}.")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("videos_per_chunk", videos_per_chunk)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}.")
    if frames_per_video is not None and frames_per_video < 1:
        raise ConfigError(f"--frames_per_video must be at least 1, got {frames_per_video}.")
    if not lr > 0:
        raise ConfigError(f"--lr must be positive, got {lr}.")
    train_pairs, test_pairs = read_split(data_dir, "train"), read_split(data_dir, "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(kind, config)
    if init_state is not None:
        trunk = model if kind == "classifier" else model.resnet
        state = {k: v for k, v in init_state.items() if not k.startswith("fc.")}
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("fc.")]:
            raise CheckpointError("The initial weights do not match the ResNet trunk of this config.")
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_loss, best_state, history = float("inf"), None, []
    for epoch in range(epochs):
        losses = {}
        for phase, pairs in (("train", train_pairs), ("test", test_pairs)):
            model.train(phase == "train")
            # The test split sees the same frames every epoch; training reshuffles.
            rng = np.random.default_rng([seed, epoch] if phase == "train" else [seed, 2**31])
            total, count = 0.0, 0
            batches = frame_batches(pairs, batch_size, rng, videos_per_chunk, frames_per_video)
            for frames, coords in tqdm(batches, desc=f"{kind} epoch {epoch} {phase}", disable=not progress,
                                       leave=False):
                with torch.set_grad_enabled(phase == "train"):
                    loss = _loss(model, kind, frames, coords, device)
                if phase == "train":
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                total += loss.item() * len(frames)
                count += len(frames)
            losses[phase] = total / count
        scheduler.step()
        history.append(dict(epoch=epoch, **{f"{k}_loss": v for k, v in losses.items()}))
        log(f"epoch {epoch}: train loss {losses['train']:.4g}, test loss {losses['test']:.4g}")
        if losses["test"] < best_loss:
            best_loss, best_state = losses["test"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), history


def train_and_save(out, data_dir, kind, layers=RESNET152_LAYERS, width=64, init_from=None, **train_kwargs):
    """`train_coordinate_model`, then save the best weights to `out` and the loss history beside it
    (`<out stem>.history.json`). `init_from`: a ResNet state dict file to start from."""
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; name the checkpoint file to write.")
    if width < 1 or min(layers) < 1:
        raise ConfigError(f"--width and --layers must be at least 1, got width {width} and layers {list(layers)}.")
    device_flag(train_kwargs.get("device", "cpu"))
    config = CoordinateModelConfig(layers=tuple(layers), width=width)
    init_state = None
    if init_from is not None:
        try:
            init_state = _read_state(init_from, "a ResNet state dict")
        except CheckpointError as e:
            raise CheckpointError(f"--init_from: {e}") from None
    model, history = train_coordinate_model(data_dir, kind, config=config, init_state=init_state, **train_kwargs)
    save_model(out, model, kind, config)
    Path(out).with_suffix(".history.json").write_text(json.dumps(history, indent=1))
    return model, history


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
