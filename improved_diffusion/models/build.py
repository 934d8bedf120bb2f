"""The network's flags (FDM's names) and the model they build.

`ModelConfig`'s field names are FDM's command-line flags, so an FDM checkpoint's saved
config reads straight into it.
"""

from dataclasses import dataclass

from ..errors import ConfigError
from .unet import DEFAULT_CHANNEL_MULT, UNetConfig, UNetVideoModel


GROUPS = 32  # GroupNorm groups (FDM's `normalization`): every channel count must be a multiple


@dataclass
class ModelConfig:
    """FDM's model flags with FDM's defaults (scripts/video_train.py + script_util.py)."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1  # -1: num_heads
    attention_resolutions: str = "16,8"  # resolutions (not factors) with attention, FDM's spelling
    channel_mult: str = ""  # "" = FDM's default for the image size
    dropout: float = 0.0
    class_cond: bool = False  # FDM's flag; video datasets have no labels, so only False works
    use_scale_shift_norm: bool = True
    use_checkpoint: bool = False
    use_rpe_net: bool = True  # FDM's only working option; kept for config compatibility
    causal: bool = False  # temporal attention never looks at frames with a larger index

    def validate(self):
        """Raise ConfigError naming the first flag the network cannot be built with.

        Cheap, so callers run it before reading data or allocating the model.
        """
        for name in ("image_size", "num_channels", "num_res_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_heads_upsample != -1 and self.num_heads_upsample < 1:
            raise ConfigError(f"--num_heads_upsample must be -1 (= num_heads) or positive, "
                              f"got {self.num_heads_upsample}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.class_cond:
            raise ConfigError("--class_cond True is not supported: the video datasets have no class labels.")
        if not self.use_rpe_net:
            raise ConfigError("--use_rpe_net False is not supported: relative positions come from RPE networks.")
        if self.num_channels % GROUPS:
            raise ConfigError(f"--num_channels must be a multiple of {GROUPS} (the group norm's groups), "
                              f"got {self.num_channels}.")
        mults = parse_channel_mult(self.channel_mult, self.image_size)
        if self.image_size % 2 ** (len(mults) - 1):
            raise ConfigError(f"--image_size {self.image_size} is not divisible by 2**{len(mults) - 1}, "
                              f"which the {len(mults)} levels of --channel_mult {','.join(map(str, mults))} need.")
        reachable = {self.image_size // 2 ** level: level for level in range(len(mults))}
        for resolution in parse_attention_resolutions(self.attention_resolutions):
            if resolution not in reachable:
                raise ConfigError(f"--attention_resolutions {self.attention_resolutions}: resolution {resolution} "
                                  f"is never reached; the UNet's resolutions are "
                                  f"{', '.join(map(str, reachable))}.")
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        widths = {m * self.num_channels for m in mults}
        for flag, heads in (("num_heads", self.num_heads), ("num_heads_upsample", heads_up)):
            bad = sorted(w for w in widths if w % heads)
            if bad:
                raise ConfigError(f"--{flag} {heads} does not divide the attention width {bad[0]} "
                                  f"(--num_channels x --channel_mult).")


def parse_channel_mult(text, image_size):
    """--channel_mult as a tuple of positive ints ("" = FDM's default for the image size)."""
    if text:
        try:
            mults = tuple(int(x) for x in str(text).split(","))
        except ValueError:
            raise ConfigError(f"--channel_mult must be comma-separated integers, got '{text}'.") from None
        if not mults or min(mults) < 1:
            raise ConfigError(f"--channel_mult must be positive integers, got '{text}'.")
        return mults
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ConfigError(f"No default channel multipliers for --image_size {image_size}; pass --channel_mult.")
    return DEFAULT_CHANNEL_MULT[image_size]


def parse_attention_resolutions(text):
    """--attention_resolutions as a list of positive ints (resolutions in pixels, FDM's spelling)."""
    try:
        resolutions = [int(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--attention_resolutions must be comma-separated integers, got '{text}'.") from None
    if any(r < 1 for r in resolutions):
        raise ConfigError(f"--attention_resolutions must be positive integers, got '{text}'.")
    return resolutions


def unet_config(model_cfg: ModelConfig, learn_sigma: bool) -> UNetConfig:
    size = model_cfg.image_size
    return UNetConfig(
        image_size=size,
        model_channels=model_cfg.num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=model_cfg.num_res_blocks,
        attention_resolutions=tuple(size // r for r in parse_attention_resolutions(model_cfg.attention_resolutions)),
        channel_mult=parse_channel_mult(model_cfg.channel_mult, size),
        num_heads=model_cfg.num_heads,
        num_heads_upsample=model_cfg.num_heads_upsample,
        dropout=model_cfg.dropout,
        use_scale_shift_norm=model_cfg.use_scale_shift_norm,
        use_checkpoint=model_cfg.use_checkpoint,
        causal=model_cfg.causal,
    )


def create_model(model_cfg: ModelConfig, learn_sigma=False):
    model_cfg.validate()
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
