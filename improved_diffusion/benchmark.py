"""Speed and memory of one model configuration under each precision, compilation and memory option.

`run_benchmark(config, device, ...)` builds the named configuration's model once, gives every
variant its own copy of the same weights, and measures all variants in ONE process with
interleaved repetitions (variant A rep 1, variant B rep 1, ..., A rep 2, ...), so slow drifts of
the machine (clock boost, other processes, thermal throttling) hit every variant alike. Repetition
0 is a warm-up and is not counted (compilation, cuDNN autotuning, allocator growth); medians of the
others are reported, with ratios against float32 eager, the baseline. What is measured:

- forward: one no-grad network call on a training batch (its noisy frames and masks);
- train step: forward + backward + AdamW step with the training loss (epsilon MSE on the frames
  that are not observed, a batch built by training/train_loop.py's `training_batch` in FDM's
  noise mode, padded to max_frames); fp16 scales the loss with `torch.amp.GradScaler`;
- peak train memory: the most memory a training step holds above what was held before it
  (activations, gradients, workspace; not the weights or the AdamW state, which every variant
  holds alike), in one extra, untimed step. CUDA: `torch.cuda.max_memory_allocated` after
  `reset_peak_memory_stats`, minus `memory_allocated` before. CPU (Linux): the kernel's
  high-water mark of the resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs; exact,
  no sampling) minus the resident set before, after returning freed heap pages to the system
  (`malloc_trim`, glibc) so that the step's allocations show up as growth. Where the mark cannot
  be reset, a background thread polls the resident set every ~1 ms instead (the table says which);
- MFU (CUDA only): model FLOPs of one training step (`torch.utils.flop_counter.FlopCounterMode`
  on the float32 eager model, so activation checkpointing's recomputation is not counted) / step
  time / the device's dense peak FLOP/s for the variant's dtype (PEAK_FLOPS; unknown devices:
  "unknown"). fp32 uses the non-tensor-core peak, although cuDNN convolutions run in TF32 by
  default, so fp32 MFU is flattering;
- sampling: generated frames per second of an `autoreg` rollout and of a causal
  `stabilized-autoreg` rollout (Diffusion Forcing's stabilization; DDIM, so context frames carry
  no fresh noise and a causal key/value cache is exact), both with a respaced diffusion of a few
  DDIM steps. The stabilized rollout uses a causal copy of the model.

A compiled variant's compile time is its first call minus its median, per measure. Variants
change one thing against the baseline; cells that the change cannot affect are "n/a"
(activation checkpointing only acts with gradients; per-video calls and the cache only in sampling).
"""

import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import device_flag
from .diffusion import DiffusionConfig, create_diffusion
from .errors import ConfigError
from .models.build import ModelConfig, create_model, parse_channel_mult
from .precision import AUTOCAST_DTYPES, PrecisionModel, autocast, compile_model
from .sampling.sampler import one_video_at_a_time, sample_video, video_generator
from .sampling.scheme import Scheme
from .training.train_loop import training_batch


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
# tensor cores), matched against torch.cuda.get_device_name in order; NVL parts differ, so unknown.
PEAK_FLOPS = (
    (("H100", "PCIe"), {"bf16": 756e12, "fp32": 51e12}),
    (("H100",), {"bf16": 989e12, "fp32": 67e12}),  # SXM
    (("H200",), {"bf16": 989e12, "fp32": 67e12}),  # SXM
    (("A100",), {"bf16": 312e12, "fp32": 19.5e12}),
)

