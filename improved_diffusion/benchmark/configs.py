"""The benchmark's named setups (model, training batch, sampling) and its variants (ways of running one model).

A configuration fixes everything the variants share; a variant changes one thing against the
float32 eager baseline and names the measures that change can affect.
"""

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class BenchConfig:
    """A model, its training batch and its sampling setup. `quick`: the fields --quick overrides."""

    model: dict  # ModelConfig fields
    batch_size: int  # training videos per step
    max_frames: int  # frames per training example, and the sampling window
    T: int  # length of a sampled video
    n_obs: int  # given frames at its start
    max_latent_frames: int  # new frames per autoreg stage (stabilized-autoreg: 1)
    sample_batch: int  # videos sampled at once
    sampling_steps: int  # DDIM steps of the respaced diffusion
    quick: dict = field(default_factory=dict)


CONFIGS = {
    # For tests: the smallest UNet there is.
    "tiny": BenchConfig(
        model=dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                   num_heads=2),
        batch_size=2, max_frames=4, T=6, n_obs=2, max_latent_frames=2, sample_batch=2, sampling_steps=2),
    # scripts/demo.sh's model, batch and sampling (4 given frames, 2 new per stage).
    "small": BenchConfig(
        model=dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="8"),
        batch_size=8, max_frames=8, T=32, n_obs=4, max_latent_frames=2, sample_batch=2, sampling_steps=10,
        quick=dict(T=12, sampling_steps=4)),
    # FDM's 32x32 model: 32 channels, 1 res block, FDM's default attention resolutions (16, 8) and
    # channel multipliers for 32x32 (1,2,2,2); FDM's max_frames 20.
    "fdm32": BenchConfig(
        model=dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8"),
        batch_size=4, max_frames=20, T=50, n_obs=10, max_latent_frames=10, sample_batch=2, sampling_steps=10,
        quick=dict(T=14, sampling_steps=3)),
    # FDM's CARLA Town01 command: 128x128, 128 channels (FDM's default), 1 res block, batch 2, max_frames 20.
    "carla": BenchConfig(
        model=dict(image_size=128, num_channels=128, num_res_blocks=1, attention_resolutions="16,8"),
        batch_size=2, max_frames=20, T=50, n_obs=10, max_latent_frames=10, sample_batch=1, sampling_steps=10,
        quick=dict(T=12, sampling_steps=2)),
}

MEASURES = ("forward", "train", "autoreg", "stabilized")


@dataclass(frozen=True)
class Variant:
    """One way of running the model; everything not named here is the baseline's (fp32, eager)."""

    what: str
    precision: str = "fp32"
    compile: bool = False
    checkpoint: bool = False  # ModelConfig.use_checkpoint
    per_video: bool = False  # sampling through one_video_at_a_time
    kv_cache: bool = False  # sampling through sampling.kv_cache.CausalCache
    measures: tuple = MEASURES


VARIANTS = {
    "fp32": Variant("float32, eager: the baseline"),
    "bf16": Variant("bf16 autocast", precision="bf16"),
    "fp16": Variant("fp16 autocast, GradScaler in training", precision="fp16"),
    "compile": Variant("float32, torch.compile (dynamic shapes; training: static)", compile=True),
    "compile-bf16": Variant("bf16 autocast, torch.compile (dynamic shapes; training: static)", precision="bf16", compile=True),
    "checkpoint": Variant("activation checkpointing (use_checkpoint=True)", checkpoint=True, measures=("train",)),
    "per-video": Variant("sampling one video per network call", per_video=True, measures=("autoreg", "stabilized")),
    "kv-cache": Variant("causal key/value cache (stabilized-autoreg only)", kv_cache=True, measures=("stabilized",)),
}

# Dense peak FLOP/s per dtype ("bf16" also stands for fp16, equal on these GPUs; "fp32" without


def bench_config(name, quick, sampling_steps=None):
    if name not in CONFIGS:
        raise ConfigError(f"unknown config {name!r}; valid names are {', '.join(CONFIGS)}.")
    bench = CONFIGS[name]
    if quick:
        bench = dataclasses.replace(bench, **bench.quick)
    if sampling_steps is not None:
        if sampling_steps < 1:
            raise ConfigError(f"--sampling_steps must be a positive integer, got {sampling_steps}.")
        bench = dataclasses.replace(bench, sampling_steps=sampling_steps)
    return bench
