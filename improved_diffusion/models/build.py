"""The network's flags and the model they build: FDM's UNet or Diffusion Forcing's 3D-UNet.

`ModelConfig`'s field names are FDM's command-line flags (for `fdm_unet`) and DF's yaml names
(`algorithm.diffusion.architecture.*`, for `df_unet3d`), so either paper's saved configuration
reads straight into it. Only the chosen architecture's fields are checked and used.

The conditioning layout (cond_dim, num_classes, cond_drop_prob) applies to both architectures and
is saved with every checkpoint like the rest; configurations written before it existed read as
unconditional (all 0), which builds exactly the network they were trained with.

`energy` (both architectures) wraps the network in models/energy.py's EnergyModel: the prediction
becomes the gradient of a per-frame scalar energy. The wrapper has no parameters of its own, so the
network is initialised exactly as without it; its weights are saved under `net.` and configurations
without the field read as energy=False.
"""

from dataclasses import dataclass, field

from ..errors import ConfigError
from .df_unet3d import DFUNet3D, DFUNet3DConfig
from .energy import EnergyModel
from .unet import DEFAULT_CHANNEL_MULT, UNetConfig, UNetVideoModel

ARCHITECTURES = ("fdm_unet", "df_unet3d")
TIME_EMB_TYPES = ("rotary", "sinusoidal")  # DF's Unet3D `time_emb_type`
DF_GROUPS = 8  # DF's ResnetBlock GroupNorm groups (Unet3D's resnet_block_groups)


GROUPS = 32  # GroupNorm groups (FDM's `normalization`): every channel count must be a multiple


