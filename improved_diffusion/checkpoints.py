"""Reading model checkpoints: ours and FDM's, {"config": flat dict, "state_dict", "step"}.

Files load with `torch.load(weights_only=True)` through blobfile (local paths, gs://, az://):
loading never runs code. Writing checkpoints during training is `training/checkpoint_io.py`.
"""

import io
import os

import blobfile as bf
import torch

from .diffusion import DiffusionConfig, create_diffusion
from .errors import CheckpointError
from .cli import dataclass_from_dict
from .models import ModelConfig, create_model, infer_channel_mult


def read_checkpoint_file(path):
    """torch.load through blobfile (local paths, gs://, az://), weights only."""
    if not bf.exists(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    if bf.isdir(path):
        raise CheckpointError(f"Checkpoint '{path}' is a directory, not a checkpoint file.")
    try:
        with bf.BlobFile(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"Checkpoint '{path}' could not be read ({e.strerror or type(e).__name__}).") from None
    if not data:
        raise CheckpointError(f"Checkpoint '{path}' is empty.")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        if "Unsupported global" in str(e):  # a pickle that names functions or classes to call
            raise CheckpointError(f"Checkpoint '{path}' holds Python objects that loading would have to run, "
                                  "so it is refused: a checkpoint may hold only tensors and plain data.") from None
        raise CheckpointError(f"Checkpoint '{path}' is corrupt or not a checkpoint ({first_sentence(e)}).") from None


def first_sentence(error):
    """The first sentence of an exception's message: torch.load's explanations run to paragraphs."""
    text = " ".join(str(error).split())
    if not text:
        return type(error).__name__
    end = text.find(". ")
    return text if end < 0 else text[:end]


def read_model_checkpoint(path):
    """The {"config", "state_dict", "step"} dict of a model checkpoint (ours or FDM's), checked."""
    data = read_checkpoint_file(path)
    if not isinstance(data, dict) or "state_dict" not in data or "config" not in data:
        name = os.path.basename(str(path))
        hint = " (optimizer state, not a model)" if name.startswith("opt") else ""
        raise CheckpointError(f"'{path}' is not a model checkpoint{hint}: it has no 'config' and 'state_dict'.")
    return data


def load_checkpoint(path, timestep_respacing="", device="cpu", data=None):
    """(model, diffusion, config) from one of our checkpoints or an FDM one.

    `config` is the checkpoint's flat config dict (FDM's training arguments, plus ours).
    The model is in eval mode on `device`; the diffusion is respaced as asked. `data`: the
    file's contents when the caller already read them with `read_model_checkpoint`.
    """
    if data is None:
        data = read_model_checkpoint(path)
    config = dict(data["config"])
    state_dict = data["state_dict"]
    if not config.get("channel_mult"):
        config["channel_mult"] = infer_channel_mult(state_dict, config.get("num_channels", 128))
    model_cfg = dataclass_from_dict(ModelConfig, config)  # flags FDM's config lacks take FDM's defaults
    diffusion_cfg = dataclass_from_dict(DiffusionConfig, config)
    model = create_model(model_cfg, diffusion_cfg.learn_sigma)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"Checkpoint '{path}' does not match its own config: {first}") from None
    model.to(device).eval()
    diffusion = create_diffusion(diffusion_cfg, timestep_respacing)
    config["step"] = data.get("step", 0)
    return model, diffusion, config
