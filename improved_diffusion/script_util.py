"""Configuration, construction and checkpoint loading shared by every script.

Configs are dataclasses whose field names are FDM's command-line flags, so an FDM
checkpoint's saved `config` dict reads straight into them, and argparse flags are generated
from the fields. Checkpoints (ours and FDM's) are {"config": flat dict, "state_dict", "step"}
and load with `torch.load(weights_only=True)`: loading never runs code.
"""

import argparse
import dataclasses
import io
import os
from dataclasses import dataclass

import blobfile as bf
import torch

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import DEFAULT_CHANNEL_MULT, UNetConfig, UNetVideoModel


class UserError(Exception):
    """A problem the user can fix; scripts print str(e) (one sentence) and exit non-zero."""


class CheckpointError(UserError):
    pass


@dataclass
class ModelConfig:
    image_size: int = 32
    num_channels: int = 32
    num_res_blocks: int = 1
    num_heads: int = 4
    num_heads_upsample: int = -1
    attention_resolutions: str = "16,8"  # resolutions (not factors) with attention, FDM's spelling
    channel_mult: str = ""  # "" = FDM's default for the image size
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    use_checkpoint: bool = False
    use_rpe_net: bool = True  # FDM's only working option; kept for config compatibility
    causal: bool = False  # temporal attention never looks at frames with a larger index


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"  # linear | cosine | sigmoid
    timestep_respacing: str = ""  # "" | "250" | "10,10,10" | "ddim25"
    learn_sigma: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    predict_v: bool = False
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line on stderr and exit code 2, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{v}'")


def add_dataclass_args(parser, cls, overrides=None):
    """One --flag per field, typed by the field's default (booleans accept true/false)."""
    for field in dataclasses.fields(cls):
        default = (overrides or {}).get(field.name, field.default)
        kind = str2bool if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{field.name}", default=default, type=kind)


def dataclass_from_dict(cls, values):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# ----------------------------------------------------------------------------- construction

def parse_channel_mult(text, image_size):
    if text:
        return tuple(int(x) for x in str(text).split(","))
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise UserError(f"No default channel multipliers for image size {image_size}; pass --channel_mult.")
    return DEFAULT_CHANNEL_MULT[image_size]


def unet_config(model_cfg: ModelConfig, learn_sigma: bool) -> UNetConfig:
    size = model_cfg.image_size
    return UNetConfig(
        image_size=size,
        model_channels=model_cfg.num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=model_cfg.num_res_blocks,
        attention_resolutions=tuple(size // int(r) for r in str(model_cfg.attention_resolutions).split(",") if r),
        channel_mult=parse_channel_mult(model_cfg.channel_mult, size),
        num_heads=model_cfg.num_heads,
        num_heads_upsample=model_cfg.num_heads_upsample,
        dropout=model_cfg.dropout,
        use_scale_shift_norm=model_cfg.use_scale_shift_norm,
        use_checkpoint=model_cfg.use_checkpoint,
        causal=model_cfg.causal,
    )


def create_model(model_cfg: ModelConfig, learn_sigma=False):
    if not model_cfg.use_rpe_net:
        raise UserError("use_rpe_net=False is not supported: relative positions come from RPE networks.")
    return UNetVideoModel(unet_config(model_cfg, learn_sigma))


def create_diffusion(cfg: DiffusionConfig, timestep_respacing=None):
    respacing = cfg.timestep_respacing if timestep_respacing is None else timestep_respacing
    if cfg.predict_xstart and cfg.predict_v:
        raise UserError("Choose at most one of --predict_xstart and --predict_v.")
    if cfg.use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif cfg.rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if cfg.predict_v:
        mean_type = gd.ModelMeanType.VELOCITY
    elif cfg.predict_xstart:
        mean_type = gd.ModelMeanType.START_X
    else:
        mean_type = gd.ModelMeanType.EPSILON
    if cfg.learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if cfg.sigma_small else gd.ModelVarType.FIXED_LARGE
    try:
        kept = space_timesteps(cfg.diffusion_steps, respacing or [cfg.diffusion_steps])
        betas = gd.get_named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    return SpacedDiffusion(
        use_timesteps=kept,
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=cfg.rescale_timesteps,
    )


# ----------------------------------------------------------------------------- checkpoints

def infer_channel_mult(state_dict, model_channels):
    """Channel multipliers read off a state dict's input blocks (robust for any image size)."""
    mults, level = [], []
    i = 1
    while f"input_blocks.{i}.0.op.weight" in state_dict or f"input_blocks.{i}.0.in_layers.2.weight" in state_dict:
        key = f"input_blocks.{i}.0.in_layers.2.weight"
        if key in state_dict:
            level.append(state_dict[key].shape[0] // model_channels)
        else:
            mults.append(level[-1])
            level = []
        i += 1
    if level:
        mults.append(level[-1])
    return ",".join(str(m) for m in mults)


def read_checkpoint_file(path):
    """torch.load through blobfile (local paths, gs://, az://), weights only."""
    if not bf.exists(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        with bf.BlobFile(path, "rb") as f:
            data = f.read()
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        # torch.load's own explanations run to paragraphs; the first line names the problem.
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"Checkpoint '{path}' could not be read ({type(e).__name__}: {first}).") from None


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
    model_cfg = dataclass_from_dict(ModelConfig, {**dataclasses.asdict(ModelConfig(num_channels=128, image_size=64,
                                                                                   num_res_blocks=2)), **config})
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
