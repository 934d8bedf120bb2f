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
"""

import argparse
import dataclasses
import os
import sys
import traceback

import numpy as np
import torch

from improved_diffusion import dist_util
from improved_diffusion.training import checkpoint_io
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
from improved_diffusion.training.train_loop import Preempted, TrainConfig, TrainLoop, parse_ema_rates
from improved_diffusion.data.datasets import DatasetError, default_image_size, default_T, get_dataset, train_batches
from improved_diffusion.sampling.sampler import preview_rollout

# Flags a resumed run takes from the command line (when given); every other one comes from the run.
HOUSEKEEPING = ("max_steps", "log_interval", "save_interval", "sample_interval", "keep_last", "num_workers",
                "max_nonfinite_steps")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, ModelConfig, overrides={"image_size": -1})  # -1: the dataset's size
    add_dataclass_args(parser, DiffusionConfig)
    return parser


def find_run(args):
    """(run id, step to resume from or None, the run's saved config or None). Called on rank 0.

    --wandb_id names a run: it is continued when <checkpoint_dir>/<id> holds its config or a
    checkpoint, and started under that id otherwise (so a Slurm job can always pass the same id).
    """
    run_id = args.wandb_id or args.resume_id
    if not run_id:
        return new_run_id(), None, None
    run_dir = checkpoint_io.bf.join(args.checkpoint_dir, run_id)
    saved = checkpoint_io.read_run_config(run_dir)
    if saved is None:  # a run from before config.json: its newest model file holds the config
        newest = checkpoint_io.newest_model_file(run_dir)
        if newest is None:
            return run_id, None, None
        saved = read_checkpoint_file(newest)["config"]
    steps = checkpoint_io.complete_steps(run_dir, parse_ema_rates(saved.get("ema_rate", "0.9999")))
    return run_id, (steps[-1] if steps else None), saved


def resumed_values(saved, args, run_id, rank):
    """The saved config, with the housekeeping flags given on the command line."""
    given, parser = vars(args), create_argparser()
    explicit = {k for k, v in given.items() if v != parser.get_default(k)}
    values = {**saved, **{k: given[k] for k in HOUSEKEEPING if k in explicit}}
    values.update(wandb_id=run_id, resume_id=run_id, checkpoint_dir=given["checkpoint_dir"])
    ignored = sorted(k for k in explicit - set(HOUSEKEEPING) - {"wandb_id", "resume_id", "checkpoint_dir"}
                     if k in saved and saved[k] != given[k])
    if ignored and rank == 0:
        print(f"resumed run {run_id} keeps its own {', '.join(ignored)}", file=sys.stderr)
    return values


def make_preview(train_cfg, model_cfg, diffusion_cfg, run_dir, logger):
    """FDM's --sample_interval: every so often, roll out test video 0 with the EMA model (autoreg,
    DDIM 25 steps, 2 x max_frames frames) into <run_dir>/previews/ and to wandb."""
    K = train_cfg.max_frames
    if train_cfg.sample_interval <= 0 or K < 2:
        return None
    given = get_dataset(train_cfg.dataset, split="test", T=K // 2, image_size=model_cfg.image_size).video(0)
    preview_diffusion = create_diffusion(diffusion_cfg, timestep_respacing="ddim25")

    def preview(step, ema_model):
        frames = preview_rollout(ema_model, preview_diffusion, given.to(dist_util.dev()), 2 * K, K)
        if checkpoint_io.is_local(run_dir):
            os.makedirs(os.path.join(run_dir, "previews"), exist_ok=True)
            np.save(os.path.join(run_dir, "previews", f"step{step:06d}.npy"), frames.numpy())
        logger.log_video("preview", frames.numpy(), step)

    return preview


def main(args):
    rank, world_size = dist_util.setup_dist()
    dist_util.set_cpu_threads()

    # A new run, or the run named by --wandb_id continued from its newest complete checkpoint.
    run_id, resume_step, saved = dist_util.broadcast_object(find_run(args) if rank == 0 else None)
    values = vars(args) if saved is None else resumed_values(saved, args, run_id, rank)
    train_cfg = dataclass_from_dict(TrainConfig, values)
    model_cfg = dataclass_from_dict(ModelConfig, values)
    diffusion_cfg = dataclass_from_dict(DiffusionConfig, values)
    if train_cfg.T == -1:
        train_cfg.T = default_T(train_cfg.dataset)
    if model_cfg.image_size == -1:
        model_cfg.image_size = default_image_size(train_cfg.dataset)
    model_cfg.channel_mult = ",".join(map(str, parse_channel_mult(model_cfg.channel_mult, model_cfg.image_size)))
    if train_cfg.noise_mode not in ("fdm", "diffusion_forcing", "mixed"):
        raise UserError(f"Unknown --noise_mode '{train_cfg.noise_mode}'; choose fdm, diffusion_forcing or mixed.")
    if saved is not None and saved.get("world_size", world_size) != world_size and rank == 0:
        print(f"run {run_id} was trained with {saved['world_size']} processes and continues with {world_size}: "
              f"the effective batch changes", file=sys.stderr)
    saved_config = {**dataclasses.asdict(train_cfg), **dataclasses.asdict(model_cfg),
                    **dataclasses.asdict(diffusion_cfg), "wandb_id": run_id, "world_size": world_size}

    # The dataset never depends on the training seed (test sets stay comparable across runs).
    if train_cfg.on_bad_video not in ("stop", "skip"):
        raise UserError(f"--on_bad_video must be stop or skip, not '{train_cfg.on_bad_video}'.")
    dataset = get_dataset(train_cfg.dataset, split="train", T=train_cfg.T, image_size=model_cfg.image_size,
                          on_bad_video=train_cfg.on_bad_video)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank and in every run
    model = create_model(model_cfg, diffusion_cfg.learn_sigma).to(dist_util.dev())
    diffusion = create_diffusion(diffusion_cfg, timestep_respacing="")
    start_step = 0
    if train_cfg.resume_checkpoint and resume_step is None:  # a new run (or its restart) from given weights
        data = read_checkpoint_file(train_cfg.resume_checkpoint)
        try:
            model.load_state_dict(data["state_dict"])
        except (KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"--resume_checkpoint {train_cfg.resume_checkpoint} does not fit this model: {first}")
        start_step = int(data.get("step", 0))

    run_dir = checkpoint_io.bf.join(train_cfg.checkpoint_dir, run_id)
    if rank == 0:  # only rank 0 writes files
        checkpoint_io.remove_stale_temporaries(run_dir)
        checkpoint_io.write_run_config(run_dir, saved_config)
    logger = Logger(log_dir=run_dir if checkpoint_io.is_local(run_dir) else None, rank=rank, run_id=run_id,
                    config=saved_config, resume=bool(args.wandb_id or args.resume_id))
    if saved is not None:
        logger.forget_after(resume_step or 0)
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, config=train_cfg, run_dir=run_dir,
                     saved_config=saved_config, logger=logger, start_step=start_step,
                     preview=make_preview(train_cfg, model_cfg, diffusion_cfg, run_dir, logger))
    if resume_step is not None:
        loop.load_state(resume_step)
        logger.info(f"resuming run {run_id} from step {resume_step}")

    # Rank r's batch at step s is a pure function of (seed, s, r): resuming needs no data state.
    batches = train_batches(dataset, 2 * train_cfg.batch_size, seed=train_cfg.seed, rank=rank,
                            world_size=world_size, start_step=loop.step, num_workers=train_cfg.num_workers)
    loop.data = lambda step: next(batches)
    logger.info(f"run {run_id}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"checkpoints in {run_dir}, {world_size} process(es)")
    try:
        loop.run()
    finally:
        logger.close()


if __name__ == "__main__":
    try:
        main(create_argparser().parse_args())
    except Preempted as e:  # every rank stopped at the same step, after saving it
        if dist_util.get_rank() == 0:
            print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except (UserError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        dist_util.exit_all(2)
    except Exception:  # noqa: BLE001 - under MPI one failed rank must take the others down
        traceback.print_exc()
        dist_util.exit_all(1)
