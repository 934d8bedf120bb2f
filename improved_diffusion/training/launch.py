"""One training run from the command line's values: find or start the run, check every flag, train.

`train(args, default_of)` is all scripts/video_train.py does. Every flag is checked (the
configs' `validate`, then paths and the dataset's length) before the model is built or a
training video read, so a mistake ends in one sentence, not a traceback minutes later.

Conditioning (`resolve_conditioning`): --cond_dim 0 (the default) trains an unconditional model
even on a dataset with actions (a note says so), --cond_dim -1 conditions on the dataset's actions
whatever their width, --cond_dim D does so after checking that D is their width. The choice is
opt-in so that a run's meaning never changes with the dataset it reads, and resumed or FDM runs
(whose configs have no cond_dim) stay unconditional. The resolved width is what the run saves.
No dataset delivers class labels yet, so --num_classes / --class_cond True are refused here; the
model and TrainLoop take labels (y) from Python.
"""

import dataclasses
import os
import sys

import numpy as np
import torch

from .. import dist_util
from ..checkpoints import read_model_checkpoint
from ..data.batches import train_batches
from ..data.datasets import DATASETS, default_image_size, default_T, get_dataset
from ..diffusion import DiffusionConfig, create_diffusion
from ..errors import CheckpointError, ConfigError
from ..cli import dataclass_from_dict
from ..logger import Logger, new_run_id
from ..models import ModelConfig, create_model, parse_channel_mult
from ..sampling.mcmc import MCMCStats
from ..sampling.sampler import preview_rollout
from . import checkpoint_io
from .config import TrainConfig, parse_ema_rates
from .train_loop import Preempted, TrainLoop
from .validation import SampleEvaluation, make_validation

# Flags a resumed run takes from the command line (when given); every other one comes from the run.
# --compile changes how fast the same steps run (a machine without a compiler can continue a compiled
# run), not what is trained; --precision changes the numbers, so it stays the run's own.
# --val_interval and --eval_interval only say how often the run is measured (measurements never change
# the training run), and --keep_best only which figure's best checkpoint is kept, so a resumed run may
# change them. What the figures mean stays the run's own: --val_videos (another set of clips gives
# another val_loss, so the curve and the best value read back from best_val_loss.pt would stop being
# comparable across the resume), and likewise --eval_videos, --eval_scheme, --eval_T, --eval_respacing.
# --eval_i3d_path is where the I3D file lies on this machine, so a resumed run may name it (or add FVD).
HOUSEKEEPING = ("max_steps", "log_interval", "save_interval", "sample_interval", "keep_last", "num_workers",
                "max_nonfinite_steps", "compile", "val_interval", "eval_interval", "keep_best", "eval_i3d_path",
                "preview_mcmc_steps")


def find_run(args):
    """(run id, complete checkpoint steps, the run's saved config or None). Called on rank 0.

    --wandb_id names a run: it is continued when <checkpoint_dir>/<id> holds its config or a
    checkpoint, and started under that id otherwise (so a Slurm job can always pass the same id).
    FDM's runs have no config.json: their newest readable model file holds the config.
    """
    run_id = args.wandb_id or args.resume_id
    if not run_id:
        return new_run_id(), [], None
    run_dir = checkpoint_io.bf.join(args.checkpoint_dir, run_id)
    saved = checkpoint_io.read_run_config(run_dir)
    if saved is None:
        for path in checkpoint_io.model_files_newest_first(run_dir):
            try:
                saved = read_model_checkpoint(path)["config"]
                break
            except CheckpointError as e:
                print(f"skipping {path}: {e}", file=sys.stderr)
        if saved is None:
            return run_id, [], None
    rates = parse_ema_rates(saved.get("ema_rate", "0.9999"))
    return run_id, checkpoint_io.complete_steps(run_dir, rates), saved


