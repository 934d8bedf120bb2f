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

Conditional checkpoints (cond_dim, num_classes in their config; `SamplingConditions`): each test
video is driven by its own actions from the dataset by default; `actions` (a .npy file: T x D
reals, or T integers made one-hot) drives every video with the same actions instead; `label`
gives every video a class label; `uncond` shows the model its null condition (a model trained with
cond_drop_prob > 0). `guidance_scale` w != 1 (classifier-free guidance, guidance.py) needs such a
model too. The conditions' source (and the guidance scale, through the scheme) are recorded in
sampling_config.json and name the default results folder, so samples made with different ones
never share a folder.

MCMC refinement (`mcmc_steps` > 0, mcmc.py) needs a checkpoint trained with --energy True; any other
checkpoint is refused before it is loaded. Each video's counts (frame steps proposed and accepted,
gradient and energy evaluations) go to <eval_dir>/mcmc/sample_<index:04d>-<sample_idx>.json beside
its sample, so a resumed or multi-rank run still adds up; at the end their totals and the acceptance
rate are written into sampling_config.json under "mcmc" (`mcmc_summary`).
"""

import copy
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import dist_util
from ..checkpoints import df_to_config, load_checkpoint, read_df_checkpoint, read_df_config, read_model_checkpoint
from ..cli import dataclass_from_dict, device_flag
from ..data.actions import read_actions_file
from ..data.datasets import get_dataset
from ..data.pixels import to_uint8
from ..diffusion import DiffusionConfig
from ..errors import ConfigError, DatasetError
from ..precision import PrecisionModel, check_precision, compile_model
from ..results import CONFIG_FILE, SAMPLE_DIR, find_samples, sample_path, write_json_atomic, write_sampling_config
from .guidance import Conditions
from .kv_cache import CausalCache, supports_cache
from .mcmc import MCMCStats, summarize
from .plan_picture import draw_plan
from .sampler import one_video_at_a_time, sample_with_scheme, stabilization_shown_at, video_generator
from .scheme import Scheme, check_settings

DEFAULT = -1  # a size flag's "use the default"
MCMC_DIR = "mcmc"  # per-video MCMC counts, beside samples/


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
    scheme = Scheme.from_preset(
        sampling_scheme, T=T, max_frames=K, n_obs=size_flag("n_obs", n_obs, None, minimum=0),
        max_latent_frames=size_flag("max_latent_frames", max_latent_frames, None),
        diffusion_config=dataclass_from_dict(DiffusionConfig, config), **settings)
    if scheme.stage.mcmc_steps and not config.get("energy"):
        raise ConfigError(f"--mcmc_steps {scheme.stage.mcmc_steps} refines samples by descending the model's energy, "
                          "but this checkpoint was trained without --energy True, so it has no energy; pass "
                          "--mcmc_steps 0.")
    return scheme


def stabilization_shown(scheme, config):
    """(training-chain timestep the scheme shows stabilized frames at, or None when off; a warning or None).

    A respaced chain keeps only some timesteps (ddim20 of 1000: 0, 50, 100, ...), so a level between
    two of them is rounded down: with ddim20, levels 1 to 50 all show frames at timestep 0 and give
    identical samples. The warning says so and how to get the level asked for.
    """
    level = scheme.stage.stabilization_level
    if not level:
        return None, None
    shown = stabilization_shown_at(scheme.diffusion(dataclass_from_dict(DiffusionConfig, config)), level)
    if shown == level - 1:
        return shown, None
    return shown, (f"warning: stabilization_level {level} asks for timestep {level - 1}, but the respaced chain "
                   f"(--timestep_respacing {scheme.timestep_respacing}) does not keep it, so stabilized frames are "
                   f"shown at timestep {shown}; use --sampling_steps with --use_ddim True instead of "
                   "--timestep_respacing to show them at the level asked for.")


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


def check_same_precision(eval_dir, precision):
    """Refuse to add samples at `precision` to a folder whose samples were made at another precision."""
    check_same_settings(eval_dir, precision=precision)


@dataclass(frozen=True)
class SamplingConditions:
    """Where a sampling run's conditions come from (checked against the checkpoint by `sampling_conditions`).

    source: "none" (an unconditional checkpoint), "dataset" (each test video's own actions),
    "file" (the actions of `actions_file` for every video) or "null" (the model's null condition);
    label: every video's class label (None: no labels).
    """

    source: str = "none"
    actions_file: Optional[str] = None
    label: Optional[int] = None

    def describe(self):
        """One string for sampling_config.json's "conditions" (PINNED_SETTINGS compares it)."""
        text = {"none": "none", "dataset": "dataset actions", "null": "null"}.get(self.source)
        if self.source == "file":
            text = f"actions from {self.actions_file}"
        return text if self.label is None else f"{text}, label {self.label}"

    def folder_suffix(self):
        """What the default results folder adds: the dataset's own conditions (or none) add nothing."""
        suffix = ""
        if self.source == "file":
            suffix += "_actions-" + os.path.splitext(os.path.basename(self.actions_file))[0]
        elif self.source == "null":
            suffix += "_uncond"
        if self.label is not None:
            suffix += f"_label{self.label}"
        return suffix


def checkpoint_conditioning(config):
    """(cond_dim, num_classes, has null conditions) of a checkpoint's flat config; older configs: unconditional."""
    return (int(config.get("cond_dim") or 0), int(config.get("num_classes") or 0),
            float(config.get("cond_drop_prob") or 0) > 0)


def sampling_conditions(config, checkpoint_path, *, actions=None, label=None, uncond=False, guidance_scale=1.0):
    """The SamplingConditions the flags ask for, or a one-sentence ConfigError if the checkpoint cannot take them.

    Checks only the flags against the checkpoint; `read_actions` and `dataset_actions` check the
    actions themselves.
    """
    cond_dim, num_classes, has_null = checkpoint_conditioning(config)
    guiding = float(guidance_scale) != 1.0
    if not (cond_dim or num_classes):
        if actions is not None:
            raise ConfigError(f"--actions {actions}: checkpoint {checkpoint_path} is unconditional (trained without "
                              f"--cond_dim), so actions cannot drive it.")
        if label is not None:
            raise ConfigError(f"--label {label}: checkpoint {checkpoint_path} is unconditional (trained without "
                              f"--num_classes), so it takes no class label.")
        if guiding:
            raise ConfigError(f"--guidance_scale {guidance_scale:g} needs a conditional model trained with "
                              f"--cond_drop_prob > 0, but checkpoint {checkpoint_path} is unconditional.")
        if uncond:
            raise ConfigError(f"--uncond True: checkpoint {checkpoint_path} is unconditional, so its samples are "
                              f"unconditional already; leave the flag out.")
        return SamplingConditions("none")
    if (guiding or uncond) and not has_null:
        flag = "--uncond True" if uncond else f"--guidance_scale {guidance_scale:g}"
        raise ConfigError(f"{flag} needs the null condition of a model trained with --cond_drop_prob > 0, but "
                          f"checkpoint {checkpoint_path} was trained with --cond_drop_prob 0.")
    if uncond:
        if guiding or actions is not None or label is not None:
            raise ConfigError("--uncond True samples with the null condition alone, so it takes no --actions, "
                              "--label or --guidance_scale other than 1.")
        return SamplingConditions("null")
    if actions is not None and not cond_dim:
        raise ConfigError(f"--actions {actions}: checkpoint {checkpoint_path} is conditioned on class labels only, "
                          f"not on per-frame actions.")
    if label is not None and not num_classes:
        raise ConfigError(f"--label {label}: checkpoint {checkpoint_path} is conditioned on actions only, not on "
                          f"class labels.")
    if num_classes:
        if label is None:
            raise ConfigError(f"checkpoint {checkpoint_path} is conditioned on class labels ({num_classes} classes) "
                              f"and the datasets have none: pass --label L with 0 <= L < {num_classes}, or "
                              f"--uncond True.")
        if not 0 <= label < num_classes:
            raise ConfigError(f"--label {label} is out of range: checkpoint {checkpoint_path} knows labels 0 to "
                              f"{num_classes - 1}.")
    if not cond_dim:
        return SamplingConditions("none", label=label)
    if actions is not None:
        return SamplingConditions("file", actions_file=os.path.abspath(str(actions)), label=label)
    return SamplingConditions("dataset", label=label)


def read_actions(path, T, cond_dim):
    """float32 [T x cond_dim] from an --actions file: its first T rows; T integers become one-hot vectors.

    A [T x D] real array must have D = cond_dim; integers must lie in [0, cond_dim). ConfigError
    (or DatasetError for an unreadable file) in one sentence otherwise.
    """
    stored = read_actions_file(path)
    if len(stored) < T:
        raise ConfigError(f"--actions {path} holds {len(stored)} actions, fewer than the --T {T} frames it must "
                          f"cover (one action per frame).")
    stored = stored[:T]
    if stored.ndim == 1:
        if stored.size and stored.max() >= cond_dim:
            raise ConfigError(f"--actions {path} holds action {int(stored.max())}, but the checkpoint knows "
                              f"{cond_dim} actions (0 to {cond_dim - 1}).")
        return np.eye(cond_dim, dtype=np.float32)[stored]
    if stored.shape[1] != cond_dim:
        raise ConfigError(f"--actions {path} has {stored.shape[1]} values per frame, but the checkpoint is "
                          f"conditioned on {cond_dim} (its cond_dim).")
    return stored.astype(np.float32)


def dataset_actions(data, indices, T, cond_dim, dataset_name):
    """{index: float32 [T x cond_dim] tensor} of test videos' own actions over T frames; ConfigError if absent.

    The videos are those of `data` (built as for the given frames, so an index names the same video),
    read up to T frames as the ground truth is (evaluation/ground_truth.py).
    """
    check_dataset_actions(data, cond_dim, dataset_name)
    view = copy.copy(data)  # the same videos, read up to T frames
    view.T = T
    found = {}
    for i in indices:
        try:
            found[i] = torch.from_numpy(np.ascontiguousarray(view.frames_and_actions(i)[1]))
        except DatasetError as e:
            raise ConfigError(f"--T {T}: the actions of test video {i} of {dataset_name} cannot cover {T} frames "
                              f"({e}); pass --actions FILE.npy or a smaller --T.") from None
    return found


def check_dataset_actions(data, cond_dim, dataset_name):
    """A ConfigError unless the dataset `data` has actions as wide as the checkpoint's cond_dim."""
    if data.action_dim is None:
        raise ConfigError(f"the checkpoint is conditioned on actions, but dataset {dataset_name} has none: pass "
                          f"--actions FILE.npy (T x {cond_dim} values, or T integers) or --uncond True.")
    if data.action_dim != cond_dim:
        raise ConfigError(f"the actions of dataset {dataset_name} have {data.action_dim} values per frame, but the "
                          f"checkpoint is conditioned on {cond_dim}; pass --actions FILE.npy or another --dataset.")


def batch_conditions(conditions, batch_idx, own_actions, file_actions, device):
    """The guidance.Conditions of the videos `batch_idx` (None for an unconditional checkpoint)."""
    if conditions.source == "none" and conditions.label is None:
        return None
    B = len(batch_idx)
    actions = None
    if conditions.source == "dataset":
        actions = torch.stack([own_actions[i] for i in batch_idx]).to(device)
    elif conditions.source == "file":
        actions = file_actions[None].expand(B, -1, -1).to(device)
    labels = None if conditions.label is None else torch.full((B,), conditions.label, dtype=torch.long, device=device)
    return Conditions(actions=actions, labels=labels, null=conditions.source == "null")


def sample_dataset(checkpoint_path, sampling_scheme="autoreg", *, T=DEFAULT, n_obs=DEFAULT, max_frames=DEFAULT,
                   max_latent_frames=DEFAULT, noise_schedule=None, uncertainty_scale=None, stabilization_level=None,
                   chunk_size=None, sampling_steps=None, optimality=None, timestep_respacing="", use_ddim=None,
                   eta=None, clip_denoised=None, stabilization=None, clip_noise=None, dataset=None, eval_dir=None,
                   start_index=0, stop_index=DEFAULT, sample_idx=0, batch_size=8, batch_invariant=False, seed=0,
                   device=None, just_visualise=False, df_config=None, precision="fp32", compile=False, kv_cache=None,
                   guidance_scale=1.0, actions=None, label=None, uncond=False, mcmc_steps=None, mcmc_step_size=None,
                   mcmc_noise=None, mcmc_clamp=None):
    """Sample test videos start_index..stop_index-1 (-1: all) with a scheme; returns the eval dir.

    The scheme is the preset `sampling_scheme` with the given overrides (see `Scheme.from_preset`;
    None: the checkpoint config's, see `sampler_defaults`, else the preset's). batch_invariant:
    call the model per video (slower) so samples are bit-identical for any batch size or rank count;
    False (default) calls it on the whole batch. just_visualise: only draw the plan as
    <eval_dir>/plan.png and return that path. df_config: DF's config, for a Diffusion Forcing
    checkpoint. precision: fp32, bf16 or fp16 for the network's calls (see precision.py); samples at
    16 bits go to a folder named with a _<precision> suffix by default. compile: torch.compile the
    network (the first calls are slow while it compiles). See `prepare_model`. guidance_scale,
    actions, label, uncond: a conditional checkpoint's conditions and classifier-free guidance (see
    the module docstring); label None (or -1) means no label. mcmc_steps, mcmc_step_size, mcmc_noise,
    mcmc_clamp: MCMC refinement of an energy checkpoint (sampling/mcmc.py; None: off / the defaults).
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
        timestep_respacing=timestep_respacing, guidance_scale=guidance_scale, mcmc_steps=mcmc_steps,
        mcmc_step_size=mcmc_step_size, mcmc_noise=mcmc_noise, mcmc_clamp=mcmc_clamp)
    label = None if label is None or label == DEFAULT else int(label)
    conditions = sampling_conditions(config, checkpoint_path, actions=actions, label=label, uncond=bool(uncond),
                                     guidance_scale=scheme.stage.guidance_scale)
    cond_dim = checkpoint_conditioning(config)[0]
    file_actions = None
    if conditions.source == "file":
        file_actions = torch.from_numpy(read_actions(actions, scheme.T, cond_dim))
    folder = scheme.folder_name() + ("" if precision == "fp32" else f"_{precision}") + conditions.folder_suffix()
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
    # The training run's frame skip, for its own dataset (dmlab, minecraft); another dataset is read as it is.
    frame_skip = int(config.get("frame_skip") or 1) if dataset_name == config.get("dataset") else 1
    data = get_dataset(dataset_name, split="test", T=max(scheme.n_obs, 1), image_size=image_size,
                       frame_skip=frame_skip)
    if start_index >= len(data):
        raise ConfigError(f"--start_index {start_index} is past the last of the {len(data)} test videos of "
                          f"{dataset_name}.")
    if conditions.source == "dataset":
        check_dataset_actions(data, cond_dim, dataset_name)
    device = device_flag(device)
    check_same_settings(eval_dir, precision=precision, guidance_scale=scheme.stage.guidance_scale,
                        conditions=conditions.describe())

    # ---- this rank's videos
    rank, world_size = dist_util.setup_dist()
    stop = len(data) if stop_index == DEFAULT else min(stop_index, len(data))
    indices = list(range(start_index, stop))
    slurm_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if slurm_task is not None and stop_index == DEFAULT:  # FDM: without --stop_index, one array task per batch
        indices = indices[int(slurm_task) * batch_size: (int(slurm_task) + 1) * batch_size]
    indices = indices[rank::world_size]  # under mpiexec each rank samples (and writes) its share
    if rank == 0:
        stab_shown, stab_warning = stabilization_shown(scheme, config)
        if stab_warning:
            print(stab_warning, file=sys.stderr)
        run_config = {"checkpoint": str(checkpoint_path), "dataset": dataset_name, "image_size": image_size,
                      "seed": seed, "data_seed": 0, "precision": precision, "compiled": bool(compile),
                      "batch_invariant": bool(batch_invariant), "frame_skip": frame_skip,
                      "conditions": conditions.describe(), "actions_source": conditions.source,
                      "actions_file": conditions.actions_file, "label": conditions.label,
                      "stabilization_timestep": stab_shown}
        if df_config is not None:
            run_config["df_config"] = df_config if isinstance(df_config, dict) else str(df_config)
        write_sampling_config(eval_dir, {**run_config, **scheme.to_dict()})
    todo = [i for i in indices if not os.path.exists(sample_path(eval_dir, i, sample_idx))]
    print(f"rank {rank}: {len(todo)} of {len(indices)} videos to sample into {os.path.join(eval_dir, 'samples')}",
          file=sys.stderr)
    if not todo:
        return record_mcmc(eval_dir, scheme, rank)
    own_actions = {}  # each video's own actions, read (and checked) before the model is loaded
    if conditions.source == "dataset":
        own_actions = dataset_actions(data, todo, scheme.T, cond_dim, dataset_name)

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
        stats = MCMCStats(len(batch_idx)) if scheme.stage.mcmc_steps else None
        out = sample_with_scheme(model, diffusion, scheme, videos.to(device), generators, progress=rank == 0,
                                 conditions=batch_conditions(conditions, batch_idx, own_actions, file_actions, device),
                                 **({} if stats is None else {"mcmc_stats": stats}))
        frames = to_uint8(out).numpy()
        for j, i in enumerate(batch_idx):
            if stats is not None:  # before the sample: a sample never exists without its counts
                write_json_atomic(mcmc_stats_path(eval_dir, i, sample_idx), stats.per_video(j))
            path = sample_path(eval_dir, i, sample_idx)
            np.save(path + ".tmp.npy", frames[j])
            os.replace(path + ".tmp.npy", path)
    return record_mcmc(eval_dir, scheme, rank)


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
