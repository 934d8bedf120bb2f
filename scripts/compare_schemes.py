"""Compare sampling schemes on one checkpoint: same test videos, same settings, one report.

    python scripts/compare_schemes.py checkpoints/<run>/ema_0.9999_100000.pt \\
        --schemes autoreg,long-range,hierarchy-2,df-pyramid --n_videos 16 --T 64 --out_dir results/compare
    mpiexec -n 4 python scripts/compare_schemes.py <checkpoint> ...   # each rank samples its share

Each scheme samples test videos 0..n_videos-1 into <out_dir>/<scheme>/ (existing samples are kept, so
an interrupted comparison resumes), is scored as by video_eval.py, and <out_dir>/report.md and
report.html show a table of metrics, wall time and network evaluations per scheme, metric-vs-frame
plots (on bouncing_balls and cue_recall also the on-manifold curve, with the last-quarter on-manifold
fraction and the median time to drift in the table), plan pictures and frame strips (improved_diffusion.evaluation.compare.compare_schemes). Every
scheme gets the same n_obs (default max_frames - max_latent_frames), so all are conditioned on the
same frames. --precision, --compile, --batch_invariant, --kv_cache, --actions and --uncond are
video_sample.py's, and so is every stage setting (--guidance_scale, --stabilization_level,
--scheduling_matrix, --use_ddim, ...): given here, it is every scheme's. A scheme may carry its own
settings on top, so one report can hold a scheme at several of them:

    python scripts/compare_schemes.py <checkpoint> --T 80 \
        --schemes autoreg,stabilized-autoreg:stabilization_level=15,stabilized-autoreg:stabilization_level=50

An energy checkpoint (--energy True) can be compared with and without MCMC refinement
(`autoreg,autoreg:mcmc_steps=5:mcmc_step_size=0.005`). NFE / video counts every forward pass of the
network: each denoising call, each MCMC gradient evaluation and each energy-only evaluation; the
report then adds the evaluations that also ran a backward pass (grad evals / video) and the MCMC
acceptance rate. Run it once per checkpoint to compare an energy model with a standard one at equal
NFE or wall time.

One run says little about whether a scheme's lead is real: give several checkpoints (e.g. one per
training seed) and/or several sampling seeds, and every (checkpoint, seed) pair is one run:

    python scripts/compare_schemes.py ckpt_seed0.pt ckpt_seed1.pt ckpt_seed2.pt --seeds 0,1 \\
        --schemes autoreg,hierarchy-2 --out_dir results/spread

Run r (checkpoint r // number of seeds, seed r % number of seeds) is a whole comparison in
<out_dir>/run<r>/ (resumed on its own); <out_dir>/report.md and report.html show every metric as
mean ± standard error across runs (sample standard deviation / sqrt(runs)) and which differences of
the first metric exceed 2 combined standard errors; report.json holds those numbers and runs.json every
run's checkpoint, seed, metrics and costs. A run with missing samples is refused, not averaged. With
one checkpoint and one seed the output is the single-run comparison above.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.errors import ConfigError  # noqa: E402
from improved_diffusion.evaluation.compare import DEFAULT_SCHEMES, compare_runs, parse_seeds  # noqa: E402
from improved_diffusion.evaluation.evaluate import METRICS  # noqa: E402
from improved_diffusion.evaluation.on_manifold import TOLERANCES  # noqa: E402
from improved_diffusion.sampling.request import SPEC_SETTINGS, SchemeRequest, add_request_flags  # noqa: E402
from improved_diffusion.sampling.run import MODEL_CALL, SampleOptions  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="compare_schemes.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_paths", nargs="+", metavar="checkpoint_path",
                   help="one checkpoint, or several (e.g. one per training seed) to report mean ± SE across runs")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES,
                   help="comma-separated sampling schemes, each a name with optional :setting=value overrides "
                        f"({', '.join(SPEC_SETTINGS)})")
    p.add_argument("--n_videos", type=int, default=8, help="test videos 0..n_videos-1 are sampled by every scheme")
    # what every scheme shares; the stage-setting flags set every scheme's value (a spec may override it)
    add_request_flags(p, only=("T", "n_obs", "max_frames", "max_latent_frames", "timestep_respacing"))
    cli.add_dataclass_args(p, SampleOptions, only=("batch_size", "df_config", *MODEL_CALL, "actions", "uncond"))
    p.add_argument("--seed", type=int, default=None, help="the sampling seed (default 0)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated sampling seeds, e.g. 0,1: one run per checkpoint and seed (instead of --seed)")
    p.add_argument("--metrics", default="", help=f"comma-separated, from {','.join(METRICS)} (default: all that apply)")
    p.add_argument("--on_manifold_tolerance", default="generator", choices=list(TOLERANCES),
                   help="how close to the generator a frame must be for on_manifold (see video_eval.py)")
    p.add_argument("--i3d_path", default=None, help="TorchScript I3D (StyleGAN-V's i3d_torchscript.pt), for FVD")
    p.add_argument("--out_dir", default=None,
                   help="default: results/<run>/<checkpoint>/compare_schemes (needed with several runs)")
    return p


def main(args):
    if args.seed is not None and args.seeds is not None:
        raise ConfigError("Give --seed or --seeds, not both.")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [0 if args.seed is None else args.seed]
    paths = compare_runs(args.checkpoint_paths, seeds, args.schemes, request=SchemeRequest.from_args(args),
                         options=cli.dataclass_from_dict(SampleOptions, vars(args)), n_videos=args.n_videos,
                         metrics=args.metrics, i3d_path=args.i3d_path, out_dir=args.out_dir,
                         on_manifold_tolerance=args.on_manifold_tolerance)
    if paths is not None:  # rank 0
        print("\n".join(paths))


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
