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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion.data import bouncing_balls  # noqa: E402
from improved_diffusion.data.datasets import get_dataset, train_batches  # noqa: E402
from improved_diffusion.data.shards import write_cache  # noqa: E402


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


def make_clips(folder, clips, frames, size):
    """Bouncing-ball clips as mp4 files (the codec imageio-ffmpeg ships), like a user's own folder."""
    import imageio_ffmpeg

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        path = folder / f"{i}.mp4"
        if path.exists():
            continue
        writer = imageio_ffmpeg.write_frames(str(path), (size, size), fps=10, quality=8, macro_block_size=1)
        writer.send(None)
        for frame in bouncing_balls.make_video("train", i, T=frames, image_size=size):
            writer.send(frame)
        writer.close()
    return folder


def time_batches(dataset, args, workers, step_s):
    """Median over reps of the seconds per batch spent in next(), a step of step_s seconds between calls."""
    batches = train_batches(dataset, args.batch_size, seed=0, num_workers=workers)
    next(batches)  # threads started, files opened
    per_rep = []
    for _ in range(args.reps):
        waited = 0.0
        for _ in range(args.batches):
            if step_s:
                time.sleep(step_s)
            start = time.perf_counter()
            next(batches)
            waited += time.perf_counter() - start
        per_rep.append(waited / args.batches)
    batches.close()
    return statistics.median(per_rep)


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data-"))
    folder = Path(args.folder) if args.folder else make_clips(work / "clips", args.clips, args.frames, args.clip_size)
    sizes = [int(s) for s in args.image_sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    print(f"folder {folder}: batch {args.batch_size} x T {args.T}, median of {args.reps} x {args.batches} batches, "
          f"wait/step with a {args.step_s} s step")
    print(f"{'source':<7} {'size':>4} {'workers':>7} {'s/batch':>9} {'wait/step':>9}")
    for size in sizes:
        cache = work / f"cache-{size}"
        start = time.perf_counter()
        write_cache(folder, cache, splits=("train",), image_size=size)
        cache_s = time.perf_counter() - start
        sources = {"mp4": get_dataset(str(folder), T=args.T, image_size=size), "cache": get_dataset(str(cache), T=args.T)}
        for name, dataset in sources.items():
            for w in workers:
                throughput = time_batches(dataset, args, w, 0.0)
                wait = time_batches(dataset, args, w, args.step_s)
                print(f"{name:<7} {size:>4} {w:>7} {throughput:>9.4f} {wait:>9.4f}", flush=True)
        print(f"(caching the {len(sources['mp4'])} train clips at size {size} took {cache_s:.1f} s)")


if __name__ == "__main__":
    main(create_argparser().parse_args())
