"""Train a flexible video diffusion model, data-parallel under MPI.

    mpiexec -n 4 python scripts/video_train.py --dataset bouncing_balls --max_frames 8 ...
    mpiexec -n 4 python scripts/video_train.py --wandb_id <run id>     # resume that run
    python scripts/video_train.py --resume_checkpoint <model file> ...  # a new run from these weights

Each of the N processes trains on --batch_size videos of its own shard of the data, so
the effective batch is batch_size x N. Checkpoints go to <checkpoint_dir>/<run id>/
(local or gs:// / az://). --wandb_id (alias --resume_id) continues a run from its newest
complete checkpoint, with its saved configuration: only the housekeeping flags in
HOUSEKEEPING can be changed, so the continued run is the run that was interrupted. A
--wandb_id with nothing saved under it starts a new run with that id.
SIGTERM or SIGUSR1 (Slurm's warning before pre-emption) saves the current step and exits
with 128 + the signal number. The environment variable DIST_TIMEOUT_S bounds how long
ranks wait for a dead one.

The flags and their defaults are FDM's (scripts/video_train.py), so an FDM command trains
the same model; --dataset is required, as it is there. Ours come after them.

Diffusion Forcing's video recipe (its configurations/algorithm/df_video.yaml with
experiment/exp_video.yaml) is, for 64-pixel clips of 16 frames:

    python scripts/video_train.py --dataset <dataset> --T 16 --max_frames 16 \
        --noise_mode diffusion_forcing --architecture df_unet3d --causal True --image_size 64 \
        --network_size 64 --dim_mults 1,2,4,8 --attn_resolutions 16,32,64,128 --attn_heads 4 \
        --attn_dim_head 64 --use_linear_attn True --use_init_temporal_attn True --time_emb_type rotary \
        --diffusion_steps 1000 --noise_schedule sigmoid --predict_v True \
        --loss_weighting fused_snr --snr_clip 5 --cum_snr_decay 0.96 --clip_noise 6 \
        --lr 8e-5 --weight_decay 2e-3 --adam_betas 0.9,0.99 --warmup_steps 10000 --grad_clip 1.0 \
        --batch_size 8 --max_steps 200000

DF decays the running SNR per frame of the original video: on a dataset subsampled every
s frames it uses 0.96**s (DMLab and Minecraft: s = 2, --cum_snr_decay 0.9216).

Conditioning on actions (datasets with actions: bouncing_balls_actions, dmlab, minecraft, folders with
<name>.actions.npy files): --cond_dim -1 conditions every frame on the dataset's action of that frame
(--cond_dim D checks that D is their width; the default 0 trains an unconditional model, with a
note when the dataset has actions). --cond_drop_prob p replaces a video's conditions by learned null
ones with probability p, which classifier-free guidance (video_sample.py --guidance_scale) needs.
--num_classes / --class_cond True condition on class labels, which no dataset delivers yet (they
are refused here; the model and TrainLoop take labels from Python). --frame_skip k keeps every k-th
frame of dmlab / minecraft episodes, as Diffusion Forcing does. For example:

    python scripts/video_train.py --dataset bouncing_balls_actions --image_size 16 --max_frames 8 \
        --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 --attention_resolutions 8 --predict_v True \
        --noise_schedule cosine --T 8 --pad_with_random_frames False --batch_size 8 --lr 1e-3 \
        --ema_rate 0.995 --noise_mode mixed --cond_dim -1 --cond_drop_prob 0.1 --max_steps 2700

Measuring a run while it trains (on the EMA model, without changing what is trained): --val_interval N
logs val_loss (and val_loss_q0..q3 per quarter of the timestep range), the diffusion loss on --val_videos
fixed test clips with fixed masks, timesteps and noise, comparable across steps, resumes and rank
counts; --eval_interval N samples --eval_videos test videos with --eval_scheme (DDIM, --eval_respacing,
--eval_T frames) and logs eval_psnr, eval_ssim, the dataset's own metrics and, with --eval_i3d_path,
eval_fvd, with the samples in
<run dir>/evals/step<N>/ (rank 0 samples while the other ranks wait, so keep it small); --keep_best
val_loss (or eval_psnr, ...) keeps the best EMA weights as <run dir>/best_<figure>.pt. Every log line
also reports data_wait (seconds per step spent waiting for data), grad_norm, peak_mem_mb and
nonfinite_skipped. For example:

    python scripts/video_train.py --dataset bouncing_balls --max_frames 8 --T 16 --val_interval 500 \
        --val_videos 16 --eval_interval 5000 --eval_videos 8 --keep_best val_loss

--precision bf16 (or fp16, with dynamic loss scaling; FDM's --use_fp16 True means fp16) runs the
network's forward in 16 bits under autocast; weights, optimizer state, EMAs and checkpoints stay
float32. --compile True trains through torch.compile (the first steps take minutes to compile).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import cli  # noqa: E402
from improved_diffusion.diffusion import DiffusionConfig  # noqa: E402
from improved_diffusion.diffusion.build import NOISE_SCHEDULES  # noqa: E402
from improved_diffusion.diffusion.loss_weights import LOSS_WEIGHTINGS  # noqa: E402
from improved_diffusion.models import ModelConfig  # noqa: E402
from improved_diffusion.precision import PRECISIONS  # noqa: E402
from improved_diffusion.training.config import ON_BAD_VIDEO, TrainConfig  # noqa: E402
from improved_diffusion.training.frame_masks import NOISE_MODES  # noqa: E402
from improved_diffusion.training.launch import train  # noqa: E402
from improved_diffusion.training.timestep_sampler import SCHEDULE_SAMPLERS  # noqa: E402


def create_argparser():
    parser = cli.ArgumentParser(prog="video_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_dataclass_args(parser, TrainConfig, choices={"noise_mode": NOISE_MODES, "on_bad_video": ON_BAD_VIDEO,
                                                         "schedule_sampler": SCHEDULE_SAMPLERS,
                                                         "precision": PRECISIONS})
    cli.add_dataclass_args(parser, ModelConfig, overrides={"image_size": -1})  # -1: the dataset's size
    cli.add_dataclass_args(parser, DiffusionConfig, choices={"noise_schedule": NOISE_SCHEDULES,
                                                             "loss_weighting": LOSS_WEIGHTINGS})
    parser.add_argument("--unobserve", action="store_true",
                        help="FDM's flag: keep wandb offline (WANDB_DIR_DRYRUN, when set, is where it writes)")
    return parser


def main(args):
    train(args, default_of=create_argparser().get_default)


if __name__ == "__main__":
    sys.exit(cli.run(main, create_argparser()))
