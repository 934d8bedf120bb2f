"""Sample long videos from a checkpoint with a sampling scheme: a frame plan x a noise schedule.

    python scripts/video_sample.py checkpoints/<run>/ema_0.9999_010000.pt --sampling_scheme hierarchy-2 \
        --noise_schedule pyramid --T 64 --stop_index 2
    python scripts/video_sample.py <checkpoint> --sampling_scheme stabilized-autoreg --T 1000   # 10x+ rollouts

Conditions on the first n_obs frames of test videos and generates the rest stage by stage.
Writes <eval_dir>/samples/sample_<index:04d>-<sample_idx>.npy (uint8 T x C x H x W) and
skips outputs that already exist. A video's sample depends only on (seed, sample_idx, video
index), so under `mpiexec -n N` (videos split across ranks) or with another batch size the
files are the same. Impossible settings end with one sentence and exit code 2 before the
model is loaded.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

# Lets the script run from a checkout that was not pip-installed; an installed package is the same code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improved_diffusion import dist_util  # noqa: E402
from improved_diffusion.sampling.noise_schedules import noise_schedules  # noqa: E402
from improved_diffusion.sampling.plan_picture import draw_plan  # noqa: E402
from improved_diffusion.sampling.plans import (  # noqa: E402
    ADAPTIVE_PLANS, PlanError, plan_stages, presets, resolve_scheme, sampling_schemes, validate_plan_args,
)
from improved_diffusion.script_util import (  # noqa: E402
    ArgumentParser, DiffusionConfig, UserError, create_diffusion, dataclass_from_dict, load_checkpoint,
    read_model_checkpoint, str2bool,
)
from improved_diffusion.data.datasets import DatasetError, get_dataset  # noqa: E402
from improved_diffusion.sampling.sampler import (  # noqa: E402
    StageSettings, check_settings, one_video_at_a_time, sample_video, video_generator,
)


def create_argparser():
    p = ArgumentParser(prog="video_sample.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_path")
    p.add_argument("--sampling_scheme", default="autoreg", choices=list(presets),
                   help="a frame plan, or a preset of plan and noise schedule")
    p.add_argument("--n_obs", type=int, default=-1, help="given frames (-1: max_frames - max_latent_frames)")
    p.add_argument("--T", type=int, default=-1, help="length of the sampled video (-1: the training T)")
    p.add_argument("--max_frames", type=int, default=-1, help="frames per stage (-1: the training max_frames)")
    p.add_argument("--max_latent_frames", type=int, default=-1, help="new frames per stage (-1: max_frames // 2)")
    p.add_argument("--noise_schedule", default=None, choices=list(noise_schedules),
                   help="within-stage schedule (default: the scheme's, full_sequence for FDM plans)")
    p.add_argument("--uncertainty_scale", type=float, default=None, help="pyramid/trapezoid lag per frame (default 1)")
    p.add_argument("--stabilization_level", type=int, default=None,
                   help="show generated observed frames at timestep k - 1 of the training chain (0: off)")
    p.add_argument("--chunk_size", type=int, default=None,
                   help="> 0: sliding window (window = max_frames) generating this many frames per stage")
    p.add_argument("--sampling_steps", type=int, default=0, help="noise levels per stage (0: diffusion steps)")
    p.add_argument("--optimality", default=None, help="optimal schedule file (stage -> observed frames)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batch_invariant", type=str2bool, default=True,
                   help="call the model per video so samples are bit-identical for any batch size or rank count; "
                        "False batches model calls (faster on GPUs, results differ in the last bits)")
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
    p.add_argument("--just_visualise", action="store_true",
                   help="only draw the frame plan as <eval_dir>/plan.png (as video_schedule.py --format png) and exit")
    return p


def read_config(path):
    """The flat config of a model checkpoint, without building the model."""
    return dict(read_model_checkpoint(path)["config"])


def default_eval_dir(args, config, settings_name):
    run = config.get("wandb_id") or config.get("resume_id") or "run"
    ckpt = os.path.splitext(os.path.basename(args.checkpoint_path))[0]
    return os.path.join("results", str(run), ckpt, settings_name)


def main(args):
    rank, world_size = dist_util.setup_dist()

    # ---- every setting is checked before the model is loaded
    checkpoint = read_model_checkpoint(args.checkpoint_path)  # read once: config now, weights later
    ckpt_config = dict(checkpoint["config"])
    K = args.max_frames if args.max_frames > 0 else int(ckpt_config.get("max_frames", 20))
    S = args.max_latent_frames if args.max_latent_frames > 0 else None
    T = args.T if args.T > 0 else int(ckpt_config.get("T", -1))
    if T <= 0:
        raise UserError("The checkpoint does not record a video length; pass --T.")
    if args.batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {args.batch_size}.")
    scheme = resolve_scheme(args.sampling_scheme, K, S, noise_schedule=args.noise_schedule,
                            uncertainty_scale=args.uncertainty_scale, stabilization_level=args.stabilization_level,
                            chunk_size=args.chunk_size)
    step = scheme["step_size"]
    n_obs = args.n_obs if args.n_obs >= 0 else K - step
    validate_plan_args(scheme["plan"], T, n_obs, K, step, args.optimality)
    # Run the plan once without a model, as some plans fail only part-way through. Adaptive plans
    # generate the same frames as their non-adaptive counterparts, so they fail in the same places.
    stages = plan_stages(scheme["plan"].replace("adaptive-", ""), T, n_obs, K, step, args.optimality)
    settings = StageSettings(noise_schedule=scheme["noise_schedule"], uncertainty_scale=scheme["uncertainty_scale"],
                             sampling_steps=args.sampling_steps, stabilization_level=scheme["stabilization_level"],
                             use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised)
    check_settings(settings, create_diffusion(dataclass_from_dict(DiffusionConfig, ckpt_config),
                                              args.timestep_respacing))

    name = f"{args.sampling_scheme}_K{K}_S{step}_obs{n_obs}_T{T}"
    if scheme["noise_schedule"] != "full_sequence" or args.noise_schedule:
        name += f"_{scheme['noise_schedule']}{scheme['uncertainty_scale']:g}"
    if scheme["stabilization_level"]:
        name += f"_stab{scheme['stabilization_level']}"
    if args.sampling_steps:
        name += f"_steps{args.sampling_steps}"
    if args.use_ddim:
        name += "_ddim" if args.eta == 0 else f"_ddim{args.eta:g}"
    if args.timestep_respacing:
        name += f"_{args.timestep_respacing}"
    eval_dir = args.eval_dir or default_eval_dir(args, ckpt_config, name)

    if args.just_visualise:
        if scheme["plan"] in ADAPTIVE_PLANS:
            raise UserError(f"{scheme['plan']} chooses its observed frames from the videos, so its plan cannot be "
                            "drawn without sampling; draw its non-adaptive counterpart instead.")
        os.makedirs(eval_dir, exist_ok=True)
        path = os.path.join(eval_dir, "plan.png")
        draw_plan(stages, T, path)
        print(path)
        return

    # ---- model, data, and this rank's videos
    device = torch.device(args.device) if args.device else dist_util.dev()
    model, diffusion, config = load_checkpoint(args.checkpoint_path, args.timestep_respacing, device=device,
                                               data=checkpoint)
    if args.batch_invariant:
        model = one_video_at_a_time(model)
    dataset_name = args.dataset or config.get("dataset") or "bouncing_balls"
    image_size = int(config["image_size"])
    data = get_dataset(dataset_name, split="test", T=max(n_obs, 1), image_size=image_size)
    stop = len(data) if args.stop_index < 0 else min(args.stop_index, len(data))
    indices = list(range(args.start_index, stop))
    slurm_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if slurm_task is not None and args.stop_index < 0:  # FDM: without --stop_index, one array task per batch
        indices = indices[int(slurm_task) * args.batch_size: (int(slurm_task) + 1) * args.batch_size]
    indices = indices[rank::world_size]  # under mpiexec each rank samples (and writes) its share

    sample_dir = os.path.join(eval_dir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(eval_dir, "sampling_config.json"), "w") as f:
            json.dump({"checkpoint": args.checkpoint_path, "dataset": dataset_name, "T": T, "n_obs": n_obs,
                       "max_frames": K, "image_size": image_size, "sampling_scheme": args.sampling_scheme,
                       "timestep_respacing": args.timestep_respacing, "seed": args.seed, "data_seed": 0, **scheme,
                       "settings": vars(settings)}, f, indent=2)

    def out_path(i):
        return os.path.join(sample_dir, f"sample_{i:04d}-{args.sample_idx}.npy")

    # ---- sample, one batch at a time; each video draws its noise from its own generator
    todo = [i for i in indices if not os.path.exists(out_path(i))]
    print(f"rank {rank}: {len(todo)} of {len(indices)} videos to sample into {sample_dir}", file=sys.stderr)
    for start in range(0, len(todo), args.batch_size):
        batch_idx = todo[start: start + args.batch_size]
        videos = torch.zeros(len(batch_idx), T, 3, image_size, image_size)
        for j, i in enumerate(batch_idx):
            videos[j, :n_obs] = data.video(i)[:n_obs]
        plan = sampling_schemes[scheme["plan"]](video_length=T, num_obs=n_obs, max_frames=K, step_size=step,
                                                optimal_schedule_path=args.optimality)
        generators = [video_generator(args.seed, args.sample_idx, i) for i in batch_idx]
        out = sample_video(model, diffusion, videos.to(device), n_obs, plan, settings, generators=generators,
                           progress=rank == 0)
        frames = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        for j, i in enumerate(batch_idx):
            tmp = out_path(i) + ".tmp.npy"
            np.save(tmp, frames[j])
            os.replace(tmp, out_path(i))
    if rank == 0:
        print(eval_dir)


def cli(argv=None):
    """Run main; a problem the user can fix ends with one line on stderr and exit code 2."""
    args = create_argparser().parse_args(argv)
    try:
        main(args)
    except (UserError, DatasetError, PlanError) as e:
        print(f"video_sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
