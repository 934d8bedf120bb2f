"""Score sampled videos against the ground-truth test videos they continue.

    python scripts/video_eval.py --eval_dir results/<run>/<checkpoint>/<scheme>
    python scripts/video_eval.py --eval_dir DIR --metrics psnr,ssim,fvd --i3d_path i3d_torchscript.pt
    python scripts/video_eval.py --eval_dir DIR --metrics on_manifold     # bouncing_balls, cue_recall
    python scripts/video_eval.py --eval_dir DIR --metrics wd,po \
        --carla_classifier checkpoints/carla-regressor/classifier_checkpoint.pth \
        --carla_regressor checkpoints/carla-regressor/regressor_checkpoint.pth

Reads DIR/sampling_config.json and DIR/samples/*.npy (as written by video_sample.py), compares each
sample with the first T frames of the same test video, and writes DIR/metrics.json (per-frame values,
overall means over the generated frames, skipped metrics and why) and DIR/<metric>_per_frame.png.
Default metrics: PSNR, SSIM and LPIPS (if the `lpips` package is installed), FVD when --i3d_path is
given, WD and PO (FDM's CARLA metrics) when the CARLA networks are given, cue recall on the
cue_recall dataset, and on_manifold on bouncing_balls and cue_recall: per frame the fraction of videos
whose frame is still a valid frame of the dataset (judged from pixels), the fraction over the last
quarter of the frames and the median time to drift (--on_manifold_tolerance model judges at a
small model's in-window quality instead of the generator's; see evaluation/on_manifold.py), and
action_following on bouncing_balls_actions. Problems end with one sentence and exit code 2.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.evaluation.evaluate import METRICS, evaluate_eval_dir, format_value  # noqa: E402
from improved_diffusion.evaluation.on_manifold import TOLERANCES  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_eval.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_dir", required=True, help="a video_sample.py output folder")
    p.add_argument("--metrics", default="", help=f"comma-separated, from {','.join(METRICS)} (default: all that apply)")
    p.add_argument("--i3d_path", default=None, help="TorchScript I3D (StyleGAN-V's i3d_torchscript.pt), for FVD")
    p.add_argument("--carla_classifier", default=None, help="CARLA cell classifier weights, for WD and PO")
    p.add_argument("--carla_regressor", default=None, help="CARLA coordinate regressor weights, for WD and PO")
    p.add_argument("--max_videos", type=int, default=None, help="only samples of test videos 0..max_videos-1")
    p.add_argument("--data_root", default=None, help="where the datasets are (default: datasets/ of this repo)")
    p.add_argument("--on_manifold_tolerance", default="generator", choices=list(TOLERANCES),
                   help="how close to the generator a frame must be for on_manifold")
    return p


def main(args):
    result = evaluate_eval_dir(args.eval_dir, args.metrics, args.i3d_path, args.max_videos, args.data_root,
                               carla_classifier=args.carla_classifier, carla_regressor=args.carla_regressor,
                               on_manifold_tolerance=args.on_manifold_tolerance)
    for name, value in result["overall"].items():
        print(f"{name}: {format_value(value)}")
    print(f"{result['n_videos']} videos, {result['overall_frames']}; wrote {Path(args.eval_dir) / 'metrics.json'}")


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
