"""Sample long videos from a checkpoint with a sampling scheme: a frame plan x a noise schedule.

    python scripts/video_sample.py checkpoints/<run>/ema_0.9999_010000.pt --sampling_scheme hierarchy-2 \
        --scheduling_matrix pyramid --T 64 --stop_index 2
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
from improved_diffusion.sampling.request import SchemeRequest, add_request_flags  # noqa: E402
from improved_diffusion.sampling.run import SampleOptions, mcmc_summary, sample_dataset  # noqa: E402


def create_argparser():
    p = cli.ArgumentParser(prog="video_sample.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_path")
    add_request_flags(p, overrides={"n_obs": 36})  # FDM's default number of given frames
    cli.add_dataclass_args(p, SampleOptions)
    return p


def main(args):
    path = sample_dataset(args.checkpoint_path, SchemeRequest.from_args(args),
                          cli.dataclass_from_dict(SampleOptions, vars(args)))
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
