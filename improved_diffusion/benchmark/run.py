"""run_benchmark: speed and memory of one model configuration under each precision, compilation and memory option.

`run_benchmark(config, device, ...)` builds the named configuration's model once, gives every
variant its own copy of the same weights, and measures all variants in ONE process with
interleaved repetitions (variant A rep 1, variant B rep 1, ..., A rep 2, ...), so slow drifts of
the machine (clock boost, other processes, thermal throttling) hit every variant alike. Repetition
0 is a warm-up and is not counted (compilation, cuDNN autotuning, allocator growth); medians of the
others are reported, with ratios against float32 eager, the baseline. What is measured:

- forward: one no-grad network call on a training batch (its noisy frames and masks);
- train step: forward + backward + AdamW step with the training loss (epsilon MSE on the frames
  that are not observed, a batch built by training/batches.py's `training_batch` in FDM's
  noise mode, padded to max_frames); fp16 scales the loss with `torch.amp.GradScaler`;
- peak train memory: the most memory a training step holds above what was held before it
  (activations, gradients, workspace; not the weights or the AdamW state, which every variant
  holds alike), in one extra, untimed step, read as memory.py says (the table names the method);
- MFU (CUDA only): model FLOPs of one training step (`torch.utils.flop_counter.FlopCounterMode`
  on the float32 eager model, so activation checkpointing's recomputation is not counted) / step
  time / the device's dense peak FLOP/s for the variant's dtype (probes.PEAK_FLOPS; unknown devices:
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

import os
import statistics
import sys

import torch

from ..cli import device_flag
from ..diffusion import DiffusionConfig, create_diffusion
from ..errors import ConfigError
from ..models.build import ModelConfig, create_model, parse_channel_mult
from ..sampling.scheme import Scheme
from .configs import bench_config
from .probes import choose_variants, device_name, peak_flops
from .runner import Runner
from .tables import RATIOS
from .workload import count_train_flops, make_training_batch, randomize_zero_parameters


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
