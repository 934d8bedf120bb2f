"""Training CARLA's coordinate networks (carla_regressor.py) on a CARLA folder, as FDM's recipe does.

Frames and their coordinates are read a chunk of videos at a time (a whole split does not fit
in memory); the weights with the lowest test-split loss are kept and saved with their config.
"""

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..cli import device_flag
from ..errors import CheckpointError, ConfigError, DatasetError
from .carla_coords import load_coords, load_video, read_split
from .carla_regressor import (KINDS, RESNET152_LAYERS, CoordinateModelConfig, build_model, coords_to_cells,
                              preprocess_frames, read_state, save_model)


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
            init_state = read_state(init_from, "a ResNet state dict")
        except CheckpointError as e:
            raise CheckpointError(f"--init_from: {e}") from None
    model, history = train_coordinate_model(data_dir, kind, config=config, init_state=init_state, **train_kwargs)
    save_model(out, model, kind, config)
    Path(out).with_suffix(".history.json").write_text(json.dumps(history, indent=1))
    return model, history
