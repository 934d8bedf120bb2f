"""Sampling the test videos of a dataset with a Scheme: what scripts/video_sample.py runs.

    request = SchemeRequest("hierarchy-2", T=64).with_settings(scheduling_matrix="pyramid")
    eval_dir = sample_dataset("checkpoints/<run>/ema_0.9999_010000.pt", request, SampleOptions(stop_index=2))

Conditions on the first n_obs frames of test videos and generates the rest stage by stage. The
scheme is the request resolved against the checkpoint (request.py); `SampleOptions` says which
videos, where, how the network is called and with which conditions. Writes
<eval_dir>/sampling_config.json (the run's checkpoint, dataset and seed plus the Scheme's JSON) and
<eval_dir>/samples/sample_<index:04d>-<sample_idx>.npy (uint8 T x C x H x W), skipping samples that
already exist. Each video draws its noise from its own generator (seed, sample_idx, video index).
Model calls carry a whole batch by default; with batch_invariant=True the model is called per video
(slower), so under `mpiexec -n N` or with another batch size the files are byte-identical; batched,
they may differ in the last float bits (rarely a uint8 level).

The loaded network is wrapped in one place, `prepare_model`: compiled (compile=True), behind the
key/value cache of causal rollouts (kv_cache, on by default for a causal UNet; kv_cache.py), run
at `precision` (fp32, bf16 or fp16 through autocast, outputs float32) and called per video
(batch_invariant). The run's precision is part of its results: a folder of samples made at one
precision is not resumed at another.

Every option is checked, and the scheme validated, before the model is loaded: a problem the user
can fix raises a one-sentence UserError. Size flags take -1 for "the default" (the checkpoint's
value), as FDM's scripts do; other values must be in range.

A Diffusion Forcing checkpoint (weights only; DF keeps its settings in a hydra config) is read
with `df_config` (a JSON file or dict of DF's config, as ../shared/reference/df_small32_config.json);
its sampler settings become the stage settings the request leaves out (request.sampler_defaults).

Conditional checkpoints: see condition_sources.py. The conditions' source (and the guidance scale,
through the scheme) are recorded in sampling_config.json and name the default results folder, so
samples made with different ones never share a folder.

MCMC refinement (`mcmc_steps` > 0, mcmc.py) needs a checkpoint trained with --energy True; any other
checkpoint is refused before it is loaded. Each video's counts (frame steps proposed and accepted,
gradient and energy evaluations) go to <eval_dir>/mcmc/sample_<index:04d>-<sample_idx>.json beside
its sample, so a resumed or multi-rank run still adds up; at the end their totals and the acceptance
rate are written into sampling_config.json under "mcmc" (`mcmc_summary`).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .. import dist_util
from ..checkpoints import load_checkpoint
from ..cli import device_flag
from ..data.datasets import get_dataset
from ..data.pixels import to_uint8
from ..errors import ConfigError
from ..precision import PrecisionModel, check_precision, compile_model
from ..results import CONFIG_FILE, SAMPLE_DIR, find_samples, sample_path, write_json_atomic, write_sampling_config
from .condition_sources import (batch_conditions, check_dataset_actions, checkpoint_conditioning, dataset_actions,
                                read_actions, sampling_conditions)
from .kv_cache import CausalCache, supports_cache
from .mcmc import MCMCStats, summarize
from .plan_picture import draw_plan
from .request import DEFAULT, SchemeRequest, checkpoint_config, scheme_for_checkpoint, stabilization_shown
from .sampler import one_video_at_a_time, sample_with_scheme, video_generator
from .settings import check_settings

MCMC_DIR = "mcmc"  # per-video MCMC counts, beside samples/


def option(default, help, kind=None, **metadata):
    """A SampleOptions field: its default, its flag's help and (for a default of None) its type."""
    return field(default=default, metadata={"help": help, "type": kind, **metadata})


