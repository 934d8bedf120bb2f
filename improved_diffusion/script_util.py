"""FDM's import path for configuration and checkpoint loading, kept so FDM users' scripts run.

The code lives in `checkpoints.py`, `models/`, `diffusion/`, `cli.py` and `errors.py`;
new code should import from there.
"""

from .checkpoints import load_checkpoint, read_checkpoint_file, read_model_checkpoint
from .cli import ArgumentParser, add_dataclass_args, dataclass_from_dict, str2bool
from .diffusion import DiffusionConfig, create_diffusion
from .errors import CheckpointError, UserError
from .models import ModelConfig, create_model, infer_channel_mult, parse_channel_mult, unet_config

__all__ = [
    "ArgumentParser", "CheckpointError", "DiffusionConfig", "ModelConfig", "UserError", "add_dataclass_args",
    "create_diffusion", "create_model", "dataclass_from_dict", "infer_channel_mult", "load_checkpoint",
    "parse_channel_mult", "read_checkpoint_file", "read_model_checkpoint", "str2bool", "unet_config",
]
