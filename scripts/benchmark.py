"""Time and memory of one model configuration under each precision, compile and memory option, side by side.

    python scripts/benchmark.py --config small --quick          # the demo's model, under a minute on 2 CPU cores
    python scripts/benchmark.py --config fdm32 --device cuda --reps 10 --out results/bench_fdm32
    python scripts/benchmark.py --config carla --variants fp32,bf16,compile-bf16,checkpoint

Prints a markdown table: forward ms, training-step ms, peak training memory, MFU (CUDA), generated
frames per second of autoreg and stabilized-autoreg sampling, compile time, and ratios against
float32 eager. All variants run in one process with interleaved repetitions; what is measured and
how is in improved_diffusion/benchmark/run.py's docstring. Not for tests of speed: numbers vary by machine.

On a CPU that other processes are using, torch's OpenMP threads spin while they wait for each
other and every small operation can take ten times longer (measured: `small --quick` 3.5 minutes
instead of 37 s with OMP_WAIT_POLICY=PASSIVE or 22 s with --threads 1); the table's header gives
the load average so that such a run can be recognised.
"""

import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.benchmark.cache import cache_by_window  # noqa: E402
from improved_diffusion.benchmark.configs import CONFIGS, VARIANTS  # noqa: E402
from improved_diffusion.benchmark.run import run_benchmark  # noqa: E402
from improved_diffusion.benchmark.tables import markdown, write_outputs  # noqa: E402
from improved_diffusion.errors import ConfigError  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small", help=f"Model and setup: one of {', '.join(CONFIGS)}.")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if there is one, else cpu).")
    p.add_argument("--reps", type=int, default=None,
                   help="Counted repetitions after a warm-up (default 5; 2 with --quick).")
    p.add_argument("--variants", default="",
                   help=f"Comma-separated, from {', '.join(VARIANTS)} (default: every one that applies "
                        f"here; fp32 always runs as the baseline).")
    p.add_argument("--quick", action="store_true",
                   help="Shorter videos, fewer DDIM steps and repetitions; on CPU no compile or fp16 variants "
                        "unless named (minutes each there).")
    p.add_argument("--sampling_steps", type=int, default=None, help="DDIM steps of sampling (default: the config's).")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    p.add_argument("--cache_windows", default="", metavar="W1,W2,...",
                   help="Instead of the variant table: frames/s of a causal stabilized-autoreg rollout to --T frames "
                        "with and without the key/value cache, per window size (e.g. 4,8,16).")
    p.add_argument("--T", type=int, default=64, help="With --cache_windows: frames per rollout.")
    p.add_argument("--videos", type=int, default=None,
                   help="With --cache_windows: videos sampled at once (default: the config's).")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="Also write FILE.json and FILE.md (a .json or .md suffix is dropped).")
    return p


def main(args):
    if args.cache_windows:
        try:
            windows = [int(w) for w in args.cache_windows.split(",")]
        except ValueError:
            raise ConfigError(f"--cache_windows must be comma-separated integers, got {args.cache_windows!r}.") from None
        sys.stdout.write(cache_by_window(args.config, windows, T=args.T, sampling_steps=args.sampling_steps or 20,
                                         reps=args.reps or 2, device=args.device, videos=args.videos))
        return
    result = run_benchmark(args.config, device=args.device, reps=args.reps, variants=args.variants, quick=args.quick,
                           sampling_steps=args.sampling_steps, threads=args.threads)
    sys.stdout.write(markdown(result))
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
