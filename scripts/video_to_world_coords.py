"""Map every sampled CARLA video of a results folder to the car's world coordinates (FDM's command).

    python scripts/video_to_world_coords.py --eval_dir results/<run>/<checkpoint>/<scheme> \
        --classifier_path checkpoints/carla-regressor/classifier_checkpoint.pth \
        --regressor_path checkpoints/carla-regressor/regressor_checkpoint.pth

Writes <eval_dir>/coords/sample_<index>-<sample_idx>.npy, float64 [T x 2] (x, y) per frame, beside
samples/; files already there are kept, so a stopped run resumes. With --dataset_dir DIR instead
of --eval_dir (FDM's second mode), every DIR/video_*.pt is mapped to results/DIR/coords/. The classifier picks a grid cell
of Town01 and the regressor's head for that cell gives (x, y) (see carla_regressor.py). video_eval.py
computes FDM's WD and PO metrics from the same networks.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.errors import ConfigError  # noqa: E402
from improved_diffusion.evaluation.carla_coords import write_dataset_world_coords, write_world_coords  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_to_world_coords.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_dir", default=None, help="a video_sample.py output folder")
    p.add_argument("--dataset_dir", default=None,
                   help="instead of samples: every video_*.pt of this CARLA folder, to results/<dataset_dir>/coords")
    p.add_argument("--classifier_path", required=True, help="CARLA cell classifier weights")
    p.add_argument("--regressor_path", required=True, help="CARLA coordinate regressor weights")
    p.add_argument("--batch_size", type=int, default=8, help="frames per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(args):
    if (args.eval_dir is None) == (args.dataset_dir is None):
        raise ConfigError("pass exactly one of --eval_dir (sampled videos) and --dataset_dir (a CARLA folder).")
    if args.dataset_dir is not None:
        write_dataset_world_coords(args.dataset_dir, args.classifier_path, args.regressor_path, args.batch_size,
                                   args.device)
    else:
        write_world_coords(args.eval_dir, args.classifier_path, args.regressor_path, args.batch_size, args.device)


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
