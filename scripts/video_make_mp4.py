"""Turn sampled videos into mp4 and gif files, side by side with the ground truth.

    python scripts/video_make_mp4.py --eval_dir results/<run>/<checkpoint>/<scheme>

Observed frames have a blue border, generated frames a red one; the right-hand panel is
the ground-truth test video (where it is that long). Files go to <eval_dir>/videos/.
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

from improved_diffusion.data.datasets import DatasetError, get_dataset
from improved_diffusion.evaluation.video_files import side_by_side, write_gif, write_mp4

SAMPLE_RE = re.compile(r"sample_(\d+)-(\d+)\.npy$")


def main(args):
    config_path = os.path.join(args.eval_dir, "sampling_config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"error: {args.eval_dir} has no sampling_config.json; is it a video_sample.py output folder?")
    with open(config_path) as f:
        config = json.load(f)
    paths = sorted(glob.glob(os.path.join(args.eval_dir, "samples", "sample_*.npy")))
    if not paths:
        raise SystemExit(f"error: no samples in {os.path.join(args.eval_dir, 'samples')}.")
    out_dir = args.out_dir or os.path.join(args.eval_dir, "videos")
    os.makedirs(out_dir, exist_ok=True)
    n_obs = int(config["n_obs"])
    gt_data = None
    if not args.no_ground_truth:
        try:
            gt_data = get_dataset(config["dataset"], split="test", T=None, image_size=config["image_size"],
                                  seed=int(config.get("data_seed", 0)))
        except DatasetError as e:
            print(f"warning: no ground truth ({e})", file=sys.stderr)
    for path in paths[: args.max_videos if args.max_videos > 0 else None]:
        index = int(SAMPLE_RE.search(path).group(1))
        sample = np.load(path)
        observed = np.arange(len(sample)) < n_obs
        gt = None
        if gt_data is not None and index < len(gt_data):
            gt = ((gt_data.video(index).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        frames = side_by_side(sample, observed, gt, scale=args.scale)
        stem = os.path.join(out_dir, os.path.basename(path)[: -len(".npy")])
        write_mp4(frames, stem + ".mp4", fps=args.fps)
        write_gif(frames, stem + ".gif", fps=args.fps)
        print(stem + ".mp4")


def create_argparser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_dir", required=True)
    p.add_argument("--out_dir", default=None)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling factor")
    p.add_argument("--max_videos", type=int, default=-1)
    p.add_argument("--no_ground_truth", action="store_true")
    return p


if __name__ == "__main__":
    main(create_argparser().parse_args())
