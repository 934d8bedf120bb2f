"""Sampling the test videos of a dataset with a Scheme: what scripts/video_sample.py runs.

    eval_dir = sample_dataset("checkpoints/<run>/ema_0.9999_010000.pt", "hierarchy-2", T=64, stop_index=2)

Conditions on the first n_obs frames of test videos and generates the rest stage by stage.
Writes <eval_dir>/sampling_config.json (the run's checkpoint, dataset and seed plus the Scheme's
JSON) and <eval_dir>/samples/sample_<index:04d>-<sample_idx>.npy (uint8 T x C x H x W), skipping
samples that already exist. Each video draws its noise from its own generator (seed, sample_idx,
video index). Model calls carry a whole batch by default; with batch_invariant=True the model is
called per video (slower), so under `mpiexec -n N` or with another batch size the files are
byte-identical; batched, they may differ in the last float bits (rarely a uint8 level).

The loaded network is wrapped in one place, `prepare_model`: compiled (compile=True), behind the
key/value cache of causal rollouts (kv_cache, on by default for a causal UNet; kv_cache.py), run
at `precision` (fp32, bf16 or fp16 through autocast, outputs float32) and called per video
(batch_invariant). The run's precision is part of its results: a folder of samples made at one
precision is not resumed at another.

Every flag is checked, and the scheme validated, before the model is loaded: a problem the user
can fix raises a one-sentence UserError. Size flags take -1 for "the default" (the checkpoint's
value), as FDM's scripts do; other values must be in range.

A Diffusion Forcing checkpoint (weights only; DF keeps its settings in a hydra config) is read
with `df_config` (a JSON file or dict of DF's config, as ../shared/reference/df_small32_config.json).
Sampler settings the user leaves unset (None) come from the checkpoint's config where it has them
(`sampler_defaults`): a DF config gives DF's sampler (stabilization "df" at its
stabilization_level, its ddim_sampling_eta, sampling_timesteps levels per stage with DDIM when they
are fewer than its timesteps, its clip_noise, no x0 clipping), so every plan runs on a DF model.
"""

import json
import os
import sys

import numpy as np
import torch

from .. import dist_util
from ..checkpoints import df_to_config, load_checkpoint, read_df_checkpoint, read_df_config, read_model_checkpoint
from ..cli import dataclass_from_dict, device_flag
from ..data.datasets import get_dataset
from ..data.pixels import to_uint8
from ..diffusion import DiffusionConfig
from ..errors import ConfigError
from ..precision import PrecisionModel, check_precision, compile_model
from ..results import CONFIG_FILE, SAMPLE_DIR, find_samples, sample_path, write_sampling_config
from .kv_cache import CausalCache, supports_cache
from .plan_picture import draw_plan
from .sampler import one_video_at_a_time, sample_with_scheme, video_generator
from .scheme import Scheme, check_settings

DEFAULT = -1  # a size flag's "use the default"


def size_flag(flag, value, default, minimum=1):
    """`value`, or `default` when it is -1 or None; anything else below `minimum` is a ConfigError."""
    if value is None or value == DEFAULT:
        return default
    if value < minimum:
        raise ConfigError(f"--{flag} must be at least {minimum} (or -1 for the default), got {value}.")
    return value


def checkpoint_config(checkpoint_path, df_config=None):
    """(flat config, file contents) of a checkpoint, read once and before any model is built.

    With `df_config` the checkpoint is DF's (its file holds weights, no config) and the config is
    DF's translated to ours (`checkpoints.df_to_config`); otherwise it is ours or FDM's.
    """
    if df_config is None:
        data = read_model_checkpoint(checkpoint_path)
        return dict(data["config"]), data
    config = df_to_config(read_df_config(df_config))
    return config, read_df_checkpoint(checkpoint_path)


def sampler_defaults(config):
    """Stage settings a checkpoint's config implies, for the ones the user leaves unset.

    clip_noise (ours and DF's) bounds the sampler's Gaussian draws as it bounded training's. A DF
    config (`sampling_timesteps` present) asks for DF's sampler, as DF's `Diffusion` reads it
    (algorithms/diffusion_forcing/models/diffusion.py): stabilization "df" at stabilization_level,
    eta = ddim_sampling_eta, sampling_timesteps levels, DDIM when they are fewer than the timesteps
    (`is_ddim_sampling`), x0_hat never clipped.
    """
    defaults = {}
    if config.get("clip_noise"):
        defaults["clip_noise"] = float(config["clip_noise"])
    if "sampling_timesteps" in config:
        S, N = int(config["sampling_timesteps"]), int(config.get("diffusion_steps", 1000))
        level = int(config.get("stabilization_level", 0))
        defaults.update(stabilization="df" if level >= 1 else "generated", stabilization_level=level,
                        eta=float(config.get("ddim_sampling_eta", 0.0)), sampling_steps=S, use_ddim=S < N,
                        clip_denoised=False)
    return defaults


