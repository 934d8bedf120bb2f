"""Per-step training time on 1 rank and on several (DDP: gloo on CPU, nccl on GPUs) (scripts/bench_ddp.py).

Each run "<ranks>x<batch per rank>[t<threads per rank>]" is `mpiexec -n <ranks>` of a worker
command that calls `time_train_steps`: the real TrainLoop.run_step on bouncing_balls, timed on
rank 0 after a warm-up, reported as one `RESULT <json>` line that `compare_runs` reads back.
Without t<n> each rank gets its share of the CPU cores (dist_util.set_cpu_threads).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import dist_util
from ..data.batches import train_batches
from ..data.datasets import get_dataset
from ..diffusion import DiffusionConfig, create_diffusion
from ..logger import Logger
from ..models.build import ModelConfig, create_model
from ..training.config import TrainConfig
from ..training.train_loop import TrainLoop

MODEL_ARGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16,8", num_heads=2)
RESULT = "RESULT "  # the prefix of the worker's one line of results


def time_train_steps(batch_size, max_frames, steps, warmup, threads=0):
    """Time run_step on this rank (a process of an mpiexec run); rank 0 prints one RESULT line."""
    rank, world_size = dist_util.setup_dist()
    dist_util.set_cpu_threads()
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(batch_size=batch_size, max_frames=max_frames, T=2 * max_frames)
    torch.manual_seed(0)
    model = create_model(ModelConfig(**MODEL_ARGS)).to(dist_util.dev())
    dataset = get_dataset("bouncing_balls", T=cfg.T, image_size=MODEL_ARGS["image_size"])
    batches = train_batches(dataset, 2 * cfg.batch_size, seed=0, rank=rank, world_size=world_size)
    loop = TrainLoop(model=model, diffusion=create_diffusion(DiffusionConfig()), data=lambda step: next(batches),
                     config=cfg, run_dir="unused", saved_config={}, logger=Logger(rank=1))
    times = []
    for step in range(warmup + steps):
        dist_util.barrier()
        start = time.perf_counter()
        loop.run_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        loop.step += 1
    if rank == 0:
        median = statistics.median(times[warmup:])
        print(RESULT + json.dumps({"ranks": world_size, "batch": cfg.batch_size, "threads": torch.get_num_threads(),
                                   "device": str(dist_util.dev()), "median_s": median,
                                   "videos_per_s": world_size * cfg.batch_size / median}), flush=True)


def compare_runs(runs, worker_command, steps, warmup, max_frames):
    """Run each "<ranks>x<batch>[t<threads>]" of the comma list `runs` under mpiexec and print its row.

    worker_command: the command (a list) that runs `time_train_steps` with the flags --batch_size,
    --threads, --steps, --warmup and --max_frames. Returns 0, or 1 after printing why a run failed.
    """
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ, WANDB_MODE="disabled")
    print(f"model {MODEL_ARGS}, max_frames {max_frames}, median of {steps} steps after {warmup}")
    print(f"{'ranks':>5} {'batch/rank':>10} {'threads/rank':>12} {'s/step':>8} {'videos/s':>9}  device")
    for run in runs.split(","):
        shape, _, threads = run.partition("t")
        ranks, batch = (int(x) for x in shape.split("x"))
        cmd = [str(mpiexec), "-n", str(ranks), *worker_command, "--batch_size", str(batch),
               "--threads", threads or "0",
               "--steps", str(steps), "--warmup", str(warmup), "--max_frames", str(max_frames)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode != 0 or not lines:
            print(f"error: run {run} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(lines[-1][len(RESULT):])
        print(f"{r['ranks']:>5} {r['batch']:>10} {r['threads']:>12} {r['median_s']:>8.3f} {r['videos_per_s']:>9.2f}  "
              f"{r['device']}")
    return 0
