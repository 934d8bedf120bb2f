"""Per-step training time on 1 rank and on 2 ranks (DDP: gloo on CPU, nccl on GPUs).

    python scripts/bench_ddp.py                     # 1 rank x B videos per step, then 2 ranks x B
    python scripts/bench_ddp.py --runs 1x4,1x8t1,2x4 --steps 30

Each run is `mpiexec -n <ranks> python scripts/bench_ddp.py --worker ...`: the real
TrainLoop.run_step on bouncing_balls, timed on rank 0 after --warmup steps. Prints the
median seconds per step and the videos trained per second (ranks x batch per step).
A run "<ranks>x<batch>" gives each rank its share of the CPU cores; "<ranks>x<batch>t<n>"
gives each rank n threads.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_ARGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16,8", num_heads=2)


def create_argparser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="", help="comma-separated <ranks>x<batch per rank>[t<threads per rank>] "
                                              "(default: 1xB,1xBt1,2xB)")
    p.add_argument("--batch_size", type=int, default=4, help="B")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max_frames", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def worker(args):
    """Time run_step on this rank; rank 0 prints one JSON line."""
    sys.path.insert(0, str(REPO))
    import torch

    from improved_diffusion import dist_util
    from improved_diffusion.logger import Logger
    from improved_diffusion.script_util import DiffusionConfig, ModelConfig, create_diffusion, create_model
    from improved_diffusion.training.train_loop import TrainConfig, TrainLoop
    from improved_diffusion.data.datasets import get_dataset, train_batches

    rank, world_size = dist_util.setup_dist()
    dist_util.set_cpu_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size, max_frames=args.max_frames, T=2 * args.max_frames)
    torch.manual_seed(0)
    model = create_model(ModelConfig(**MODEL_ARGS)).to(dist_util.dev())
    dataset = get_dataset("bouncing_balls", T=cfg.T, image_size=MODEL_ARGS["image_size"])
    batches = train_batches(dataset, 2 * cfg.batch_size, seed=0, rank=rank, world_size=world_size)
    loop = TrainLoop(model=model, diffusion=create_diffusion(DiffusionConfig()), data=lambda step: next(batches),
                     config=cfg, run_dir="unused", saved_config={}, logger=Logger(rank=1))
    times = []
    for step in range(args.warmup + args.steps):
        dist_util.barrier()
        start = time.perf_counter()
        loop.run_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        loop.step += 1
    if rank == 0:
        median = statistics.median(times[args.warmup:])
        print("RESULT " + json.dumps({"ranks": world_size, "batch": cfg.batch_size, "threads": torch.get_num_threads(),
                                      "device": str(dist_util.dev()), "median_s": median,
                                      "videos_per_s": world_size * cfg.batch_size / median}), flush=True)


def main(args):
    B = args.batch_size
    runs = args.runs or f"1x{B},1x{B}t1,2x{B}"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ, WANDB_MODE="disabled")
    print(f"model {MODEL_ARGS}, max_frames {args.max_frames}, median of {args.steps} steps after {args.warmup}")
    print(f"{'ranks':>5} {'batch/rank':>10} {'threads/rank':>12} {'s/step':>8} {'videos/s':>9}  device")
    for run in runs.split(","):
        shape, _, threads = run.partition("t")
        ranks, batch = (int(x) for x in shape.split("x"))
        cmd = [str(mpiexec), "-n", str(ranks), sys.executable, __file__, "--worker", "--batch_size", str(batch),
               "--threads", threads or "0",
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--max_frames", str(args.max_frames)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"error: run {run} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        r = json.loads(lines[-1][len("RESULT "):])
        print(f"{r['ranks']:>5} {r['batch']:>10} {r['threads']:>12} {r['median_s']:>8.3f} {r['videos_per_s']:>9.2f}  "
              f"{r['device']}")


if __name__ == "__main__":
    arguments = create_argparser().parse_args()
    worker(arguments) if arguments.worker else main(arguments)