@dataclass(frozen=True)
class SampleOptions:
    """How a sampling run is carried out, besides its scheme: which videos, where, how the network is called."""

    dataset: Optional[str] = option(None, "dataset of the given frames (default: the checkpoint's)", str)
    eval_dir: Optional[str] = option(None, "results folder (default: results/<run>/<checkpoint>/<scheme folder>)", str)
    start_index: int = option(0, "first test video")
    stop_index: int = option(DEFAULT, "one past the last test video (-1: every test video)")
    sample_idx: int = option(0, "which sample of each video (seeds differ)")
    batch_size: int = option(8, "videos per model call")
    seed: int = option(0, "sampling seed: each video's noise is a function of (seed, sample_idx, video index)")
    device: Optional[str] = option(None, "cpu, cuda, cuda:1, ... (default: this rank's)", str)
    just_visualise: bool = option(False, "only draw the frame plan as <eval_dir>/plan.png (as video_schedule.py "
                                         "--format png) and exit", store_true=True)
    df_config: Optional[str] = option(None, "DF's config (JSON) of a Diffusion Forcing checkpoint: its network and "
                                            "sampler settings", str)
    # how the network is called (MODEL_CALL)
    batch_invariant: bool = option(False, "True: call the model per video (slower), so samples are byte-identical "
                                          "for any batch size or rank count; default False: one model call per batch "
                                          "(results may differ in the last bits across batch sizes)")
    precision: str = option("fp32", "fp32, bf16 or fp16: the network's matmuls and convolutions run at this "
                                    "precision through autocast (outputs, weights and the sampler's arithmetic stay "
                                    "float32)")
    compile: bool = option(False, "torch.compile the network (the first stages are slow while it compiles)")
    kv_cache: Optional[bool] = option(None, "reuse the activations of unchanged earlier frames in a causal UNet "
                                            "(--causal True) instead of recomputing them at every denoising step; "
                                            "exact (default: on where the model supports it)", bool)
    # a conditional checkpoint's conditions (condition_sources.py)
    actions: Optional[str] = option(None, "a .npy file of actions driving every video: T x D values or T integers "
                                          "(one-hot), at least --T of them (default: each test video's own actions)",
                                    str)
    label: Optional[int] = option(None, "class label of every video (a label-conditioned model; -1: none)", int)
    uncond: bool = option(False, "sample with the model's null condition (needs --cond_drop_prob > 0 in training)")

    def model_call(self):
        """prepare_model's keyword arguments."""
        return {name: getattr(self, name) for name in MODEL_CALL}


MODEL_CALL = ("batch_invariant", "precision", "compile", "kv_cache")  # the options prepare_model takes


def default_eval_dir(checkpoint_path, config, folder):
    """results/<run id>/<checkpoint name>/<folder>."""
    run = config.get("wandb_id") or config.get("resume_id") or "run"
    ckpt = os.path.splitext(os.path.basename(str(checkpoint_path)))[0]
    return os.path.join("results", str(run), ckpt, folder)


