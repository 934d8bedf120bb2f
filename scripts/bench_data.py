"""How long training waits for data: a folder of mp4 clips against its shard cache.

    python scripts/bench_data.py                        # 64 clips x 32 frames of 64 x 64, made here
    python scripts/bench_data.py --folder my/videos     # your own clips instead

Makes (or takes) the folder, caches its train split at each --image_sizes (scripts/cache_dataset.py's
write_cache), then times train_batches (batch --batch_size, --T frames) from the folder and from
the cache, with --workers reader threads and the default read-ahead. Prints the median over --reps
repetitions of two numbers per row:
  s/batch     seconds per batch when nothing else runs (the loader's throughput);
  wait/step   seconds a training step of --step_s seconds (simulated by sleeping) waits for its
              batch: what read-ahead leaves of the reading time.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion.benchmark.data_loading import compare_sources  # noqa: E402


def create_argparser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=None, help="a folder of videos (default: make bouncing-ball mp4 clips)")
    p.add_argument("--work_dir", default=None, help="where the clips and caches go (default: a temporary folder)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--clip_size", type=int, default=64)
    p.add_argument("--image_sizes", default="16,64")
    p.add_argument("--workers", default="0,1")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, default=2, help="batches timed per repetition")
    p.add_argument("--step_s", type=float, default=0.1, help="simulated training step for wait/step")
    return p


def main(args):
    compare_sources(args.folder, args.work_dir, args.clips, args.frames, args.clip_size,
                    image_sizes=[int(s) for s in args.image_sizes.split(",")],
                    workers=[int(w) for w in args.workers.split(",")], batch_size=args.batch_size, T=args.T,
                    reps=args.reps, batches=args.batches, step_s=args.step_s)


if __name__ == "__main__":
    main(create_argparser().parse_args())
