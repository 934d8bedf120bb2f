"""Sample long videos from a checkpoint with a sampling scheme: a frame plan x a noise schedule.

    python scripts/video_sample.py checkpoints/<run>/ema_0.9999_010000.pt --sampling_scheme hierarchy-2 \
        --noise_schedule pyramid --T 64 --stop_index 2
    python scripts/video_sample.py <checkpoint> --sampling_scheme stabilized-autoreg --T 1000   # 10x+ rollouts
    python scripts/video_sample.py df_model.ckpt --df_config df_config.json --sampling_scheme df-pyramid \
        --T 64 --max_frames 16 --n_obs 4   # a Diffusion Forcing checkpoint, with DF's sampler settings

Conditions on the first n_obs frames of test videos and generates the rest stage by stage
(improved_diffusion.sampling.run.sample_dataset). Writes <eval_dir>/sampling_config.json and
<eval_dir>/samples/sample_<index:04d>-<sample_idx>.npy (uint8 T x C x H x W), skipping outputs
that already exist; `mpiexec -n N` splits the videos across ranks. Model calls carry a whole batch;
`--batch_invariant True` calls the model per video instead (slower), so the files are byte-identical
for any batch size and number of ranks. `--precision bf16|fp16` runs the network in 16 bits and
`--compile True` compiles it.

A conditional checkpoint (trained with --cond_dim / --num_classes) is driven by each test video's
own actions by default; `--actions FILE.npy` (T x D values, or T integers taken as one-hot actions;
its first --T rows) drives every video with the same actions instead, `--label L` gives every video
class L, and `--uncond True` samples with the learned null condition. `--guidance_scale w`
(classifier-free guidance; 1 = off) needs a model trained with --cond_drop_prob > 0. These settings
name the results folder (_cfg<w>, _actions-<file>, _uncond, _label<L>) and sampling_config.json.

    python scripts/video_sample.py <checkpoint> --sampling_scheme autoreg --T 32 --n_obs 4 --guidance_scale 3
    python scripts/video_sample.py <checkpoint> --T 32 --n_obs 4 --actions other_video_actions.npy

A checkpoint trained with --energy True predicts the gradient of a per-frame energy; `--mcmc_steps n`
refines its samples with n energy-descent steps of size --mcmc_step_size after every denoising
transition (a step is undone for each frame whose energy it raises), or with Langevin steps and
Metropolis-Hastings acceptance (`--mcmc_noise True`). The acceptance rate is printed and saved in
sampling_config.json ("mcmc"), the folder is named _mcmc<n>x<a>.

    python scripts/video_sample.py <energy checkpoint> --T 32 --n_obs 4 --mcmc_steps 5 --mcmc_step_size 0.01

Impossible settings end with one sentence and exit code 2 before the model is loaded.
"""