COLUMNS = (  # (key, markdown heading, format)
    ("forward_ms", "forward ms", "{:.2f}"),
    ("train_ms", "train step ms", "{:.1f}"),
    ("train_mem_mb", "peak train mem MB", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("autoreg_fps", "frames/s autoreg", "{:.2f}"),
    ("stabilized_fps", "frames/s stabilized-autoreg", "{:.2f}"),
    ("compile_s", "compile s", "{:.1f}"),
)
# Ratios against fp32 eager: speed-ups (> 1: faster) for times and rates, plain ratio for memory.
RATIOS = (("forward_ms", "fwd x", True), ("train_ms", "train x", True), ("train_mem_mb", "mem x", False),
          ("autoreg_fps", "autoreg x", False), ("stabilized_fps", "stab x", False))


# ----------------------------------------------------------------------------- what the machine offers

def autocast_works(precision, device):
    """Whether autocast runs a convolution in `precision` on `device` (it silently falls back where unsupported)."""
    if precision == "fp32":
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with autocast(precision, device):
                out = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, device=device),
                                                 torch.ones(1, 1, 1, 1, device=device))
    except (RuntimeError, UserWarning):
        return False
    return out.dtype == AUTOCAST_DTYPES[precision]


def compiler_available(device):
    """Whether torch.compile can generate code here: inductor needs a C++ compiler on CPU, triton a C one on CUDA."""
    names = ("cc", "gcc", "clang") if device.type == "cuda" else ("c++", "g++", "clang++")
    return any(shutil.which(n) for n in names)


def kv_cache_class():
    """sampling.kv_cache.CausalCache, or None while that module does not exist."""
    try:
        from .sampling.kv_cache import CausalCache
    except ImportError:
        return None
    return CausalCache


def variant_problem(name, device):
    """Why variant `name` cannot run on `device` (a sentence), or None."""
    v = VARIANTS[name]
    if not autocast_works(v.precision, device):
        return f"autocast does not run {v.precision} on {device.type} with this torch"
    if v.compile and not compiler_available(device):
        return "torch.compile needs a C/C++ compiler, and none is on PATH"
    return None


def choose_variants(text, device, quick):
    """The variant names to run, fp32 first: the comma list `text`, or every one that applies.

    On CPU the default list leaves out compile-bf16, and with `quick` also compile (inductor takes
    minutes to compile on a small CPU) and fp16 (CPUs without native fp16 kernels run fp16 autocast
    some 20x slower than fp32: minutes for the demo's model). Naming them in `text` runs them anyway.
    """
    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for n in names:
            if n not in VARIANTS:
                raise ConfigError(f"unknown variant {n!r}; valid names are {', '.join(VARIANTS)}.")
            problem = variant_problem(n, device)
            if problem:
                raise ConfigError(f"variant {n} cannot run here: {problem}.")
    else:
        names = []
        for n, v in VARIANTS.items():
            if device.type == "cpu" and ((v.compile and v.precision != "fp32") or
                                         (quick and (v.compile or v.precision == "fp16"))):
                continue
            if variant_problem(n, device) is None:
                names.append(n)
    return ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device, precision):
    """The device's dense peak FLOP/s for `precision`, or None when unknown (any CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "NVL" in name:
        return None
    for words, peaks in PEAK_FLOPS:
        if all(w in name for w in words):
            return peaks["fp32" if precision == "fp32" else "bf16"]
    return None


# ----------------------------------------------------------------------------- memory

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_kib(field_name):
    """A `VmRSS:`-style field of /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (VmHWM; Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def return_freed_memory():
    """Hand freed heap pages back to the system (glibc's malloc_trim), so that new allocations grow the RSS."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def peak_memory_growth(fn, device):
    """(bytes, method): the most memory held while fn() runs above what was held before it.

    bytes is None where this machine cannot tell. CPU: the kernel's exact high-water mark of the
    resident set where it can be reset, else the resident set polled every ~1 ms by a thread (which
    can miss a shorter peak, and slows the step; this call is not timed).
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    if device.type != "cpu" or status_kib("VmRSS") is None:
        fn()
        return None, "none available"
    return_freed_memory()
    before = status_kib("VmRSS")
    if reset_peak_rss():
        fn()
        return status_kib("VmHWM") - before, "resident set high-water mark (VmHWM, reset through clear_refs)"
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.wait(0.001):
            peak[0] = max(peak[0], status_kib("VmRSS"))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], status_kib("VmRSS")) - before, "resident set polled every ~1 ms"


# ----------------------------------------------------------------------------- the work