def scheme_for_checkpoint(config, sampling_scheme, *, T=DEFAULT, n_obs=DEFAULT, max_frames=DEFAULT,
                          max_latent_frames=DEFAULT, **settings):
    """The validated Scheme for a checkpoint's flat `config`: -1 sizes take the checkpoint's values.

    `settings`: the other keyword arguments of `Scheme.from_preset` (noise schedule, DDIM, ...);
    those left None take `sampler_defaults(config)`, then the preset's. max_frames may not exceed
    the checkpoint's: the model never saw more frames at once.
    """
    defaults = sampler_defaults(config)
    settings = {k: defaults.get(k) if v is None else v for k, v in settings.items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    trained_K = config.get("max_frames")
    K = size_flag("max_frames", max_frames, int(trained_K or 20))
    if trained_K and K > int(trained_K):
        raise ConfigError(f"--max_frames {K} exceeds the {trained_K} frames the checkpoint was trained with.")
    T = size_flag("T", T, int(config.get("T") or DEFAULT))
    if T == DEFAULT:
        raise ConfigError("the checkpoint does not record a video length; pass --T.")
    if n_obs not in (None, DEFAULT) and n_obs >= T:
        raise ConfigError(f"--n_obs {n_obs} given frames leave none to generate in a video of --T {T} frames; "
                          "pass a smaller --n_obs (video_sample.py's default is FDM's 36) or a larger --T.")
    return Scheme.from_preset(
        sampling_scheme, T=T, max_frames=K, n_obs=size_flag("n_obs", n_obs, None, minimum=0),
        max_latent_frames=size_flag("max_latent_frames", max_latent_frames, None),
        diffusion_config=dataclass_from_dict(DiffusionConfig, config), **settings)


def default_eval_dir(checkpoint_path, config, folder):
    """results/<run id>/<checkpoint name>/<folder>."""
    run = config.get("wandb_id") or config.get("resume_id") or "run"
    ckpt = os.path.splitext(os.path.basename(str(checkpoint_path)))[0]
    return os.path.join("results", str(run), ckpt, folder)


def check_folder(flag, path):
    """A folder flag must not name an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag} {path} is a file, not a folder.")


def add_model_call_flags(parser):
    """The flags of how the network is called (video_sample.py and compare_schemes.py share them)."""
    from ..cli import str2bool

    parser.add_argument("--batch_invariant", type=str2bool, default=False,
                        help="True: call the model per video (slower), so samples are byte-identical for any batch "
                             "size or rank count; default False: one model call per batch (results may differ in the "
                             "last bits across batch sizes)")
    parser.add_argument("--precision", default="fp32",
                        help="fp32, bf16 or fp16: the network's matmuls and convolutions run at this precision "
                             "through autocast (outputs, weights and the sampler's arithmetic stay float32)")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="torch.compile the network (the first stages are slow while it compiles)")
    parser.add_argument("--kv_cache", type=str2bool, default=None,
                        help="reuse the activations of unchanged earlier frames in a causal UNet (--causal True) "
                             "instead of recomputing them at every denoising step; exact (default: on where the "
                             "model supports it)")


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
        print("--kv_cache True has no effect: only FDM's UNet built with --causal True can reuse earlier frames "
              "(in any other network later frames change earlier ones); sampling without the cache.",
              file=sys.stderr)
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


def check_same_precision(eval_dir, precision):
    """Refuse to add samples at `precision` to a folder whose samples were made at another precision.

    Existing samples are skipped (resumed), so mixing would leave a folder whose sampling_config.json
    misdescribes some of its samples. Folders written before precision was recorded are fp32.
    """
    path = os.path.join(eval_dir, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(eval_dir, SAMPLE_DIR)) or not find_samples(eval_dir):
        return
    try:
        with open(path) as f:
            saved = json.load(f).get("precision", "fp32")
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge; it is rewritten below
    if saved != precision:
        raise ConfigError(f"{eval_dir} holds samples made with --precision {saved}, not {precision}; "
                          "pass another --eval_dir.")


def sample_dataset(checkpoint_path, sampling_scheme="autoreg", *, T=DEFAULT, n_obs=DEFAULT, max_frames=DEFAULT,
                   max_latent_frames=DEFAULT, noise_schedule=None, uncertainty_scale=None, stabilization_level=None,
                   chunk_size=None, sampling_steps=None, optimality=None, timestep_respacing="", use_ddim=None,
                   eta=None, clip_denoised=None, stabilization=None, clip_noise=None, dataset=None, eval_dir=None,
                   start_index=0, stop_index=DEFAULT, sample_idx=0, batch_size=8, batch_invariant=False, seed=0,
                   device=None, just_visualise=False, df_config=None, precision="fp32", compile=False, kv_cache=None):
    """Sample test videos start_index..stop_index-1 (-1: all) with a scheme; returns the eval dir.

    The scheme is the preset `sampling_scheme` with the given overrides (see `Scheme.from_preset`;
    None: the checkpoint config's, see `sampler_defaults`, else the preset's). batch_invariant:
    call the model per video (slower) so samples are bit-identical for any batch size or rank count;
    False (default) calls it on the whole batch. just_visualise: only draw the plan as
    <eval_dir>/plan.png and return that path. df_config: DF's config, for a Diffusion Forcing
    checkpoint. precision: fp32, bf16 or fp16 for the network's calls (see precision.py); samples at
    16 bits go to a folder named with a _<precision> suffix by default. compile: torch.compile the
    network (the first calls are slow while it compiles). See `prepare_model`.
    """
    # ---- every setting is checked before the model is loaded
    for flag, value, minimum in (("batch_size", batch_size, 1), ("start_index", start_index, 0),
                                 ("sample_idx", sample_idx, 0), ("seed", seed, 0)):
        if value < minimum:
            raise ConfigError(f"--{flag} must be at least {minimum}, got {value}.")
    check_precision(precision)
    if stop_index != DEFAULT and stop_index <= start_index:
        raise ConfigError(f"--stop_index {stop_index} must be larger than --start_index {start_index} "
                          "(or -1 for every test video).")
    config, checkpoint = checkpoint_config(checkpoint_path, df_config)  # read once: config now, weights later
    scheme = scheme_for_checkpoint(
        config, sampling_scheme, T=T, n_obs=n_obs, max_frames=max_frames, max_latent_frames=max_latent_frames,
        noise_schedule=noise_schedule, uncertainty_scale=uncertainty_scale, stabilization_level=stabilization_level,
        chunk_size=chunk_size, optimality=optimality, sampling_steps=sampling_steps, use_ddim=use_ddim, eta=eta,
        clip_denoised=clip_denoised, stabilization=stabilization, clip_noise=clip_noise,
        timestep_respacing=timestep_respacing)
    folder = scheme.folder_name() + ("" if precision == "fp32" else f"_{precision}")
    eval_dir = str(eval_dir or default_eval_dir(checkpoint_path, config, folder))
    check_folder("eval_dir", eval_dir)

    if just_visualise:
        if scheme.adaptive:
            raise ConfigError(f"{scheme.plan} chooses its observed frames from the videos, so its plan cannot be "
                              "drawn without sampling; draw its non-adaptive counterpart instead.")
        os.makedirs(eval_dir, exist_ok=True)
        path = os.path.join(eval_dir, "plan.png")
        draw_plan(scheme.stages(), scheme.T, path)
        return path

    dataset_name = dataset or config.get("dataset") or "bouncing_balls"
    image_size = int(config["image_size"])
    data = get_dataset(dataset_name, split="test", T=max(scheme.n_obs, 1), image_size=image_size)
    if start_index >= len(data):
        raise ConfigError(f"--start_index {start_index} is past the last of the {len(data)} test videos of "
                          f"{dataset_name}.")
    device = device_flag(device)
    check_same_precision(eval_dir, precision)

    # ---- this rank's videos
    rank, world_size = dist_util.setup_dist()
    stop = len(data) if stop_index == DEFAULT else min(stop_index, len(data))
    indices = list(range(start_index, stop))
    slurm_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if slurm_task is not None and stop_index == DEFAULT:  # FDM: without --stop_index, one array task per batch
        indices = indices[int(slurm_task) * batch_size: (int(slurm_task) + 1) * batch_size]
    indices = indices[rank::world_size]  # under mpiexec each rank samples (and writes) its share
    if rank == 0:
        run_config = {"checkpoint": str(checkpoint_path), "dataset": dataset_name, "image_size": image_size,
                      "seed": seed, "data_seed": 0, "precision": precision, "compiled": bool(compile),
                      "batch_invariant": bool(batch_invariant)}
        if df_config is not None:
            run_config["df_config"] = df_config if isinstance(df_config, dict) else str(df_config)
        write_sampling_config(eval_dir, {**run_config, **scheme.to_dict()})
    todo = [i for i in indices if not os.path.exists(sample_path(eval_dir, i, sample_idx))]
    print(f"rank {rank}: {len(todo)} of {len(indices)} videos to sample into {os.path.join(eval_dir, 'samples')}",
          file=sys.stderr)
    if not todo:
        return eval_dir

    # ---- the model, then one batch at a time; each video draws its noise from its own generator
    model, diffusion, _ = load_checkpoint(checkpoint_path, scheme.timestep_respacing, device=device, data=checkpoint,
                                          df_config=df_config)
    check_settings(scheme.stage, diffusion)  # the scheme was checked against the config; this is the diffusion
    model = prepare_model(model, device, batch_invariant=batch_invariant, precision=precision, compile=compile,
                          kv_cache=kv_cache)
    os.makedirs(os.path.join(eval_dir, "samples"), exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch_idx = todo[start: start + batch_size]
        videos = torch.zeros(len(batch_idx), scheme.T, 3, image_size, image_size)
        for j, i in enumerate(batch_idx):
            videos[j, :scheme.n_obs] = data.video(i)[:scheme.n_obs]
        generators = [video_generator(seed, sample_idx, i) for i in batch_idx]
        out = sample_with_scheme(model, diffusion, scheme, videos.to(device), generators, progress=rank == 0)
        frames = to_uint8(out).numpy()
        for j, i in enumerate(batch_idx):
            path = sample_path(eval_dir, i, sample_idx)
            np.save(path + ".tmp.npy", frames[j])
            os.replace(path + ".tmp.npy", path)
    return eval_dir