def resumed_values(saved, args, default_of, run_id, rank):
    """The saved config, with the housekeeping flags given on the command line."""
    given = vars(args)
    explicit = {k for k, v in given.items() if v != default_of(k)}
    values = {**saved, **{k: given[k] for k in HOUSEKEEPING if k in explicit}}
    values.update(wandb_id=run_id, resume_id=run_id, checkpoint_dir=given["checkpoint_dir"])
    ignored = sorted(k for k in explicit - set(HOUSEKEEPING) - {"wandb_id", "resume_id", "checkpoint_dir"}
                     if k in saved and saved[k] != given[k])
    if ignored and rank == 0:
        print(f"resumed run {run_id} keeps its own {', '.join(ignored)}", file=sys.stderr)
    return values


def resolve_and_check(train_cfg, model_cfg, diffusion_cfg):
    """Fill in the dataset's T and image size and FDM's num_workers rule, then check every flag.

    Reads no video: a registered dataset's length comes from its registry entry (a folder's
    T=-1 is its shortest video's length, read from the files' headers).
    """
    if not train_cfg.dataset:
        train_cfg.validate()  # names the missing --dataset
    check_preview_mcmc(train_cfg, model_cfg)
    if train_cfg.frame_skip < 1:
        train_cfg.validate()  # names --frame_skip
    if model_cfg.class_cond or model_cfg.num_classes:
        flag = "--class_cond True" if model_cfg.class_cond else f"--num_classes {model_cfg.num_classes}"
        raise ConfigError(f"{flag} conditions on class labels, but dataset '{train_cfg.dataset}' has none (no "
                          f"dataset delivers labels yet; pass labels as y to the model and TrainLoop from Python).")
    if train_cfg.T == -1:
        train_cfg.T = default_T(train_cfg.dataset, train_cfg.frame_skip)
    elif train_cfg.dataset in DATASETS and DATASETS[train_cfg.dataset].T is not None:
        # A registered dataset of files has one length (generated ones have any; a folder's
        # loader leaves out videos shorter than T and fails when none is left).
        length = default_T(train_cfg.dataset, train_cfg.frame_skip)
        if train_cfg.T > length:
            skip = f" at --frame_skip {train_cfg.frame_skip}" if train_cfg.frame_skip != 1 else ""
            raise ConfigError(f"--T {train_cfg.T} is longer than the videos of dataset "
                              f"'{train_cfg.dataset}' ({length} frames{skip}).")
    if model_cfg.image_size == -1:
        model_cfg.image_size = default_image_size(train_cfg.dataset)
    if train_cfg.num_workers == -1:  # FDM: number of cores - 1
        train_cfg.num_workers = max(len(os.sched_getaffinity(0)) - 1, 1)
    train_cfg.validate()
    model_cfg.validate()
    diffusion_cfg.validate()
    model_cfg.channel_mult = ",".join(map(str, parse_channel_mult(model_cfg.channel_mult, model_cfg.image_size)))


def resolve_conditioning(model_cfg, dataset, rank=0):
    """Set --cond_dim -1 to the dataset's action width and check the conditions against the dataset.

    See the module docstring for the rule. Raises ConfigError naming the flag.
    """
    name, width = dataset.name, dataset.action_dim
    if model_cfg.cond_dim == -1:
        if width is None:
            raise ConfigError(f"--cond_dim -1 conditions on the dataset's actions, but dataset '{name}' has none.")
        model_cfg.cond_dim = int(width)
    elif model_cfg.cond_dim > 0:
        if width is None:
            raise ConfigError(f"--cond_dim {model_cfg.cond_dim} conditions each frame on an action, but dataset "
                              f"'{name}' has no actions.")
        if model_cfg.cond_dim != width:
            raise ConfigError(f"--cond_dim {model_cfg.cond_dim} does not match the {width}-wide actions of dataset "
                              f"'{name}'; pass --cond_dim -1 to use them.")
    elif width is not None and rank == 0:
        print(f"dataset '{name}' has actions ({width} per frame), which this unconditional model ignores; pass "
              f"--cond_dim -1 to condition on them.", file=sys.stderr)
    model_cfg.validate()


