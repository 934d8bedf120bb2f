"""Decode a dataset once into memory-mapped shards, so training reads slices instead of decoding videos.

    python scripts/cache_dataset.py --dataset minerl --out /fast/minerl-64
    python scripts/cache_dataset.py --dataset path/to/videos --out caches/videos-64 --image_size 64
    mpiexec -n 8 python scripts/cache_dataset.py --dataset dmlab --out caches/dmlab   # ranks share the shards
    python scripts/video_train.py --dataset caches/videos-64 ...                     # trains from the cache

Every video is stored whole (or its first --max_length frames), resized to the image size and
rounded to uint8, so training still draws a random window of T frames from it, the same window
the source would give (improved_diffusion/data/shards.py describes the format and the rule).
An interrupted run is finished by running it again: complete shards are checked and kept.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.data.shard_writer import DEFAULT_SHARD_SIZE, mpi_world, write_cache  # noqa: E402

SPLITS = {"train": ("train",), "test": ("test",), "both": ("train", "test")}


def create_argparser():
    p = cli.ArgumentParser(prog="cache_dataset.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a registered name or a folder of videos")
    p.add_argument("--out", required=True, help="the cache folder to write (then pass it as --dataset)")
    p.add_argument("--split", default="both", choices=tuple(SPLITS))
    p.add_argument("--T", type=int, default=None, help="clip length the cache is for (default: the dataset's)")
    p.add_argument("--image_size", type=int, default=None, help="stored frame size (default: the dataset's)")
    p.add_argument("--frame_skip", type=int, default=1, help="dmlab / minecraft: the --frame_skip of training")
    p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="videos per shard")
    p.add_argument("--seed", type=int, default=0, help="procedural datasets: which videos are generated")
    p.add_argument("--data_root", default=None, help="where registered datasets are (default: datasets/ of this repo)")
    p.add_argument("--max_videos", type=int, default=None, help="cache only the first N videos of each split")
    p.add_argument("--max_length", type=int, default=None,
                   help="store at most this many frames of each video (windows then start in them)")
    return p


def main(args):
    rank, world_size, barrier = mpi_world()
    summary = write_cache(args.dataset, args.out, splits=SPLITS[args.split], T=args.T, image_size=args.image_size,
                          frame_skip=args.frame_skip, shard_size=args.shard_size, seed=args.seed,
                          data_root=args.data_root, max_videos=args.max_videos, max_length=args.max_length,
                          rank=rank, world_size=world_size, barrier=barrier, progress=True)
    if rank == 0:
        for split, s in summary.items():
            print(f"{split}: {s['videos']} videos, {s['frames']} frames in {args.out}; "
                  f"shards written {s['written']}, kept {s['kept']} (rank 0)")


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
