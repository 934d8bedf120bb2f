"""Train a flexible video diffusion model, data-parallel under MPI.

    mpiexec -n 4 python scripts/video_train.py --dataset bouncing_balls --max_frames 8 ...
    python scripts/video_train.py --wandb_id <run id>      # resume that run
"""

import argparse
import dataclasses
import os
import sys

import torch

from improved_diffusion import checkpoint_io, dist_util
from improved_diffusion.logger import Logger, new_run_id
from improved_diffusion.script_util import (
    DiffusionConfig,
    ModelConfig,
    UserError,
    add_dataclass_args,
    create_diffusion,
    create_model,
    dataclass_from_dict,
    parse_channel_mult,
    read_checkpoint_file,
)
from improved_diffusion.train_util import TrainConfig, TrainLoop
from improved_diffusion.video_datasets import DatasetError, default_image_size, default_T, get_dataset, train_batches


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, ModelConfig, overrides={"image_size": -1})  # -1: the dataset's size
    add_dataclass_args(parser, DiffusionConfig)
    return parser


def resolve_run(train_cfg, rank):
    """(run id, resuming?) agreed by all ranks; rank 0 decides."""
    run_id = train_cfg.wandb_id or train_cfg.resume_id
    if run_id:
        run_dir = os.path.join(train_cfg.checkpoint_dir, run_id)
        if rank == 0 and not checkpoint_io.bf.exists(run_dir):
            raise UserError(f"Cannot resume run '{run_id}': no directory {run_dir}.")
        return run_id, True
    return dist_util.broadcast_object(new_run_id() if rank == 0 else None), False


def main(args):
    rank, world_size = dist_util.setup_dist()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    train_cfg = dataclass_from_dict(TrainConfig, vars(args))
    model_cfg = dataclass_from_dict(ModelConfig, vars(args))
    diffusion_cfg = dataclass_from_dict(DiffusionConfig, vars(args))

    run_id, resuming = resolve_run(train_cfg, rank)
    run_dir = checkpoint_io.bf.join(train_cfg.checkpoint_dir, run_id)
    if resuming:  # the run's own saved config wins over the command line, except run length
        saved = read_checkpoint_file(checkpoint_io.bf.join(run_dir, _latest_model_file(run_dir)))["config"]
        keep = {"max_steps": train_cfg.max_steps, "wandb_id": run_id, "resume_id": run_id,
                "checkpoint_dir": train_cfg.checkpoint_dir}
        train_cfg = dataclass_from_dict(TrainConfig, {**saved, **keep})
        model_cfg = dataclass_from_dict(ModelConfig, saved)
        diffusion_cfg = dataclass_from_dict(DiffusionConfig, saved)

    if train_cfg.T == -1:
        train_cfg.T = default_T(train_cfg.dataset)
    if model_cfg.image_size == -1:
        model_cfg.image_size = default_image_size(train_cfg.dataset)
    model_cfg.channel_mult = ",".join(map(str, parse_channel_mult(model_cfg.channel_mult, model_cfg.image_size)))
    if train_cfg.noise_mode not in ("fdm", "diffusion_forcing", "mixed"):
        raise UserError(f"Unknown --noise_mode '{train_cfg.noise_mode}'; choose fdm, diffusion_forcing or mixed.")
    saved_config = {**dataclasses.asdict(train_cfg), **dataclasses.asdict(model_cfg),
                    **dataclasses.asdict(diffusion_cfg), "wandb_id": run_id}

    dataset = get_dataset(train_cfg.dataset, split="train", T=train_cfg.T, image_size=model_cfg.image_size,
                          seed=train_cfg.seed)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True) if checkpoint_io.is_local(run_dir) else None
    logger = Logger(log_dir=run_dir if checkpoint_io.is_local(run_dir) else None, rank=rank, run_id=run_id,
                    config=saved_config, resume=resuming)

    model = create_model(model_cfg, diffusion_cfg.learn_sigma).to(dist_util.dev())
    diffusion = create_diffusion(diffusion_cfg, timestep_respacing="")
    start_step = 0
    if train_cfg.resume_checkpoint and not resuming:  # new run from given weights
        data = read_checkpoint_file(train_cfg.resume_checkpoint)
        model.load_state_dict(data["state_dict"])
        start_step = int(data.get("step", 0))
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, config=train_cfg, run_dir=run_dir,
                     saved_config=saved_config, logger=logger, start_step=start_step)
    if resuming:
        steps = checkpoint_io.complete_steps(run_dir, loop.ema_rates)
        if not steps:
            raise UserError(f"Run '{run_id}' has no complete checkpoint in {run_dir}.")
        loop.load_state(steps[-1])
        logger.info(f"resuming run {run_id} from step {steps[-1]}")
    batches = train_batches(dataset, 2 * train_cfg.batch_size, seed=train_cfg.seed, rank=rank,
                            world_size=world_size, start_step=loop.step)
    loop.data = lambda step: next(batches)
    logger.info(f"run {run_id}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"checkpoints in {run_dir}, {world_size} process(es)")
    loop.run()
    logger.close()


def _latest_model_file(run_dir):
    names = sorted(n for n in checkpoint_io.bf.listdir(run_dir) if checkpoint_io.MODEL_RE.match(n))
    if not names:
        raise UserError(f"No model checkpoint in {run_dir} to resume from.")
    return names[-1]


if __name__ == "__main__":
    try:
        main(create_argparser().parse_args())
    except (UserError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