def check_folder(flag, path):
    """A folder flag must not name an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag} {path} is a file, not a folder.")


def prepare_model(model, device, *, batch_invariant=False, precision="fp32", compile=False, kv_cache=None):
    """The loaded network `model` (an nn.Module on `device`) as the sampler calls it.

    The order matters: torch.compile takes the nn.Module itself, so it comes first; the key/value
    cache (kv_cache.py; None: on where the network supports it, True: asked for, False: off) calls
    the network on the frames it must recompute; the precision wrapper runs whatever is inside it
    under autocast and hands back float32; the per-video wrapper is outermost so that each per-video
    call still goes through all of them, with one cache per video slot.
    """
    if compile:
        model = compile_model(model)
    use_cache = supports_cache(model) if kv_cache is None else kv_cache  # supports_cache sees through compile
    if use_cache and not supports_cache(model):
        print("--kv_cache True has no effect: only FDM's UNet built with --causal True (without --energy) can reuse "
              "earlier frames (in any other network later frames change earlier ones, and an energy model's gradient "
              "runs back through every frame); sampling without the cache.", file=sys.stderr)
        use_cache = False

    def wrap(net):
        if use_cache:
            net = CausalCache(net)
        if precision != "fp32":  # fp32 calls the network as it is
            net = PrecisionModel(net, precision, device)
        return net

    if batch_invariant:
        return one_video_at_a_time(model, wrap)
    return wrap(model)


# What a folder's samples were made with, and the value of folders written before it was recorded.
PINNED_SETTINGS = {"precision": "fp32", "guidance_scale": 1.0, "conditions": "none"}


def check_same_settings(eval_dir, **settings):
    """Refuse to add samples to a folder whose samples were made with other `settings` (PINNED_SETTINGS keys).

    Existing samples are skipped (resumed), so mixing would leave a folder whose sampling_config.json
    misdescribes some of its samples. Folders written before a setting was recorded have its default
    (fp32, no guidance, no conditions).
    """
    path = os.path.join(eval_dir, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(eval_dir, SAMPLE_DIR)) or not find_samples(eval_dir):
        return
    try:
        with open(path) as f:
            saved_config = json.load(f)
        saved_config.get("precision")
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge; it is rewritten below
    for key, value in settings.items():
        saved = saved_config.get(key, PINNED_SETTINGS[key])
        if saved != value:
            what = f"conditions '{saved}', not '{value}'" if key == "conditions" else f"--{key} {saved}, not {value}"
            raise ConfigError(f"{eval_dir} holds samples made with {what}; pass another --eval_dir.")


def check_options(options):
    """Raise a one-sentence ConfigError for run options that cannot work (before anything is read)."""
    for flag, minimum in (("batch_size", 1), ("start_index", 0), ("sample_idx", 0), ("seed", 0)):
        value = getattr(options, flag)
        if value < minimum:
            raise ConfigError(f"--{flag} must be at least {minimum}, got {value}.")
    check_precision(options.precision)
    if options.stop_index != DEFAULT and options.stop_index <= options.start_index:
        raise ConfigError(f"--stop_index {options.stop_index} must be larger than --start_index {options.start_index} "
                          "(or -1 for every test video).")


def sample_dataset(checkpoint_path, request=SchemeRequest(), options=SampleOptions()):
    """Sample test videos options.start_index..stop_index-1 (-1: all) with the scheme `request` asks for.

    Returns the eval dir (with options.just_visualise, the path of the plan's picture instead).
    """
    # ---- every setting is checked before the model is loaded
    check_options(options)
    config, checkpoint = checkpoint_config(checkpoint_path, options.df_config)  # config now, weights later
    scheme = scheme_for_checkpoint(config, request)
    label = None if options.label is None or options.label == DEFAULT else int(options.label)
    conditions = sampling_conditions(config, checkpoint_path, actions=options.actions, label=label,
                                     uncond=bool(options.uncond), guidance_scale=scheme.stage.guidance_scale)
    cond_dim = checkpoint_conditioning(config)[0]
    file_actions = None
    if conditions.source == "file":
        file_actions = torch.from_numpy(read_actions(options.actions, scheme.T, cond_dim))
    suffix = ("" if options.precision == "fp32" else f"_{options.precision}") + conditions.folder_suffix()
    eval_dir = str(options.eval_dir or default_eval_dir(checkpoint_path, config, scheme.folder_name() + suffix))
    check_folder("eval_dir", eval_dir)
    if options.just_visualise:
        return draw_scheme(scheme, eval_dir)

    dataset_name = options.dataset or config.get("dataset") or "bouncing_balls"
    image_size = int(config["image_size"])
    # The training run's frame skip, for its own dataset (dmlab, minecraft); another dataset is read as it is.
    frame_skip = int(config.get("frame_skip") or 1) if dataset_name == config.get("dataset") else 1
    data = get_dataset(dataset_name, split="test", T=max(scheme.n_obs, 1), image_size=image_size,
                       frame_skip=frame_skip)
    if options.start_index >= len(data):
        raise ConfigError(f"--start_index {options.start_index} is past the last of the {len(data)} test videos of "
                          f"{dataset_name}.")
    if conditions.source == "dataset":
        check_dataset_actions(data, cond_dim, dataset_name)
    device = device_flag(options.device)
    check_same_settings(eval_dir, precision=options.precision, guidance_scale=scheme.stage.guidance_scale,
                        conditions=conditions.describe())

    # ---- this rank's videos
    rank, world_size = dist_util.setup_dist()
    indices = rank_videos(options, len(data), rank, world_size)
    if rank == 0:
        run_config = {"checkpoint": str(checkpoint_path), "dataset": dataset_name, "image_size": image_size,
                      "frame_skip": frame_skip, **conditions.record()}
        write_run_config(eval_dir, scheme, config, options, run_config)
    todo = [i for i in indices if not os.path.exists(sample_path(eval_dir, i, options.sample_idx))]
    print(f"rank {rank}: {len(todo)} of {len(indices)} videos to sample into {os.path.join(eval_dir, 'samples')}",
          file=sys.stderr)
    if not todo:
        return record_mcmc(eval_dir, scheme, rank)
    own_actions = {}  # each video's own actions, read (and checked) before the model is loaded
    if conditions.source == "dataset":
        own_actions = dataset_actions(data, todo, scheme.T, cond_dim, dataset_name)

    # ---- the model, then one batch at a time
    model, diffusion, _ = load_checkpoint(checkpoint_path, scheme.timestep_respacing, device=device, data=checkpoint,
                                          df_config=options.df_config)
    check_settings(scheme.stage, diffusion)  # the scheme was checked against the config; this is the diffusion
    model = prepare_model(model, device, **options.model_call())
    os.makedirs(os.path.join(eval_dir, SAMPLE_DIR), exist_ok=True)
    for start in range(0, len(todo), options.batch_size):
        batch_idx = todo[start: start + options.batch_size]
        batch = batch_conditions(conditions, batch_idx, own_actions, file_actions, device)
        sample_batch(model, diffusion, scheme, data, batch_idx, batch, options, eval_dir, device, progress=rank == 0)
    return record_mcmc(eval_dir, scheme, rank)


def draw_scheme(scheme, eval_dir):
    """Draw the scheme's plan as <eval_dir>/plan.png; returns its path."""
    if scheme.adaptive:
        raise ConfigError(f"{scheme.plan} chooses its observed frames from the videos, so its plan cannot be "
                          "drawn without sampling; draw its non-adaptive counterpart instead.")
    os.makedirs(eval_dir, exist_ok=True)
    path = os.path.join(eval_dir, "plan.png")
    draw_plan(scheme.stages(), scheme.T, path)
    return path


def rank_videos(options, num_videos, rank, world_size):
    """The test videos this rank samples: its share of start_index..stop_index-1 (under SLURM, its task's batch)."""
    stop = num_videos if options.stop_index == DEFAULT else min(options.stop_index, num_videos)
    indices = list(range(options.start_index, stop))
    slurm_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if slurm_task is not None and options.stop_index == DEFAULT:  # FDM: without --stop_index, one task per batch
        indices = indices[int(slurm_task) * options.batch_size: (int(slurm_task) + 1) * options.batch_size]
    return indices[rank::world_size]  # under mpiexec each rank samples (and writes) its share


def write_run_config(eval_dir, scheme, config, options, run_config):
    """sampling_config.json: the run (checkpoint, data, seed, model call, conditions) and the scheme's JSON.

    Also says (and records) where a respaced chain rounds the stabilization level down.
    """
    stab_shown, stab_warning = stabilization_shown(scheme, config)
    if stab_warning:
        print(stab_warning, file=sys.stderr)
    run_config = {**run_config, "seed": options.seed, "data_seed": 0, "precision": options.precision,
                  "compiled": bool(options.compile), "batch_invariant": bool(options.batch_invariant),
                  "stabilization_timestep": stab_shown}
    df_config = options.df_config
    if df_config is not None:
        run_config["df_config"] = df_config if isinstance(df_config, dict) else str(df_config)
    write_sampling_config(eval_dir, {**run_config, **scheme.to_dict()})


def sample_batch(model, diffusion, scheme, data, batch_idx, conditions, options, eval_dir, device, progress):
    """Sample the test videos `batch_idx` and write their files; each video draws its noise from its own generator."""
    given = [data.video(i)[:scheme.n_obs] for i in batch_idx]
    videos = torch.zeros(len(batch_idx), scheme.T, *given[0].shape[1:])
    for j, frames in enumerate(given):
        videos[j, :scheme.n_obs] = frames
    generators = [video_generator(options.seed, options.sample_idx, i) for i in batch_idx]
    stats = MCMCStats(len(batch_idx)) if scheme.stage.mcmc_steps else None
    out = sample_with_scheme(model, diffusion, scheme, videos.to(device), generators, progress=progress,
                             conditions=conditions, **({} if stats is None else {"mcmc_stats": stats}))
    frames = to_uint8(out).numpy()
    for j, i in enumerate(batch_idx):
        if stats is not None:  # before the sample: a sample never exists without its counts
            write_json_atomic(mcmc_stats_path(eval_dir, i, options.sample_idx), stats.per_video(j))
        path = sample_path(eval_dir, i, options.sample_idx)
        np.save(path + ".tmp.npy", frames[j])
        os.replace(path + ".tmp.npy", path)


def mcmc_stats_path(eval_dir, video_index, sample_idx):
    """Where a video's MCMC counts go (MCMC_DIR beside samples/)."""
    folder = os.path.join(eval_dir, MCMC_DIR)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"sample_{video_index:04d}-{sample_idx}.json")


def mcmc_summary(eval_dir):
    """Totals of the per-video MCMC counts in eval_dir with the acceptance rate (mcmc.summarize); None if none."""
    folder = os.path.join(eval_dir, MCMC_DIR)
    if not os.path.isdir(folder):
        return None
    records = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith("sample_") or not name.endswith(".json") or ".tmp" in name:
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            continue  # a damaged count file: that video is left out of the totals
    return summarize(records) if records else None


def record_mcmc(eval_dir, scheme, rank):
    """With MCMC refinement: once every rank is done, rank 0 writes the folder's totals into sampling_config.json
    under "mcmc". Returns eval_dir."""
    if not scheme.stage.mcmc_steps:
        return eval_dir
    dist_util.barrier()
    if rank == 0:
        summary = mcmc_summary(eval_dir)
        path = os.path.join(eval_dir, CONFIG_FILE)
        with open(path) as f:
            saved = json.load(f)
        write_sampling_config(eval_dir, {**saved, "mcmc": summary})
    return eval_dir
