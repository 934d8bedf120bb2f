"""Fréchet Video Distance of a results folder against the test videos (FDM's command).

    python scripts/video_fvd.py --eval_dir results/<run>/<checkpoint>/<scheme> --i3d_path i3d_torchscript.pt

Compares sample <sample_idx> of test videos 0..num_videos-1 with those test videos (the first T
frames), prints the FVD and saves it as <eval_dir>/fvd-<videos>-<sample_idx>.txt, as FDM did.
FDM's TensorFlow I3D is replaced by StyleGAN-V's TorchScript port (i3d_torchscript.pt); see
evaluation/metrics.py. video_eval.py --metrics fvd computes the same number with the other metrics.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.evaluation.evaluate import fvd_of_eval_dir  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_fvd.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_dir", required=True, help="a video_sample.py output folder")
    p.add_argument("--i3d_path", required=True, help="TorchScript I3D (StyleGAN-V's i3d_torchscript.pt)")
    p.add_argument("--num_videos", type=int, default=None, help="test videos 0..num_videos-1 (default: all sampled)")
    p.add_argument("--sample_idx", type=int, default=0, help="which sample of each test video")
    p.add_argument("--batch_size", type=int, default=8, help="videos per I3D forward pass")
    p.add_argument("--data_root", default=None, help="where the datasets are (default: datasets/ of this repo)")
    return p


def main(args):
    value, path = fvd_of_eval_dir(args.eval_dir, args.i3d_path, args.num_videos, args.sample_idx, args.batch_size,
                                  args.data_root)
    print(f"FVD: {value:.4g} (saved to {path})")


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