def check_checkpoint_dir(run_dir):
    """The run directory exists or can be created (local paths; object stores fail at the first save).

    Creates nothing, so a run that fails a later check leaves no directory behind.
    """
    if not checkpoint_io.is_local(run_dir):
        return
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--checkpoint_dir: cannot create {run_dir} because {existing} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--checkpoint_dir: cannot write to {existing}.")


def check_preview_mcmc(train_cfg, model_cfg):
    """MCMC in previews descends the model's energy: refuse it for a model without one."""
    if train_cfg.preview_mcmc_steps > 0 and not model_cfg.energy:
        raise ConfigError(f"--preview_mcmc_steps {train_cfg.preview_mcmc_steps} refines previews by descending the "
                          "model's energy, but the model has none: pass --energy True, or --preview_mcmc_steps 0.")


def make_preview(train_cfg, model_cfg, diffusion_cfg, run_dir, logger):
    """FDM's --sample_interval: every so often, roll out test video 0 with the EMA model (autoreg,
    DDIM 25 steps, 2 x max_frames frames) into <run_dir>/previews/ and to wandb.

    Previews run in float32 and eagerly whatever --precision and --compile say: the EMA model is
    a plain float32 copy, and a preview is a few forward passes every sample_interval steps.
    An energy model's previews refine each step with --preview_mcmc_steps MCMC steps (default step
    size) and log their acceptance rate as preview_mcmc_acceptance."""
    K = train_cfg.max_frames
    mcmc_steps = train_cfg.preview_mcmc_steps  # checked against the model by resolve_and_check
    if train_cfg.sample_interval <= 0 or K < 2:
        return None
    length = 2 * K
    actions = None
    if model_cfg.cond_dim > 0:  # the test video's own actions drive the rollout, as far as the video goes
        length = min(2 * K, train_cfg.T)
        given, actions = get_dataset(train_cfg.dataset, split="test", T=length, image_size=model_cfg.image_size,
                                     frame_skip=train_cfg.frame_skip).video_and_actions(0)
        given = given[: K // 2]
    else:
        given = get_dataset(train_cfg.dataset, split="test", T=K // 2, image_size=model_cfg.image_size,
                            frame_skip=train_cfg.frame_skip).video(0)
    preview_diffusion = create_diffusion(diffusion_cfg, timestep_respacing="ddim25")

    def preview(step, ema_model):
        stats = MCMCStats(1) if mcmc_steps else None
        frames = preview_rollout(ema_model, preview_diffusion, given.to(dist_util.dev()), length, K,
                                 actions=actions, mcmc_steps=mcmc_steps, mcmc_stats=stats)
        if stats is not None:
            logger.log_row({"preview_mcmc_acceptance": stats.acceptance_rate(), "step": step}, step)
        if checkpoint_io.is_local(run_dir):
            os.makedirs(os.path.join(run_dir, "previews"), exist_ok=True)
            np.save(os.path.join(run_dir, "previews", f"step{step:06d}.npy"), frames.numpy())
        logger.log_video("preview", frames.numpy(), step)

    return preview


def read_weights(train_cfg, steps):
    """--resume_checkpoint's checkpoint, for a new run (or its restart) from given weights; otherwise None."""
    if not train_cfg.resume_checkpoint or steps:
        return None
    try:
        return read_model_checkpoint(train_cfg.resume_checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"--resume_checkpoint: {e}") from None


def load_weights(model, weights, path):
    """Put the checkpoint `weights` read from `path` (or None) into `model`; returns its step (0 for None)."""
    if weights is None:
        return 0
    try:
        model.load_state_dict(weights["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"--resume_checkpoint {path} does not fit this model: {first}") from None
    return int(weights.get("step", 0))


def train(args, default_of):
    """Train as scripts/video_train.py's flags `args` say; `default_of(flag)` is the flag's default
    (a resumed run takes only the housekeeping flags that differ from it)."""
    rank, world_size = dist_util.setup_dist()
    dist_util.set_cpu_threads()

    # A new run, or the run named by --wandb_id continued from its newest readable complete checkpoint.
    run_id, steps, saved = dist_util.broadcast_object(find_run(args) if rank == 0 else None)
    values = vars(args) if saved is None else resumed_values(saved, args, default_of, run_id, rank)
    train_cfg = dataclass_from_dict(TrainConfig, values)
    model_cfg = dataclass_from_dict(ModelConfig, values)
    diffusion_cfg = dataclass_from_dict(DiffusionConfig, values)
    resolve_and_check(train_cfg, model_cfg, diffusion_cfg)
    run_dir = checkpoint_io.bf.join(train_cfg.checkpoint_dir, run_id)
    if rank == 0:
        check_checkpoint_dir(run_dir)
    weights = read_weights(train_cfg, steps)
    if saved is not None and saved.get("world_size", world_size) != world_size and rank == 0:
        print(f"run {run_id} was trained with {saved['world_size']} processes and continues with {world_size}: "
              f"the effective batch changes", file=sys.stderr)

    # The dataset never depends on the training seed (test sets stay comparable across runs).
    dataset = get_dataset(train_cfg.dataset, split="train", T=train_cfg.T, image_size=model_cfg.image_size,
                          on_bad_video=train_cfg.on_bad_video, frame_skip=train_cfg.frame_skip)
    resolve_conditioning(model_cfg, dataset, rank)
    # Measurements read their test videos (and check their flags) before the model is built.
    num_timesteps = create_diffusion(diffusion_cfg, timestep_respacing="").num_timesteps
    validation = make_validation(train_cfg, model_cfg, num_timesteps, rank, world_size)
    evaluation = SampleEvaluation.from_config(train_cfg, model_cfg, diffusion_cfg, run_dir)
    saved_config = {**dataclasses.asdict(train_cfg), **dataclasses.asdict(model_cfg),
                    **dataclasses.asdict(diffusion_cfg), "wandb_id": run_id, "world_size": world_size}
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank and in every run
    model = create_model(model_cfg, diffusion_cfg.learn_sigma).to(dist_util.dev())
    diffusion = create_diffusion(diffusion_cfg, timestep_respacing="")
    start_step = load_weights(model, weights, train_cfg.resume_checkpoint)

    if rank == 0:  # only rank 0 writes files
        checkpoint_io.remove_stale_temporaries(run_dir)
        checkpoint_io.write_run_config(run_dir, saved_config)
    logger = Logger(log_dir=run_dir if checkpoint_io.is_local(run_dir) else None, rank=rank, run_id=run_id,
                    config=saved_config, resume=bool(args.wandb_id or args.resume_id), offline=args.unobserve)
    loop = TrainLoop(model=model, diffusion=diffusion, data=None, config=train_cfg, run_dir=run_dir,
                     saved_config=saved_config, logger=logger, start_step=start_step,
                     preview=make_preview(train_cfg, model_cfg, diffusion_cfg, run_dir, logger),
                     cond_drop_prob=model_cfg.cond_drop_prob, validation=validation,
                     evaluation=evaluation)
    if steps:
        step = loop.load_newest_readable(steps)
        logger.info(f"resuming run {run_id} from step {step}")
    if saved is not None:
        logger.forget_after(loop.step if steps else 0)

    # Rank r's batch at step s is a pure function of (seed, s, r): resuming needs no data state.
    # With conditions: (videos, their actions), the actions gathered with the frames' indices.
    with_actions = model_cfg.cond_dim > 0
    batches = train_batches(dataset, 2 * train_cfg.batch_size, seed=train_cfg.seed, rank=rank,
                            world_size=world_size, start_step=loop.step, num_workers=train_cfg.num_workers,
                            with_actions=with_actions)
    loop.data = lambda step: next(batches)
    logger.info(f"run {run_id}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"checkpoints in {run_dir}, {world_size} process(es), precision {loop.precision}"
                + (", compiled" if train_cfg.compile else ""))
    try:
        loop.run()
    except Preempted as e:  # every rank stopped at the same step, after saving it
        if rank == 0:
            print(str(e), file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    finally:
        logger.close()
