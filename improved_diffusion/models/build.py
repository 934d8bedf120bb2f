"""The network's flags (FDM's names) and the model they build.

`ModelConfig`'s field names are FDM's command-line flags, so an FDM checkpoint's saved
config reads straight into it.
"""

from dataclasses import dataclass

from ..errors import ConfigError
from .unet import DEFAULT_CHANNEL_MULT, UNetConfig, UNetVideoModel


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


def parse_channel_mult(text, image_size):
    if text:
        return tuple(int(x) for x in str(text).split(","))
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ConfigError(f"No default channel multipliers for image size {image_size}; pass --channel_mult.")
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
        raise ConfigError("use_rpe_net=False is not supported: relative positions come from RPE networks.")
    return UNetVideoModel(unet_config(model_cfg, learn_sigma))


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
