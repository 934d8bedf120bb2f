"""Compare sampling schemes on one checkpoint: same test videos, same settings, one report.

    python scripts/compare_schemes.py checkpoints/<run>/ema_0.9999_100000.pt \
        --schemes autoreg,long-range,hierarchy-2,df-pyramid --n_videos 16 --T 64 --out_dir results/compare
    mpiexec -n 4 python scripts/compare_schemes.py <checkpoint> ...   # each rank samples its share

Each scheme samples test videos 0..n_videos-1 with video_sample.py into <out_dir>/<scheme>/ (existing
samples are kept, so an interrupted comparison resumes), is scored as by video_eval.py, and
<out_dir>/report.md and report.html show a table of metrics, wall time and network evaluations per
scheme, metric-vs-frame plots, plan pictures and frame strips. Every scheme gets the same n_obs
(default max_frames - max_latent_frames), so all are conditioned on the same frames.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # video_sample.py

import video_sample  # noqa: E402
from improved_diffusion import dist_util  # noqa: E402
from improved_diffusion.evaluation.evaluate import METRICS, EvalError, parse_metrics  # noqa: E402
from improved_diffusion.evaluation.report import (  # noqa: E402
    DEFAULT_SCHEMES, check_settings_file, evaluate_schemes, load_runs, parse_schemes, sample_schemes, scheme_stages,
    write_report,
)
from improved_diffusion.sampling.plans import PlanError  # noqa: E402
from improved_diffusion.script_util import ArgumentParser, UserError, str2bool  # noqa: E402
from improved_diffusion.data.datasets import DatasetError  # noqa: E402


def create_argparser():
    p = ArgumentParser(prog="compare_schemes.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_path")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES, help="comma-separated sampling scheme names")
    p.add_argument("--n_videos", type=int, default=8, help="test videos 0..n_videos-1 are sampled by every scheme")
    p.add_argument("--T", type=int, default=-1, help="length of the sampled videos (-1: the training T)")
    p.add_argument("--n_obs", type=int, default=-1, help="given frames (-1: max_frames - max_latent_frames)")
    p.add_argument("--max_frames", type=int, default=-1, help="frames per stage (-1: the training max_frames)")
    p.add_argument("--max_latent_frames", type=int, default=-1, help="new frames per stage (-1: each scheme's default)")
    p.add_argument("--timestep_respacing", default="")
    p.add_argument("--use_ddim", type=str2bool, default=False)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default="", help=f"comma-separated, from {','.join(METRICS)} (default: all that apply)")
    p.add_argument("--i3d_path", default=None, help="TorchScript I3D (StyleGAN-V's i3d_torchscript.pt), for FVD")
    p.add_argument("--out_dir", default=None, help="default: results/<run>/<checkpoint>/compare_schemes")
    return p


def main(args):
    had_process_group = dist.is_initialized()
    rank, _ = dist_util.setup_dist()

    # ---- every setting is checked before anything is sampled
    schemes = parse_schemes(args.schemes)
    config = video_sample.read_config(args.checkpoint_path)
    if args.n_videos < 1:
        raise UserError(f"n_videos must be at least 1, got {args.n_videos}.")
    T = args.T if args.T > 0 else int(config.get("T", -1))
    if T <= 0:
        raise UserError("The checkpoint does not record a video length; pass --T.")
    K = args.max_frames if args.max_frames > 0 else int(config.get("max_frames", 20))
    S = args.max_latent_frames if args.max_latent_frames > 0 else None
    n_obs = args.n_obs if args.n_obs >= 0 else K - (S or K // 2)
    for scheme in schemes:
        try:
            scheme_stages(scheme, T, n_obs, K, S)
        except PlanError as e:
            raise UserError(f"Scheme {scheme}: {e}") from None
    metrics = parse_metrics(args.metrics, config.get("dataset"), have_i3d=bool(args.i3d_path))
    if "fvd" in metrics and args.n_videos < 2:
        raise UserError(f"FVD needs at least 2 videos; pass --n_videos 2 or more (got {args.n_videos}).")
    out_dir = args.out_dir or video_sample.default_eval_dir(args, config, "compare_schemes")
    settings = dict(checkpoint=os.path.abspath(args.checkpoint_path), T=T, n_obs=n_obs, max_frames=K,
                    max_latent_frames=S, timestep_respacing=args.timestep_respacing, use_ddim=args.use_ddim,
                    seed=args.seed)
    check_settings_file(out_dir, settings, write=rank == 0)

    # ---- sample every scheme (each rank its share of the videos)
    def sample(scheme, eval_dir):
        argv = [args.checkpoint_path, "--sampling_scheme", scheme, "--eval_dir", eval_dir,
                "--stop_index", args.n_videos, "--T", T, "--n_obs", n_obs, "--max_frames", K,
                "--timestep_respacing", args.timestep_respacing, "--use_ddim", args.use_ddim,
                "--batch_size", args.batch_size, "--seed", args.seed]
        if S is not None:
            argv += ["--max_latent_frames", S]
        video_sample.main(video_sample.create_argparser().parse_args([str(a) for a in argv]))

    sample_schemes(schemes, sample, out_dir, args.n_videos)

    # ---- score and report (rank 0)
    if rank == 0:
        results = evaluate_schemes(schemes, out_dir, metrics, args.i3d_path, args.n_videos)
        md_path, html_path = write_report(out_dir, schemes, results, load_runs(out_dir), settings)
        print(md_path)
        print(html_path)
    if dist.is_initialized() and not had_process_group:  # gloo may abort at exit if its group is left open
        dist_util.barrier()
        dist.destroy_process_group()


def cli(argv=None):
    """Run main; a problem the user can fix ends with one line on stderr and exit code 2."""
    args = create_argparser().parse_args(argv)
    try:
        main(args)
    except (UserError, DatasetError, PlanError, EvalError) as e:
        print(f"compare_schemes.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        code = cli()
    except Exception:  # noqa: BLE001 - under MPI one failed rank must take the others down
        traceback.print_exc()
        code = 1
    if code:
        dist_util.exit_all(code)  # under MPI, takes the other ranks down too
    sys.exit(0)
