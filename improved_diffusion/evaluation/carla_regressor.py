"""CARLA's coordinate networks (FDM's): a cell classifier and a multi-head (x, y) regressor, built, saved, loaded.

FDM (Harvey et al. 2022, "Flexible Diffusion Modeling of Long Videos") evaluates
CARLA samples by mapping every frame to the car's (x, y) position in Town01. Their code
(plai-group/flexible-video-diffusion-modeling, `improved_diffusion/carla_regressor.py`)
runs two ResNet-152s in tandem:

- a classifier from a frame to one of 100 cells of a 10 x 10 grid over
  [-10, 400]^2 metres (Town01's extent), and
- a multi-head regressor: a ResNet-152 trunk with one Linear(2048, 2) head per
  cell; the classifier's argmax picks the head.

Frames are scaled to [0, 1] and normalised with the ImageNet mean and std
(`preprocess_frames`). Our modules use torchvision's parameter names, so FDM's released
`classifier_checkpoint.pth` / `regressor_checkpoint.pth` state dicts load as they
are, without torchvision. carla_coords.py runs the networks and scores the coordinates;
carla_training.py trains them.
"""

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..checkpoints import read_checkpoint_file
from ..data.pixels import to_pixel_scale
from ..errors import CheckpointError, ConfigError

# FDM's grid for the classifier: 10 x 10 cells over [-10, 400]^2 metres.
TOWN01_RANGE = (-10.0, 400.0)
GRID_BINS = 10
NUM_CELLS = GRID_BINS * GRID_BINS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET152_LAYERS = (3, 8, 36, 3)
KINDS = ("classifier", "regressor")


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
    checkpoint = read_state(path, f"the weights of a {kind}")
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


def read_state(path, what):
    """The dict a weights file holds (read with weights_only=True), or a CheckpointError naming the file."""
    data = read_checkpoint_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' holds a {type(data).__name__}, not {what}.")
    return data


def load_models(classifier_path, regressor_path, device="cpu"):
    """The classifier and regressor that together map frames to coordinates."""
    return load_model(classifier_path, "classifier", device), load_model(regressor_path, "regressor", device)


# ---------------------------------------------------------------------------
# Their inputs and the classifier's labels
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