@dataclass
class ModelConfig:
    """FDM's model flags with FDM's defaults (scripts/video_train.py + script_util.py), and DF's
    3D-UNet options with the defaults of DF's configurations/algorithm/df_video.yaml."""

    architecture: str = "fdm_unet"  # fdm_unet (FDM's UNet) | df_unet3d (Diffusion Forcing's 3D-UNet)
    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1  # -1: num_heads
    attention_resolutions: str = "16,8"  # resolutions (not factors) with attention, FDM's spelling
    channel_mult: str = ""  # "" = FDM's default for the image size
    dropout: float = 0.0
    class_cond: bool = False  # FDM's flag: condition on the dataset's class labels (sets num_classes)
    use_scale_shift_norm: bool = True
    use_checkpoint: bool = False
    use_rpe_net: bool = True  # FDM's only working option; kept for config compatibility
    causal: bool = False  # temporal attention never looks at frames with a larger index
    # df_unet3d only: DF's names and df_video.yaml's values.
    network_size: int = 64  # base channel count (DF's Unet3D `dim`)
    dim_mults: str = "1,2,4,8"  # channel multiplier per level, like --channel_mult
    attn_resolutions: str = "16,32,64,128"  # DF's pixel sizes; levels with attention: image_size // r
    attn_heads: int = 4
    attn_dim_head: int = 64
    use_linear_attn: bool = True  # linear spatial attention on all but the deepest level
    use_init_temporal_attn: bool = True  # temporal attention right after the first convolution
    time_emb_type: str = "rotary"  # frame positions in temporal attention: rotary | sinusoidal
    strict_causal: bool = False  # with --causal: normalize each frame alone (DF's GroupNorm mixes frames)
    # Conditioning, both architectures (models/conditioning.py).
    cond_dim: int = field(default=0, metadata={"help": (
        "condition each frame on a vector of this width, e.g. the dataset's actions (0: none; -1: the dataset's "
        "action width, resolved when training starts)")})
    num_classes: int = field(default=0, metadata={"help": "condition each video on a class label in [0, N) (0: none)"})
    cond_drop_prob: float = field(default=0.0, metadata={"help": (
        "training replaces a video's conditions by learned null ones with this probability, which classifier-free "
        "guidance (--guidance_scale when sampling) needs; > 0 also gives the model its null embeddings")})
    # Energy parameterization, both architectures (models/energy.py).
    energy: bool = field(default=False, metadata={"help": (
        "the network's output f is reduced to one energy per frame, E = 1/2 ||x - f(x, t)||^2, and the model's "
        "prediction is its gradient in x (autograd: on the demo-sized model a sampling call costs 1.9x a plain "
        "one, a training step 2.5x); lets sampling refine with energy descent (video_sample.py --mcmc_steps)")})

    def has_conditions(self):
        """Whether the network takes conditions (per-frame vectors or class labels)."""
        return bool(self.cond_dim or self.num_classes or self.class_cond)

    def validate(self):
        """Raise ConfigError naming the first flag the network cannot be built with.

        Cheap, so callers run it before reading data or allocating the model.
        """
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, got '{self.architecture}'.")
        if self.image_size < 1:
            raise ConfigError(f"--image_size must be a positive integer, got {self.image_size}.")
        if self.strict_causal and not self.causal:
            raise ConfigError("--strict_causal True needs --causal True.")
        self._validate_conditioning()
        if self.architecture == "df_unet3d":
            self._validate_df()
            return
        if self.strict_causal:
            raise ConfigError("--strict_causal applies only to --architecture df_unet3d: "
                              "FDM's causal UNet already normalizes each frame on its own.")
        for name in ("image_size", "num_channels", "num_res_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_heads_upsample != -1 and self.num_heads_upsample < 1:
            raise ConfigError(f"--num_heads_upsample must be -1 (= num_heads) or positive, "
                              f"got {self.num_heads_upsample}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}.")
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

    def _validate_conditioning(self):
        if self.cond_dim < -1:
            raise ConfigError(f"--cond_dim must be 0 (none), -1 (the dataset's action width) or positive, "
                              f"got {self.cond_dim}.")
        if self.num_classes < 0:
            raise ConfigError(f"--num_classes must be 0 (no labels) or positive, got {self.num_classes}.")
        if self.class_cond and self.num_classes < 1:
            raise ConfigError("--class_cond True takes the number of classes from the dataset's labels; "
                              "none was set, so pass --num_classes N.")
        if not 0 <= self.cond_drop_prob < 1:
            raise ConfigError(f"--cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}.")
        if self.cond_drop_prob > 0 and not self.has_conditions():
            raise ConfigError(f"--cond_drop_prob {self.cond_drop_prob} drops conditions, but the model has none: "
                              f"pass --cond_dim or --num_classes too.")

    def conditioning(self):
        """(cond_dim, num_classes, null_cond) of the network; cond_dim -1 must have been resolved."""
        if self.cond_dim == -1:
            raise ConfigError("--cond_dim -1 (the dataset's action width) must be resolved against the dataset "
                              "before the model is built.")
        return self.cond_dim, self.num_classes, self.cond_drop_prob > 0

    def _validate_df(self):
        for name in ("network_size", "attn_heads", "attn_dim_head"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.network_size % DF_GROUPS:
            raise ConfigError(f"--network_size must be a multiple of {DF_GROUPS} (the group norm's groups), "
                              f"got {self.network_size}.")
        if self.time_emb_type not in TIME_EMB_TYPES:
            raise ConfigError(f"--time_emb_type must be one of {', '.join(TIME_EMB_TYPES)}, "
                              f"got '{self.time_emb_type}'.")
        mults = parse_int_list(self.dim_mults, "dim_mults")
        if not mults:
            raise ConfigError(f"--dim_mults must name at least one level, got '{self.dim_mults}'.")
        if self.image_size % 2 ** (len(mults) - 1):
            raise ConfigError(f"--image_size {self.image_size} is not divisible by 2**{len(mults) - 1}, "
                              f"which the {len(mults)} levels of --dim_mults {self.dim_mults} need.")
        parse_int_list(self.attn_resolutions, "attn_resolutions")


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


def parse_int_list(text, flag):
    """A comma-separated flag (or a list, as DF's yaml holds it) as a tuple of positive ints."""
    items = text if isinstance(text, (list, tuple)) else [x for x in str(text).split(",") if x.strip()]
    try:
        values = tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise ConfigError(f"--{flag} must be comma-separated integers, got '{text}'.") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"--{flag} must be positive integers, got '{text}'.")
    return values


def df_unet3d_config(model_cfg: ModelConfig, learn_sigma: bool) -> DFUNet3DConfig:
    """DF's Unet3D arguments; attention levels as DF's Diffusion._build_model converts them:
    downsample factor = resolution // r for each of `attn_resolutions` (models/diffusion.py)."""
    size = model_cfg.image_size
    return DFUNet3DConfig(
        image_size=size,
        channels=3,
        out_channels=6 if learn_sigma else 3,
        network_size=model_cfg.network_size,
        dim_mults=parse_int_list(model_cfg.dim_mults, "dim_mults"),
        attn_factors=tuple(size // r for r in parse_int_list(model_cfg.attn_resolutions, "attn_resolutions")),
        attn_heads=model_cfg.attn_heads,
        attn_dim_head=model_cfg.attn_dim_head,
        use_linear_attn=model_cfg.use_linear_attn,
        use_init_temporal_attn=model_cfg.use_init_temporal_attn,
        time_emb_type=model_cfg.time_emb_type,
        causal=model_cfg.causal,
        strict_causal=model_cfg.strict_causal,
        **conditioning_fields(model_cfg),
    )


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
        **conditioning_fields(model_cfg),
    )


def conditioning_fields(model_cfg: ModelConfig):
    """The network config's conditioning fields (both architectures name them alike)."""
    cond_dim, num_classes, null_cond = model_cfg.conditioning()
    return dict(cond_dim=cond_dim, num_classes=num_classes, null_cond=null_cond)


def create_model(model_cfg: ModelConfig, learn_sigma=False):
    """The network `model_cfg.architecture` names, validated first; inside an EnergyModel with `energy`."""
    model_cfg.validate()
    if model_cfg.architecture == "df_unet3d":
        net = DFUNet3D(df_unet3d_config(model_cfg, learn_sigma))
    else:
        net = UNetVideoModel(unet_config(model_cfg, learn_sigma))
    return EnergyModel(net) if model_cfg.energy else net


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