def randomize_zero_parameters(model, seed):
    """Small random values for the parameters that start at zero (the output layers).

    The cost does not depend on the values, but a network whose output is exactly zero makes
    sampling degenerate (every frame the same), which a benchmark should not rely on.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def make_training_batch(bench, diffusion, device, seed):
    """A training batch as train_loop builds one (FDM's masks, padded to max_frames), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    size = bench.model["image_size"]
    videos = torch.rand(2 * bench.batch_size, 2 * bench.max_frames, 3, size, size, generator=gen) * 2 - 1
    B = bench.batch_size
    batch = training_batch(videos[:B], videos[B:], first_index=0, seed=seed, step=0, max_frames=bench.max_frames,
                           noise_mode="fdm", num_timesteps=diffusion.num_timesteps)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["loss_mask"] = 1 - batch["obs_mask"]  # latent and padding frames, as train_loop with padding
    batch["x_t"] = diffusion.q_sample(batch["x"], batch["t"], batch["noise"], latent_mask=batch["loss_mask"])
    batch["kwargs"] = {"x0": batch["x"], "frame_indices": batch["frame_indices"], "obs_mask": batch["obs_mask"],
                       "latent_mask": batch["latent_mask"]}
    return batch


class Runner:
    """One variant's models, optimizer and calls, each call being one measured unit of work."""

    def __init__(self, name, bench, state, device, work):
        self.name = name
        self.variant = v = VARIANTS[name]
        self.device = device
        self.work = work
        self.note = None  # what the table's notes say about this variant besides its description
        self.unavailable = None  # "not available": the variant cannot run here, its cells say so
        self.last_cache = None
        self.failed = {}  # measure -> the error that stopped it
        cfg = ModelConfig(**bench.model, use_checkpoint=v.checkpoint)
        self.model = self.build(cfg, state)
        self.net = PrecisionModel(compile_model(self.model) if v.compile else self.model, v.precision, device)
        # Training compiles with static shapes, as the train loop does (precision.compile_model).
        self.train_net = PrecisionModel(compile_model(self.model, dynamic=False) if v.compile else self.model,
                                        v.precision, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type) if v.precision == "fp16" else None
        self.causal_model = self.causal_net = self.cache_class = None
        if "stabilized" in v.measures:
            self.causal_model = causal = self.build(dataclasses.replace(cfg, causal=True), state)
            self.causal_net = PrecisionModel(compile_model(causal) if v.compile else causal, v.precision, device)
        if v.kv_cache:
            self.cache_class = kv_cache_class()
            if self.cache_class is None:
                self.unavailable = "not available"
                self.note = "improved_diffusion.sampling.kv_cache is missing"
        self.measures = () if self.unavailable else v.measures

    def build(self, cfg, state):
        model = create_model(cfg).to(self.device)
        model.load_state_dict(state)
        return model

    def forward(self):
        b = self.work["batch"]
        with torch.no_grad():
            self.work["train_diffusion"].call_model(self.net, b["x_t"], b["t"], b["kwargs"])

    def train(self):
        b = self.work["batch"]
        self.opt.zero_grad(set_to_none=True)
        terms = self.work["train_diffusion"].training_losses(self.train_net, b["x"], b["t"], b["kwargs"], noise=b["noise"],
                                                             latent_mask=b["loss_mask"])
        loss = terms["loss"].mean()
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def sampler_model(self, causal):
        if self.cache_class is not None:
            self.last_cache = self.cache_class(self.causal_model)  # a fresh cache per rollout
            return self.last_cache
        model = self.causal_net if causal else self.net
        return one_video_at_a_time(model) if self.variant.per_video else model

    def rollout(self, scheme_name):
        scheme = self.work["schemes"][scheme_name]
        videos = self.work["videos"]
        generators = [video_generator(0, 0, b) for b in range(len(videos))]
        sample_video(self.sampler_model(scheme_name == "stabilized"), self.work["sample_diffusion"], videos,
                     scheme.n_obs, scheme.make_plan(), scheme.stage, generators)

    def run(self, measure):
        """Run one unit of `measure`; returns its wall time in seconds (the device synchronized)."""
        call = {"forward": self.forward, "train": self.train, "autoreg": lambda: self.rollout("autoreg"),
                "stabilized": lambda: self.rollout("stabilized")}[measure]
        synchronize(self.device)
        start = time.perf_counter()
        call()
        synchronize(self.device)
        return time.perf_counter() - start

    def fail(self, measure, error):
        """Stop measuring `measure` after `error`: its cells say "failed", the notes say why."""
        lines = str(error).strip().splitlines()
        self.failed[measure] = f"{type(error).__name__}: {lines[0] if lines else ''}"
        self.measures = tuple(m for m in self.measures if m != measure)

    def train_memory(self):
        """(bytes, method): peak memory growth of one untimed training step; gradients are freed first."""
        self.opt.zero_grad(set_to_none=True)
        return peak_memory_growth(self.train, self.device)


def count_train_flops(bench, state, work, device):
    """FLOPs of one float32 training step's forward and backward (model FLOPs, no recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(ModelConfig(**bench.model)).to(device)
    model.load_state_dict(state)
    b = work["batch"]
    with FlopCounterMode(display=False) as counter:
        terms = work["train_diffusion"].training_losses(model, b["x"], b["t"], b["kwargs"], noise=b["noise"],
                                                        latent_mask=b["loss_mask"])
        terms["loss"].mean().backward()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- the benchmark

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


def run_benchmark(config, device=None, reps=None, variants=None, quick=False, sampling_steps=None, threads=0,
                  seed=0, log=None):
    """Measure every variant of configuration `config`; returns a JSON-able dict (see `markdown`).

    device: a name (None: cuda if there is one, else cpu); reps: counted repetitions (None: 5, or 2
    with quick); variants: comma-separated names (None or "": every one that applies); log: called
    with progress lines (None: stderr).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bench = bench_config(config, quick, sampling_steps)
    device = device_flag(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = (2 if quick else 5) if reps is None else reps
    if reps < 1:
        raise ConfigError(f"--reps must be a positive integer, got {reps}.")
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (torch's default) or positive, got {threads}.")
    names = choose_variants(variants, device, quick)
    schemes = {
        "autoreg": Scheme.from_preset("autoreg", T=bench.T, n_obs=bench.n_obs, max_frames=bench.max_frames,
                                      max_latent_frames=bench.max_latent_frames, use_ddim=True,
                                      sampling_steps=bench.sampling_steps),
        "stabilized": Scheme.from_preset("stabilized-autoreg", T=bench.T, n_obs=bench.n_obs,
                                         max_frames=bench.max_frames, use_ddim=True,
                                         sampling_steps=bench.sampling_steps),
    }
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return measure(config, bench, schemes, names, device, reps, quick, seed, log)
    finally:
        torch.set_num_threads(previous_threads)


def measure(config, bench, schemes, names, device, reps, quick, seed, log):
    """run_benchmark's work once its arguments are checked."""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other processes' share of the CPU
    torch.manual_seed(seed)
    base = create_model(ModelConfig(**bench.model))
    randomize_zero_parameters(base, seed)
    state = base.state_dict()
    n_params = sum(p.numel() for p in base.parameters())
    del base
    train_diffusion = create_diffusion(DiffusionConfig())
    size = bench.model["image_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    work = {
        "batch": make_training_batch(bench, train_diffusion, device, seed),
        "train_diffusion": train_diffusion,
        "sample_diffusion": create_diffusion(DiffusionConfig(), timestep_respacing=str(bench.sampling_steps)),
        "schemes": schemes,
        "videos": (torch.rand(bench.sample_batch, bench.T, 3, size, size, generator=gen) * 2 - 1).to(device),
    }
    flops = count_train_flops(bench, state, work, device)
    log(f"benchmark {config} on {device}: {len(names)} variants, 1 warm-up + {reps} repetitions")
    runners = [Runner(n, bench, state, device, work) for n in names]

    first, times = repeat_interleaved(runners, reps, log)
    memory = {r.name: r.train_memory() for r in runners if "train" in r.measures}
    methods = {method for _, method in memory.values()}
    memory = {name: nbytes for name, (nbytes, _) in memory.items()}
    frames = bench.sample_batch * (bench.T - bench.n_obs)
    rows = [result_row(r, first[r.name], times[r.name], memory.get(r.name), flops, frames, device) for r in runners]
    for row in rows:
        row["ratios"] = {}
        for key, _, inverse in RATIOS:
            if row[key] is not None and rows[0][key]:
                row["ratios"][key] = rows[0][key] / row[key] if inverse else row[key] / rows[0][key]

    model_cfg = ModelConfig(**bench.model)
    return {
        "header": {
            "torch": torch.__version__,
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "cpu_cores": os.cpu_count(),
            "load_average": load_average,
            "config": config,
            "quick": quick,
            "model": {"image_size": model_cfg.image_size, "num_channels": model_cfg.num_channels,
                      "num_res_blocks": model_cfg.num_res_blocks,
                      "channel_mult": ",".join(map(str, parse_channel_mult(model_cfg.channel_mult,
                                                                           model_cfg.image_size))),
                      "attention_resolutions": model_cfg.attention_resolutions, "num_heads": model_cfg.num_heads},
            "parameters": n_params,
            "train_batch": list(work["batch"]["x"].shape),
            "train_flops": flops,
            "sampling": {"videos": bench.sample_batch, "T": bench.T, "n_obs": bench.n_obs,
                         "max_frames": bench.max_frames, "autoreg_new_frames_per_stage": bench.max_latent_frames,
                         "ddim_steps": bench.sampling_steps, "generated_frames": frames},
            "reps": reps,
            "memory_method": ", ".join(sorted(methods)),
        },
        "rows": rows,
    }


def repeat_interleaved(runners, reps, log):
    """Run every runner's measures once per repetition, runner after runner; repetition 0 is the warm-up.

    Returns (first, times): per runner name, the warm-up's seconds per measure and the counted
    repetitions' lists of seconds. A measure that raises in a variant other than fp32 is marked
    failed and not run again, so one broken combination (a compiler bug, say) loses no other numbers.
    """
    first = {r.name: {} for r in runners}
    times = {r.name: {m: [] for m in r.measures} for r in runners}
    for rep in range(reps + 1):
        for r in runners:
            took = {}
            for m in r.measures:
                try:
                    seconds = r.run(m)
                except Exception as e:  # noqa: BLE001 - reported in the table, see above
                    if r.name == "fp32":
                        raise
                    r.fail(m, e)
                    del times[r.name][m]
                    log(f"  {r.name}: {m} failed: {r.failed[m]}")
                    continue
                took[m] = seconds
                if rep == 0:
                    first[r.name][m] = seconds
                else:
                    times[r.name][m].append(seconds)
            if took:
                log(f"  {'warm-up' if rep == 0 else f'repetition {rep}/{reps}'} {r.name}: "
                    + ", ".join(f"{m} {s:.2f} s" for m, s in took.items()))
    return first, times


def result_row(r, first, times, memory, flops, frames, device):
    """One runner's table row: medians turned into ms, MB, MFU and frames per second (None: not measured)."""
    med = {m: statistics.median(ts) for m, ts in times.items()}
    if r.last_cache is not None and r.last_cache.frames_requested:
        r.note = (f"the network ran on {r.last_cache.frames_computed / r.last_cache.frames_requested:.0%} of "
                  f"the frame slots the sampler asked for")
    peak = peak_flops(device, r.variant.precision)
    row = {
        "variant": r.name, "what": r.variant.what, "measures": list(r.variant.measures),
        "compiled": r.variant.compile, "unavailable": r.unavailable, "failed": dict(r.failed), "note": r.note,
        "forward_ms": 1e3 * med["forward"] if "forward" in med else None,
        "train_ms": 1e3 * med["train"] if "train" in med else None,
        "train_mem_mb": memory / 2**20 if memory is not None else None,
        "mfu": flops / med["train"] / peak if peak and "train" in med else None,
        "on_cuda": device.type == "cuda",
        "autoreg_fps": frames / med["autoreg"] if "autoreg" in med else None,
        "stabilized_fps": frames / med["stabilized"] if "stabilized" in med else None,
        "compile_s": None,
        "compile_s_by_measure": None,
        "times_s": {m: list(ts) for m, ts in times.items()},
    }
    if r.variant.compile and med:
        row["compile_s_by_measure"] = {m: first[m] - med[m] for m in med}
        row["compile_s"] = sum(row["compile_s_by_measure"].values())
    return row


# ----------------------------------------------------------------------------- output

NOISY = 1.5  # repetitions of a measure whose slowest is this many times its fastest are flagged

COLUMN_MEASURE = {"forward_ms": "forward", "train_ms": "train", "train_mem_mb": "train", "mfu": "train",
                  "autoreg_fps": "autoreg", "stabilized_fps": "stabilized", "compile_s": "train"}


def cell(row, key, fmt):
    value = row[key]
    if value is not None:
        return fmt.format(value)
    measure = COLUMN_MEASURE[key]
    if (key == "mfu" and not row["on_cuda"]) or (key == "compile_s" and not row["compiled"]):
        return "n/a"
    if measure in row["failed"]:
        return "failed"
    if row["unavailable"] and measure in row["measures"]:
        return row["unavailable"]
    if key == "mfu" and measure in row["measures"]:
        return "unknown"  # measured on a GPU whose peak FLOP/s is not in PEAK_FLOPS
    return "n/a"


def markdown(result):
    """The result as a header and a markdown table (numbers: medians; x columns: against fp32 eager)."""
    h = result["header"]
    s = h["sampling"]
    b = h["train_batch"]
    load = "unknown" if h["load_average"] is None else f"{h['load_average']:.1f}"
    lines = [
        f"# benchmark: config {h['config']}{' (quick)' if h['quick'] else ''}",
        "",
        f"- torch {h['torch']}, device {h['device']} ({h['device_name']}), {h['threads']} threads, "
        f"{h['cpu_cores']} CPU cores, load average {load} before the run",
        f"- model {h['model']}, {h['parameters'] / 1e6:.2f} M parameters",
        f"- training batch {b[0]} videos x {b[1]} frames x {b[2]}x{b[3]}x{b[4]}, "
        f"{h['train_flops'] / 1e9:.2f} GFLOP per step (forward + backward)",
        f"- sampling {s['videos']} videos of {s['T']} frames from {s['n_obs']} given, window {s['max_frames']}, "
        f"autoreg {s['autoreg_new_frames_per_stage']} new frames per stage, stabilized-autoreg 1, "
        f"DDIM {s['ddim_steps']} steps",
        f"- medians of {h['reps']} interleaved repetitions after a warm-up; peak train memory: "
        f"{h['memory_method']}, above what was held before the step",
        "",
    ]
    if h["load_average"] is not None and h["load_average"] > 0.5 * h["cpu_cores"]:
        lines.insert(-1, "- other processes were using the CPU: expect noisy times (and, with several torch "
                         "threads, much slower ones)")
    headings = ["variant"] + [c[1] for c in COLUMNS] + [r[1] for r in RATIOS]
    lines.append("| " + " | ".join(headings) + " |")
    lines.append("|" + "---|" * len(headings))
    for row in result["rows"]:
        cells = [row["variant"]] + [cell(row, key, fmt) for key, _, fmt in COLUMNS]
        cells += [f"{row['ratios'][key]:.2f}" if key in row["ratios"] else "n/a" for key, _, _ in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("x columns: fwd/train/autoreg/stab are speed-ups over fp32 eager (> 1: faster), "
                 "mem is memory / fp32's.")
    for row in result["rows"]:
        extra = [row["what"]]
        if row.get("compile_s_by_measure"):
            extra.append("compile time (first call minus steady state): " + ", ".join(
                f"{m} {s:.1f} s" for m, s in row["compile_s_by_measure"].items()))
        extra += [f"{m} failed: {error}" for m, error in row["failed"].items()]
        noisy = {m: ts for m, ts in row["times_s"].items() if max(ts) > NOISY * min(ts)}
        if noisy:
            extra.append("repetitions disagree (the median is unreliable): " + ", ".join(
                f"{m} {min(ts):.2f}-{max(ts):.2f} s" for m, ts in noisy.items()))
        if row["note"]:
            extra.append(row["note"])
        lines.append(f"- {row['variant']}: " + "; ".join(extra))
    return "\n".join(lines) + "\n"


def write_outputs(result, out):
    """Write `out`.json and `out`.md (a .json or .md suffix on `out` is dropped); returns the two paths."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    return paths



def cache_by_window(config, windows, T=64, sampling_steps=20, reps=2, device=None, seed=0, log=None, videos=None):
    """Frames/s of a causal `stabilized-autoreg` rollout (DDIM, 1 new frame per stage) to T frames, with and
    without the key/value cache, for each window (max_frames) in `windows`; returns a markdown table.

    Uncached and cached rollouts of one window alternate (reps each) and the median is reported; the
    cached sampler computes the window's frames once per stage and then only the new frame, so the
    ratio grows with the window and with the number of steps per stage. videos: how many videos are
    sampled at once (None: the config's sample_batch).
    """
    from .sampling.kv_cache import CausalCache

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    bench = bench_config(config, quick=False, sampling_steps=sampling_steps)
    if videos is not None:
        if videos < 1:
            raise ConfigError(f"--videos must be a positive integer, got {videos}.")
        bench = dataclasses.replace(bench, sample_batch=videos)
    device = device_flag(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not windows or min(windows) < 2 or max(windows) >= T:
        raise ConfigError(f"--cache_windows must be window sizes between 2 and T - 1 = {T - 1}, got {windows}.")
    torch.manual_seed(seed)
    model = create_model(ModelConfig(**{**bench.model, "causal": True})).to(device).eval()
    randomize_zero_parameters(model, seed)
    diffusion = create_diffusion(DiffusionConfig(), timestep_respacing=str(sampling_steps))
    size = bench.model["image_size"]
    videos = (torch.rand(bench.sample_batch, T, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
              * 2 - 1).to(device)
    lines = [f"causal {config} model, stabilized-autoreg (DDIM, {sampling_steps} steps per stage, 1 new frame per "
             f"stage), {bench.sample_batch} video(s) to {T} frames, median of {reps}:", "",
             "| window | frames/s uncached | frames/s cached | speed-up | frame slots computed |", "|---|---|---|---|---|"]
    for window in windows:
        scheme = Scheme.from_preset("stabilized-autoreg", T=T, n_obs=window - 1, max_frames=window, use_ddim=True,
                                    sampling_steps=sampling_steps)
        frames = bench.sample_batch * (T - scheme.n_obs)
        seconds = {"uncached": [], "cached": []}
        for rep in range(reps):
            for kind in seconds:
                net = CausalCache(model) if kind == "cached" else model
                generators = [video_generator(0, 0, b) for b in range(len(videos))]
                start = time.perf_counter()
                with torch.no_grad():
                    sample_video(net, diffusion, videos, scheme.n_obs, scheme.make_plan(), scheme.stage, generators)
                synchronize(device)
                seconds[kind].append(time.perf_counter() - start)
                if kind == "cached":
                    computed = net.frames_computed / net.frames_requested
                log(f"window {window} rep {rep + 1}: {kind} {seconds[kind][-1]:.1f} s")
        fps = {kind: frames / statistics.median(s) for kind, s in seconds.items()}
        lines.append(f"| {window} | {fps['uncached']:.2f} | {fps['cached']:.2f} | "
                     f"{fps['cached'] / fps['uncached']:.2f}x | {computed:.0%} |")
    return "\n".join(lines) + "\n"
