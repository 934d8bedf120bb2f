"""Reading model checkpoints: ours and FDM's ({"config": flat dict, "state_dict", "step"}), and
Diffusion Forcing's Lightning checkpoints together with DF's configuration.

Files load through blobfile (local paths, gs://, az://) and loading never runs code: ours with
`torch.load(weights_only=True)`, DF's with a restricted unpickler (DF's hyper-parameters are
OmegaConf objects, which weights_only refuses). Writing checkpoints during training is
`training/checkpoint_io.py`.
"""

import collections
import io
import json
import os
import pickle
import re
import types

import blobfile as bf
import torch

from .cli import dataclass_from_dict
from .diffusion import DiffusionConfig, create_diffusion
from .errors import CheckpointError, ConfigError
from .models import ModelConfig, create_model, infer_channel_mult


def read_checkpoint_file(path):
    """torch.load through blobfile (local paths, gs://, az://), weights only."""
    data = read_checkpoint_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        if "Unsupported global" in str(e):  # a pickle that names functions or classes to call
            raise CheckpointError(f"Checkpoint '{path}' holds Python objects that loading would have to run, "
                                  "so it is refused: a checkpoint may hold only tensors and plain data.") from None
        raise CheckpointError(f"Checkpoint '{path}' is corrupt or not a checkpoint ({first_sentence(e)}).") from None


def read_checkpoint_bytes(path):
    """A checkpoint file's bytes, or one sentence saying why there are none."""
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
    return data


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
        if isinstance(data, dict) and "pytorch-lightning_version" in data:
            raise CheckpointError(f"'{path}' is a Lightning checkpoint without our config, e.g. Diffusion Forcing's; "
                                  "pass its run's configuration with --df_config (df_config= in Python).")
        hint = " (optimizer state, not a model)" if name.startswith("opt") else ""
        raise CheckpointError(f"'{path}' is not a model checkpoint{hint}: it has no 'config' and 'state_dict'.")
    return data


def load_checkpoint(path, timestep_respacing="", device="cpu", data=None, df_config=None):
    """(model, diffusion, config) from one of our checkpoints, an FDM one, or a DF one.

    `config` is the flat config dict (FDM's training arguments, plus ours). The model is in eval
    mode on `device`; the diffusion is respaced as asked. `data`: the file's contents when the
    caller already read them (`read_model_checkpoint`, or `read_df_checkpoint` for DF).
    `df_config`: for a Diffusion Forcing Lightning checkpoint, DF's configuration (a dict, or a
    JSON/YAML file) holding `causal` and the `diffusion` block, at the top or under `algorithm`;
    it is translated to our flags by `df_to_config`.
    """
    if df_config is not None:
        config = df_to_config(read_df_config(df_config))
        if data is None:
            data = read_df_checkpoint(path)
        state_dict = df_state_dict(data, path)
        config["step"] = data.get("global_step", 0)
    else:
        if data is None:
            data = read_model_checkpoint(path)
        config = dict(data["config"])
        state_dict = data["state_dict"]
        config["step"] = data.get("step", 0)
    if config.get("architecture", "fdm_unet") == "fdm_unet" and not config.get("channel_mult"):
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
    return model, diffusion, config


# ----------------------------------------------------------------------------- Diffusion Forcing

DF_PREFIX = "diffusion_model.model.module."  # DF's Diffusion -> EinopsWrapper -> Unet3D

# DF's configurations/algorithm/df_base.yaml overridden by df_video.yaml: what a DF video run
# uses for any entry its configuration leaves out.
DF_VIDEO_DIFFUSION = dict(
    timesteps=1000, sampling_timesteps=100, beta_schedule="sigmoid", schedule_fn_kwargs={}, objective="pred_v",
    use_fused_snr=True, snr_clip=5.0, cum_snr_decay=0.96, clip_noise=6.0, ddim_sampling_eta=0.0,
    stabilization_level=15,
)
DF_VIDEO_ARCHITECTURE = dict(
    network_size=64, attn_heads=4, attn_dim_head=64, dim_mults=[1, 2, 4, 8], attn_resolutions=[16, 32, 64, 128],
    use_init_temporal_attn=True, use_linear_attn=True, time_emb_type="rotary",
)
DF_OBJECTIVES = {"pred_noise": (False, False), "pred_x0": (False, True), "pred_v": (True, False)}  # (v, xstart)


