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
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion.benchmark.ddp import compare_runs, time_train_steps  # noqa: E402


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


def main(args):
    B = args.batch_size
    return compare_runs(args.runs or f"1x{B},1x{B}t1,2x{B}", [sys.executable, __file__, "--worker"], args.steps,
                        args.warmup, args.max_frames)


if __name__ == "__main__":
    arguments = create_argparser().parse_args()
    if arguments.worker:
        time_train_steps(arguments.batch_size, arguments.max_frames, arguments.steps, arguments.warmup,
                         arguments.threads)
    else:
        sys.exit(main(arguments))
