"""Turn sampled videos into mp4 and gif files, side by side with the ground truth.

    python scripts/video_make_mp4.py --eval_dir results/<run>/<checkpoint>/<scheme>

Observed frames have a blue border, generated frames a red one; the right-hand panel is
the ground-truth test video (where it is that long), the same video video_eval.py compares
with. Files go to <eval_dir>/videos/<sample name>.{mp4,gif}, one per sample (FDM's flags --do_n,
--n_seeds, --obs_length, --format and --add_gt work; FDM wrote one grid file instead). Without the
dataset, pass --no_ground_truth.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.evaluation.video_files import write_videos  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_make_mp4.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_dir", required=True, help="a video_sample.py output folder")
    p.add_argument("--out_dir", default=None, help="where the videos go (default: <eval_dir>/videos)")
    p.add_argument("--fps", type=float, default=8, help="frames per second")
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling factor")
    p.add_argument("--max_videos", "--do_n", type=int, default=None,
                   help="only the samples of test videos 0..max_videos-1 (FDM: --do_n)")
    p.add_argument("--n_seeds", type=int, default=None, help="only sample_idx 0..n_seeds-1 of each video (default: all)")
    p.add_argument("--obs_length", type=int, default=0, help="frames to mark as given (0: the run's n_obs)")
    p.add_argument("--format", default="mp4,gif", help="mp4, gif or mp4,gif")
    p.add_argument("--no_ground_truth", action="store_true", help="show the samples alone")
    p.add_argument("--add_gt", type=cli.str2bool, default=True, help="FDM's spelling: False = --no_ground_truth")
    p.add_argument("--data_root", default=None, help="where the datasets are (default: datasets/ of this repo)")
    return p


def main(args):
    write_videos(args.eval_dir, args.out_dir, args.fps, args.scale, args.max_videos,
                 ground_truth=args.add_gt and not args.no_ground_truth, data_root=args.data_root,
                 n_seeds=args.n_seeds, obs_length=args.obs_length, formats=args.format.split(","))


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