def read_df_config(source):
    """DF's configuration as {"causal": bool, "diffusion": dict}, from a dict or a JSON/YAML file.

    Accepts DF's nesting (`algorithm.causal`, `algorithm.diffusion`, as in a hydra run's saved
    config) or the flat one (`causal`, `diffusion`). Whole-value interpolations such as
    `${dataset.resolution}` are resolved against the file's top level.
    """
    root = source if isinstance(source, dict) else _read_config_file(source)
    if not isinstance(root, dict):
        raise ConfigError(f"DF config '{source}' is not a mapping with a 'diffusion' block.")
    node = root.get("algorithm", root) if isinstance(root.get("algorithm"), dict) else root
    diffusion = node.get("diffusion")
    if not isinstance(diffusion, dict):
        raise ConfigError(f"DF config '{source}' has no 'diffusion' block (at the top or under 'algorithm').")
    causal = node.get("causal", root.get("causal", True))  # df_base.yaml: causal True
    return {"causal": _resolve(causal, root), "diffusion": _resolve(diffusion, root)}


def _read_config_file(path):
    path = str(path)
    if not bf.exists(path) or bf.isdir(path):
        raise ConfigError(f"DF config '{path}' does not exist.")
    with bf.BlobFile(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"DF config '{path}' is not valid JSON ({e.msg} at line {e.lineno}).") from None
    import yaml  # only needed for YAML configurations

    try:
        return yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as e:
        raise ConfigError(f"DF config '{path}' is not valid YAML or JSON ({first_sentence(e)}).") from None