import argparse
import sys
from pathlib import Path

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli, dist_util  # noqa: E402
from improved_diffusion.sampling.noise_schedules import noise_schedules  # noqa: E402
from improved_diffusion.sampling.run import add_model_call_flags, mcmc_summary, sample_dataset  # noqa: E402
from improved_diffusion.sampling.scheme import MCMC_CLAMPS, PRESETS, STABILIZATIONS  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_sample.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_path")
    p.add_argument("--sampling_scheme", default="autoreg", choices=list(PRESETS),
                   help="a frame plan, or a preset of plan and noise schedule")
    p.add_argument("--n_obs", type=int, default=36,
                   help="given frames at the start of each video (FDM's default 36; -1: max_frames - max_latent_frames)")
    p.add_argument("--T", type=int, default=-1, help="length of the sampled video (-1: the training T)")
    p.add_argument("--max_frames", type=int, default=-1, help="frames per stage (-1: the training max_frames)")
    p.add_argument("--max_latent_frames", type=int, default=-1, help="new frames per stage (-1: max_frames // 2)")
    p.add_argument("--noise_schedule", default=None, choices=list(noise_schedules),
                   help="within-stage schedule (default: the scheme's, full_sequence for FDM plans)")
    p.add_argument("--uncertainty_scale", type=float, default=None, help="pyramid/trapezoid lag per frame (default 1)")
    p.add_argument("--stabilization_level", type=int, default=None,
                   help="show observed frames at timestep k - 1 of the training chain (0: off; default: the "
                        "scheme's, or the DF config's)")
    p.add_argument("--stabilization", default=None, choices=list(STABILIZATIONS),
                   help="generated: only frames the model generated, with fresh noise (ours); df: every observed "
                        "frame, scaled without noise, with DF's update (default: df for df-* presets and DF "
                        "checkpoints)")
    p.add_argument("--clip_noise", type=float, default=None,
                   help="clamp the sampler's Gaussian noise (and a pred_noise output under df) to +-this "
                        "(0: off; default: the checkpoint's)")
    p.add_argument("--chunk_size", type=int, default=None,
                   help="> 0: sliding window (window = max_frames) generating this many frames per stage")
    p.add_argument("--sampling_steps", type=int, default=None,
                   help="noise levels per stage (0: diffusion steps; default 0, a DF config's sampling_timesteps)")
    p.add_argument("--optimality", default=None, help="optimal schedule file (stage -> observed frames)")
    p.add_argument("--batch_size", type=int, default=8)
    add_model_call_flags(p)
    p.add_argument("--start_index", type=int, default=0)
    p.add_argument("--stop_index", type=int, default=-1, help="-1: every test video")
    p.add_argument("--sample_idx", type=int, default=0, help="which sample of each video (seeds differ)")
    p.add_argument("--timestep_respacing", default="")
    p.add_argument("--use_ddim", type=cli.str2bool, default=None,
                   help="default False; with a DF config, True when sampling_steps < its timesteps")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta (default 0, a DF config's ddim_sampling_eta)")
    p.add_argument("--clip_denoised", type=cli.str2bool, default=None,
                   help="clip x0 predictions to [-1, 1] (default True; False for df-* presets and DF checkpoints)")
    p.add_argument("--df_config", default=None,
                   help="DF's config (JSON) of a Diffusion Forcing checkpoint: its network and sampler settings")
    p.add_argument("--guidance_scale", type=float, default=1.0,
                   help="classifier-free guidance scale w: uncond + w (cond - uncond) on the network's output "
                        "(1: off; needs a model trained with --cond_drop_prob > 0)")
    p.add_argument("--actions", default=None,
                   help="a .npy file of actions driving every video: T x D values or T integers (one-hot), at least "
                        "--T of them (default: each test video's own actions)")
    p.add_argument("--label", type=int, default=None, help="class label of every video (a label-conditioned model)")
    p.add_argument("--uncond", type=cli.str2bool, default=False,
                   help="sample with the model's null condition (needs --cond_drop_prob > 0 in training)")
    p.add_argument("--mcmc_steps", type=int, default=None,
                   help="energy checkpoints (--energy True): MCMC steps on the latent frames after every denoising "
                        "transition (default 0: off)")
    p.add_argument("--mcmc_step_size", type=float, default=None,
                   help="step size a of x <- x - a grad E (in the energy's eps units; default 0.01)")
    p.add_argument("--mcmc_noise", type=cli.str2bool, default=None,
                   help="True: Langevin proposals (noise sqrt(2 a sigma_t)) with Metropolis-Hastings acceptance; "
                        "default False: energy descent, a frame's step undone when it raises its energy")
    p.add_argument("--mcmc_clamp", default=None, choices=list(MCMC_CLAMPS),
                   help="bound on refined values: signal_noise (default) +-(2 sqrt(abar_t) + 6 sigma_t); signal: "
                        "+-2 sqrt(abar_t), the energy trainer's (erases noise at large t); none")
    p.add_argument("--dataset", default=None, help="dataset of the given frames (default: the checkpoint's)")
    p.add_argument("--eval_dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--just_visualise", action="store_true",
                   help="only draw the frame plan as <eval_dir>/plan.png (as video_schedule.py --format png) and exit")
    return p


def main(args):
    path = sample_dataset(**vars(args))
    if dist_util.get_rank() == 0:
        summary = mcmc_summary(path) if args.mcmc_steps and not args.just_visualise else None
        if summary:
            rate = summary["acceptance_rate"]
            print(f"MCMC acceptance rate {'-' if rate is None else f'{rate:.3f}'}: {summary['accepted']} of "
                  f"{summary['proposed']} frame steps accepted over {summary['videos']} videos; "
                  f"{summary['mcmc_nfe_per_video']:g} extra network evaluations per video "
                  f"({summary['gradient_evaluations'] / summary['videos']:g} gradient, "
                  f"{summary['energy_evaluations'] / summary['videos']:g} energy-only)", file=sys.stderr)
        print(path)


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
