"""
Convert a folder of .mp4 videos into one uint8 [T x H x W x 3] .npy file per video.

    python datasets/convert_mp4.py SRC_DIR DST_DIR

Videos are numbered 0, 1, 2, ... in natural order of their file names (2.mp4
before 10.mp4) and written as DST_DIR/<i>.npy, the layout FDM's loaders (and ours)
read. DST_DIR/sources.txt records which file became which number.

Resumable: finished .npy files are kept, and each file is written to a .part
file first and renamed when complete, so an interrupted run never leaves a
truncated video behind. Decoding uses the ffmpeg that imageio-ffmpeg ships; no
TensorFlow is needed.
"""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np


def natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def decode_mp4(path):
    """All frames of an mp4 as uint8 [T x H x W x 3]."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3) for buffer in reader]
    if not frames:
        raise ValueError("no frames could be decoded")
    return np.stack(frames)


def save_npy_atomic(path, array):
    """Write `path` via a .part file so a crash never leaves a truncated .npy behind."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        np.save(f, array)
    os.replace(part, path)


def write_sources(dst, names):
    """Record the numbering; refuse to resume into a folder numbered from a different file list."""
    sources = dst / "sources.txt"
    text = "".join(f"{i} {name}\n" for i, name in enumerate(names))
    if sources.exists() and sources.read_text() != text:
        raise SystemExit(f"error: {dst} was converted from a different set of videos (see {sources}); remove it first.")
    sources.write_text(text)


def check_disk_space(dst, bytes_per_video, count):
    needed = bytes_per_video * count
    free = shutil.disk_usage(dst).free
    if needed > free:
        raise SystemExit(
            f"error: converting {count} videos into {dst} needs about {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free."
        )


def convert_folder(src, dst, quiet=False):
    """Convert every .mp4 directly in `src`; returns the number of videos written (not skipped)."""
    src, dst = Path(src), Path(dst)
    names = sorted((p.name for p in src.glob("*.mp4")), key=natural_key)
    if not names:
        raise SystemExit(f"error: no .mp4 files found in {src}.")
    dst.mkdir(parents=True, exist_ok=True)
    write_sources(dst, names)
    todo = [i for i in range(len(names)) if not (dst / f"{i}.npy").exists()]
    if not todo:
        return 0
    first = None
    iterator = todo
    if not quiet:
        from tqdm import tqdm

        iterator = tqdm(todo, desc=f"{src.name} -> {dst}", unit="video")
    for i in iterator:
        try:
            video = decode_mp4(src / names[i])
        except Exception as e:
            raise SystemExit(f"error: could not decode {src / names[i]} ({' '.join(str(e).split())[:200]}).")
        if first is None:
            first = video
            check_disk_space(dst, video.nbytes, len(todo))
        save_npy_atomic(dst / f"{i}.npy", video)
    return len(todo)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("src", help="folder holding the .mp4 files")
    parser.add_argument("dst", help="folder to write <i>.npy files into")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    written = convert_folder(args.src, args.dst, quiet=args.quiet)
    print(f"{args.dst}: {written} videos converted ({len(list(Path(args.dst).glob('*.npy')))} in total).")


if __name__ == "__main__":
    sys.exit(main())