def _resolve(value, root):
    """Replace whole-string `${a.b.c}` references by root's entry there (unresolvable ones stay)."""
    if isinstance(value, dict):
        return {k: _resolve(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    match = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
    if match:
        node = root
        for key in match.group(1).split("."):
            if not isinstance(node, dict) or key not in node:
                return value
            node = node[key]
        return _resolve(node, root)
    return value


def df_to_config(df):
    """Our flat config dict for DF's run (`read_df_config`'s output), DF's names mapped to ours.

    Network: architecture=df_unet3d with DF's architecture entries (lists as "1,2,4" strings),
    image_size = DF's `resolution`. Diffusion: timesteps -> diffusion_steps, beta_schedule ->
    noise_schedule, objective -> predict_v / predict_xstart; the network sees DF's raw step
    indices (rescale_timesteps False). Loss: DF's `compute_loss_weights` (models/diffusion.py)
    uses fused SNR when `use_fused_snr` and min-SNR weights otherwise (it never reads `use_snr`),
    so loss_weighting is "fused_snr" or "min_snr". Sampler defaults keep DF's names.
    """
    diffusion = {**DF_VIDEO_DIFFUSION, **df["diffusion"]}
    arch = {**DF_VIDEO_ARCHITECTURE, **(diffusion.get("architecture") or {})}
    resolution = arch.get("resolution")
    if not isinstance(resolution, int) or isinstance(resolution, bool):
        raise ConfigError(f"DF config's diffusion.architecture.resolution must be the image size in pixels, "
                          f"got '{resolution}'.")
    if diffusion["objective"] not in DF_OBJECTIVES:
        raise ConfigError(f"DF config's objective must be one of {', '.join(DF_OBJECTIVES)}, "
                          f"got '{diffusion['objective']}'.")
    if diffusion["schedule_fn_kwargs"]:
        raise ConfigError(f"DF config's schedule_fn_kwargs {dict(diffusion['schedule_fn_kwargs'])} are not "
                          f"supported: the noise schedules use DF's default constants.")
    predict_v, predict_xstart = DF_OBJECTIVES[diffusion["objective"]]

    def joined(values):
        return ",".join(str(int(v)) for v in values) if isinstance(values, (list, tuple)) else str(values)

    return dict(
        architecture="df_unet3d",
        image_size=resolution,
        causal=bool(df["causal"]),
        strict_causal=False,
        network_size=arch["network_size"],
        dim_mults=joined(arch["dim_mults"]),
        attn_resolutions=joined(arch["attn_resolutions"]),
        attn_heads=arch["attn_heads"],
        attn_dim_head=arch["attn_dim_head"],
        use_linear_attn=bool(arch["use_linear_attn"]),
        use_init_temporal_attn=bool(arch["use_init_temporal_attn"]),
        time_emb_type=arch["time_emb_type"],
        diffusion_steps=int(diffusion["timesteps"]),
        noise_schedule=diffusion["beta_schedule"],
        predict_v=predict_v,
        predict_xstart=predict_xstart,
        learn_sigma=False,
        rescale_timesteps=False,
        loss_weighting="fused_snr" if diffusion["use_fused_snr"] else "min_snr",
        snr_clip=float(diffusion["snr_clip"]),
        cum_snr_decay=float(diffusion["cum_snr_decay"]),
        clip_noise=float(diffusion["clip_noise"]),
        sampling_timesteps=int(diffusion["sampling_timesteps"]),
        ddim_sampling_eta=float(diffusion["ddim_sampling_eta"]),
        stabilization_level=int(diffusion["stabilization_level"]),
    )


def df_state_dict(data, path):
    """The Unet3D weights of a DF Lightning checkpoint dict, with DF's wrapper prefix dropped."""
    state_dict = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"'{path}' is not a Diffusion Forcing checkpoint: it has no 'state_dict'.")
    weights = {k[len(DF_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DF_PREFIX)}
    if not weights:
        raise CheckpointError(f"'{path}' holds no Diffusion Forcing video network (no '{DF_PREFIX}*' weights).")
    bad = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read without running code: weight '{bad}' "
                              f"is not stored as a plain tensor.")
    channels = weights.get("init_conv.weight", torch.empty(0, 3)).shape[1]
    if channels != 3:
        raise CheckpointError(f"'{path}' is a network for {channels}-channel frames; only RGB (3) is supported.")
    return weights


# Globals a Lightning checkpoint's tensors and containers need (what torch's weights-only
# loader allows for them); storages are resolved by torch.load itself.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): __import__("_codecs").encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    **{("torch", name): getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
}


class Skipped:
    """An inert stand-in for an object of any class outside SAFE_GLOBALS (e.g. OmegaConf's
    DictConfig in a Lightning checkpoint's hyper-parameters): it accepts whatever the pickle
    hands it and keeps nothing, so nothing of that class is imported or run."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def restricted_pickle_module():
    """A pickle module for torch.load whose Unpickler builds only SAFE_GLOBALS; every other
    global becomes a `Skipped` subclass named after it."""
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in SAFE_GLOBALS:
                return SAFE_GLOBALS[(module, name)]
            return type(f"{module}.{name}", (Skipped,), {})

    return types.SimpleNamespace(__name__="restricted_pickle", Unpickler=Unpickler,
                                 load=lambda f, **kw: Unpickler(f, **kw).load())


def read_df_checkpoint(path):
    """A Diffusion Forcing Lightning checkpoint's dict, read without running any code from it.

    DF's files hold OmegaConf objects among their hyper-parameters, which
    `torch.load(weights_only=True)` refuses; this reads them with `restricted_pickle_module`,
    which builds tensors and containers only and leaves every other object an inert `Skipped`.
    """
    data = read_checkpoint_bytes(path)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                            pickle_module=restricted_pickle_module())
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"Checkpoint '{path}' cannot be read without running code, or is corrupt "
                              f"({first_sentence(e)}).") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"'{path}' is not a Diffusion Forcing checkpoint: it holds no dict of weights.")
    return loaded
