"""Sample long videos from a checkpoint with a named sampling scheme.

    python scripts/video_sample.py checkpoints/<run>/ema_0.9999_010000.pt --sampling_scheme autoreg \
        --n_obs 4 --T 64 --stop_index 2

Conditions on the first n_obs frames of test videos and generates the rest stage by stage.
Writes <eval_dir>/samples/sample_<index:04d>-<sample_idx>.npy (uint8 T x C x H x W) and
skips outputs that already exist. Under `mpiexec -n N` the videos are split across ranks.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from improved_diffusion import dist_util
from improved_diffusion.sampling_schemes import PlanError, presets, resolve_scheme, sampling_schemes, validate_plan_args
from improved_diffusion.script_util import UserError, load_checkpoint, str2bool
from improved_diffusion.video_datasets import DatasetError, get_dataset
from improved_diffusion.video_sampler import StageSettings, sample_video


def create_argparser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_path")
    p.add_argument("--sampling_scheme", default="autoreg", help=f"one of: {', '.join(presets)}")
    p.add_argument("--n_obs", type=int, default=-1, help="given frames (-1: max_frames - max_latent_frames)")
    p.add_argument("--T", type=int, default=-1, help="length of the sampled video (-1: the training T)")
    p.add_argument("--max_frames", type=int, default=-1, help="frames per stage (-1: the training max_frames)")
    p.add_argument("--max_latent_frames", type=int, default=-1, help="new frames per stage (-1: max_frames // 2)")
    p.add_argument("--noise_schedule", default=None, help="within-stage schedule (default: the scheme's)")
    p.add_argument("--uncertainty_scale", type=float, default=None)
    p.add_argument("--stabilization_level", type=int, default=None)
    p.add_argument("--chunk_size", type=int, default=None)
    p.add_argument("--sampling_steps", type=int, default=0, help="noise levels per stage (0: diffusion steps)")
    p.add_argument("--optimality", default=None, help="optimal schedule file for the 'optimal' scheme")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--start_index", type=int, default=0)
    p.add_argument("--stop_index", type=int, default=-1, help="-1: every test video")
    p.add_argument("--sample_idx", type=int, default=0, help="which sample of each video (seeds differ)")
    p.add_argument("--timestep_respacing", default="")
    p.add_argument("--use_ddim", type=str2bool, default=False)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--clip_denoised", type=str2bool, default=True)
    p.add_argument("--dataset", default=None, help="dataset of the given frames (default: the checkpoint's)")
    p.add_argument("--eval_dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--just_visualise", action="store_true", help="only draw the plan as PNG and exit")
    return p


def default_eval_dir(args, config, settings_name):
    run = config.get("wandb_id") or config.get("resume_id") or "run"
    ckpt = os.path.splitext(os.path.basename(args.checkpoint_path))[0]
    return os.path.join("results", str(run), ckpt, settings_name)


def main(args):
    rank, world_size = dist_util.setup_dist()
    # Plan parameters are checked before any model is loaded.
    ckpt_config = _peek_config(args.checkpoint_path)
    K = args.max_frames if args.max_frames > 0 else int(ckpt_config.get("max_frames", 20))
    S = args.max_latent_frames if args.max_latent_frames > 0 else None
    T = args.T if args.T > 0 else int(ckpt_config.get("T", -1))
    if T <= 0:
        raise UserError("The checkpoint does not record a video length; pass --T.")
    scheme = resolve_scheme(args.sampling_scheme, K, S, noise_schedule=args.noise_schedule,
                            uncertainty_scale=args.uncertainty_scale, stabilization_level=args.stabilization_level,
                            chunk_size=args.chunk_size)
    step = scheme["step_size"]
    n_obs = args.n_obs if args.n_obs >= 0 else K - step
    validate_plan_args(scheme["plan"], T, n_obs, K, step, args.optimality)
    name = f"{args.sampling_scheme}_K{K}_S{step}_obs{n_obs}_T{T}"
    if scheme["noise_schedule"] != "full_sequence" or args.noise_schedule:
        name += f"_{scheme['noise_schedule']}{scheme['uncertainty_scale']:g}"
    if scheme["stabilization_level"]:
        name += f"_stab{scheme['stabilization_level']}"
    if args.use_ddim:
        name += "_ddim"
    if args.timestep_respacing:
        name += f"_{args.timestep_respacing}"
    eval_dir = args.eval_dir or default_eval_dir(args, ckpt_config, name)

    def new_plan():
        return sampling_schemes[scheme["plan"]](video_length=T, num_obs=n_obs, max_frames=K, step_size=step,
                                                optimal_schedule_path=args.optimality)

    if args.just_visualise:
        from improved_diffusion.plan_picture import draw_plan

        os.makedirs(eval_dir, exist_ok=True)
        path = os.path.join(eval_dir, "plan.png")
        draw_plan(list(new_plan()), T, path)
        print(path)
        return

    device = torch.device(args.device) if args.device else dist_util.dev()
    model, diffusion, config = load_checkpoint(args.checkpoint_path, args.timestep_respacing, device=device)
    dataset_name = args.dataset or config.get("dataset") or "bouncing_balls"
    image_size = int(config["image_size"])
    data = get_dataset(dataset_name, split="test", T=max(n_obs, 1), image_size=image_size, seed=int(config.get("seed", 0)))
    stop = len(data) if args.stop_index < 0 else min(args.stop_index, len(data))
    indices = list(range(args.start_index, stop))
    slurm_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if slurm_task is not None:  # FDM: one array task per batch of videos
        indices = indices[int(slurm_task) * args.batch_size: (int(slurm_task) + 1) * args.batch_size]
    indices = indices[rank::world_size]

    sample_dir = os.path.join(eval_dir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    settings = StageSettings(noise_schedule=scheme["noise_schedule"], uncertainty_scale=scheme["uncertainty_scale"],
                             sampling_steps=args.sampling_steps, stabilization_level=scheme["stabilization_level"],
                             use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised)
    if rank == 0:
        with open(os.path.join(eval_dir, "sampling_config.json"), "w") as f:
            json.dump({"checkpoint": args.checkpoint_path, "dataset": dataset_name, "T": T, "n_obs": n_obs,
                       "max_frames": K, "image_size": image_size, "sampling_scheme": args.sampling_scheme,
                       "timestep_respacing": args.timestep_respacing, **scheme,
                       "settings": vars(settings)}, f, indent=2)

    def out_path(i):
        return os.path.join(sample_dir, f"sample_{i:04d}-{args.sample_idx}.npy")

    todo = [i for i in indices if not os.path.exists(out_path(i))]
    print(f"rank {rank}: {len(todo)} of {len(indices)} videos to sample into {sample_dir}", file=sys.stderr)
    for start in range(0, len(todo), args.batch_size):
        batch_idx = todo[start: start + args.batch_size]
        C = 3
        videos = torch.zeros(len(batch_idx), T, C, image_size, image_size)
        for j, i in enumerate(batch_idx):
            videos[j, :n_obs] = data.video(i)[:n_obs]
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + args.sample_idx * 10_007 + batch_idx[0])
        plan = new_plan()
        out = sample_video(model, diffusion, videos.to(device), n_obs, plan, settings, generator=generator,
                           progress=rank == 0)
        frames = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        for j, i in enumerate(batch_idx):
            tmp = out_path(i) + ".tmp.npy"
            np.save(tmp, frames[j])
            os.replace(tmp, out_path(i))
    if rank == 0:
        print(eval_dir)


def _peek_config(path):
    from improved_diffusion.script_util import read_checkpoint_file

    data = read_checkpoint_file(path)
    if not isinstance(data, dict) or "config" not in data or "state_dict" not in data:
        raise UserError(f"'{path}' is not a model checkpoint: it has no 'config' and 'state_dict'.")
    return data["config"]


if __name__ == "__main__":
    try:
        main(create_argparser().parse_args())
    except (UserError, DatasetError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
