"""What a run measures on held-out test videos while it trains, and the checks of the measurement flags.

Validation (--val_interval N, --val_videos k): a fixed set of k test clips of the run's dataset,
each with fixed frame masks, timesteps and noise, and the EMA model's diffusion loss on them:
`val_loss`, overall and per quarter of the timestep range (`val_loss_q0..q3`, the rule of the
training loss's quarters). The examples are made by the training code itself (batches.py's
`training_batch` and `example_losses`: the same masks, padding frames, noise modes and loss
weights), but from generators keyed by the clip alone, never by the step, the rank or the training
seed, with uniform timesteps (a loss-aware schedule sampler's distribution moves during training).
So every evaluation sees the very same inputs: a curve compares across steps, across a resume,
across rank counts and across runs of the same dataset and frame window. Under MPI each rank
takes a contiguous share of the clips and the per-clip losses are gathered in clip order, so 1 and
N ranks sum the same numbers.

Evaluation (--eval_interval N, --eval_videos k, --eval_scheme): k test videos continued from
their first frames by a sampling scheme from the EMA model (DDIM over --eval_respacing steps,
like previews; noise from fixed per-video generators, seed 0, as video_sample.py's default), scored
against the ground truth with evaluation.evaluate's metrics: PSNR and SSIM over the generated
frames always, cue recall on cue_recall, the on-manifold fraction on bouncing_balls and
cue_recall, action following on bouncing_balls_actions with an action-conditioned model, and FVD
against the true test videos when --eval_i3d_path names the I3D network (loaded once, at start). Logged
as eval_<metric>; the samples and metrics.json go to <run dir>/evals/step<step>/ and a grid of
videos to wandb. Rank 0 alone evaluates.

TrainLoop runs both on a copy of the EMA model and restores every global RNG state afterwards,
so neither changes the training run. keep_best.py lists the figures --keep_best can track.
"""

import json
import math
import os

import numpy as np
import torch

from .. import dist_util
from ..data import cue_recall as cue
from ..data.datasets import DATASETS, default_T, get_dataset
from ..data.pixels import to_uint8
from ..diffusion.respace import space_timesteps
from ..errors import ConfigError, UserError
from ..evaluation import action_following as following
from ..evaluation import on_manifold as manifold
from ..evaluation.evaluate import compute_metrics, load_detector
from ..sampling.guidance import Conditions
from ..sampling.request import SchemeRequest, scheme_for_checkpoint
from ..sampling.sampler import sample_with_scheme, video_generator
from ..sampling.scheme import PRESETS
from . import checkpoint_io
from .batches import example_losses, timestep_quarters, training_batch
from .keep_best import EVAL_FIGURES, VAL_FIGURES, figure_direction
from .randomness import generators_of

# A validation clip's generators come from (VALIDATION_KEY, clip index, VALIDATION_KEY): training
# examples are keyed (seed, step, example index), and no seed is this 56-bit number.
VALIDATION_KEY = 0x76616C69646174
EVAL_SEED = 0  # the sampling noise of evaluations: video_sample.py's default seed


def validation_generators(index):
    """(numpy, torch) generators of validation clip `index`: a function of the index alone."""
    return generators_of([VALIDATION_KEY, index, VALIDATION_KEY])


def share(count, rank, world_size):
    """The contiguous range of the `count` clips that `rank` of `world_size` computes."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


class ValidationSet:
    """This rank's share of k fixed validation examples (a training batch, on the CPU) and their loss.

    Build it with `from_dataset`; `figures(network, diffusion)` evaluates a network on the whole set.
    """

    def __init__(self, batch, indices, count, pad_with_random_frames):
        self.batch = batch  # training_batch's dict of this rank's clips, or None when it has none
        self.indices = list(indices)  # their clip indices
        self.count = count  # clips in the whole set, over every rank
        self.pad_with_random_frames = pad_with_random_frames

    @classmethod
    def from_dataset(cls, dataset, count, *, max_frames, noise_mode, num_timesteps, pad_with_random_frames=True,
                     with_actions=False, rank=0, world_size=1):
        """Clips 0..count-1 of `dataset` (the test split, at the run's T and image size), this rank's share.

        Each clip is the first T frames of its test video; its padding frames come from test video
        (index + count) mod n, outside the set when the split has 2 x count videos.
        """
        n = len(dataset)
        if count > n:
            raise ConfigError(f"--val_videos {count} is more than the {n} test videos of dataset '{dataset.name}'.")
        indices = share(count, rank, world_size)
        if not indices:
            return cls(None, indices, count, pad_with_random_frames)

        def read(i):
            return dataset.video_and_actions(i) if with_actions else (dataset.video(i), None)

        clips = [read(i) for i in indices]
        pads = [read((i + count) % n) for i in indices] if pad_with_random_frames else None
        videos = torch.stack([v for v, _ in clips])
        actions = torch.stack([a for _, a in clips]) if with_actions else None
        batch = training_batch(
            videos, None if pads is None else torch.stack([v for v, _ in pads]), first_index=indices[0], seed=0,
            step=0, max_frames=max_frames, noise_mode=noise_mode, num_timesteps=num_timesteps,
            actions=actions, pad_actions=torch.stack([a for _, a in pads]) if with_actions and pads else None,
            generators=validation_generators)
        return cls(batch, indices, count, pad_with_random_frames)

    def clip_losses(self, network, diffusion, batch_size, device):
        """[(clip index, loss, timestep quarter)] of this rank's clips, in batches of `batch_size`."""
        found = []
        if self.batch is None:
            return found
        for start in range(0, len(self.indices), batch_size):
            end = min(start + batch_size, len(self.indices))
            part = {k: v[start:end].to(device) for k, v in self.batch.items()}
            terms, _, _, trained, _ = example_losses(network, diffusion, part, self.pad_with_random_frames)
            quarters = timestep_quarters(part["t"], trained, diffusion.num_timesteps)
            found += zip(self.indices[start:end], terms["loss"].float().cpu().tolist(), quarters.cpu().tolist())
        return found

    def figures(self, network, diffusion, batch_size=8, device="cpu"):
        """{val_loss, val_loss_q<n>...} of `network` (the same on every rank; quarters without clips left out)."""
        with torch.no_grad():
            local = self.clip_losses(network, diffusion, batch_size, device)
        clips = sorted(c for part in dist_util.all_gather_object(local) for c in part)
        return summarize(clips)


def summarize(clips):
    """val_loss figures of [(clip index, loss, quarter)], summed in clip order."""
    figures = {"val_loss": math.fsum(loss for _, loss, _ in clips) / max(len(clips), 1)}
    for q in range(4):
        losses = [loss for _, loss, quarter in clips if quarter == q]
        if losses:
            figures[f"val_loss_q{q}"] = math.fsum(losses) / len(losses)
    return figures


def make_validation(train_cfg, model_cfg, num_timesteps, rank=0, world_size=1):
    """The run's ValidationSet (None with --val_interval 0), reading this rank's share of the test clips."""
    if train_cfg.val_interval <= 0:
        return None
    dataset = get_dataset(train_cfg.dataset, split="test", T=train_cfg.T, image_size=model_cfg.image_size,
                          frame_skip=train_cfg.frame_skip)
    return ValidationSet.from_dataset(dataset, train_cfg.val_videos, max_frames=train_cfg.max_frames,
                                      noise_mode=train_cfg.noise_mode, num_timesteps=num_timesteps,
                                      pad_with_random_frames=train_cfg.pad_with_random_frames,
                                      with_actions=model_cfg.cond_dim > 0, rank=rank, world_size=world_size)


# ----------------------------------------------------------------------------- evaluation by sampling


class SampleEvaluation:
    """k test videos sampled with one scheme from a model, and their metrics: call it with (step, model, logger)."""

    def __init__(self, *, dataset_name, scheme, diffusion, truth, metrics, actions=None, batch_size=8,
                 run_dir=None, detector=None):
        self.dataset_name = dataset_name
        self.scheme = scheme
        self.diffusion = diffusion  # respaced as the scheme says
        self.truth = truth  # float [k x T x C x H x W] in [-1, 1]: the first n_obs frames are given
        self.metrics = metrics
        self.actions = actions  # [k x T x D] each video's own actions (an action-conditioned model), or None
        self.batch_size = batch_size
        self.run_dir = run_dir
        self.detector = detector  # the I3D network when FVD is measured

    @classmethod
    def from_config(cls, train_cfg, model_cfg, diffusion_cfg, run_dir=None):
        """The run's evaluation (None with --eval_interval 0); every flag is checked and the test videos read."""
        if train_cfg.eval_interval <= 0:
            return None
        K, name = train_cfg.max_frames, train_cfg.eval_scheme
        T = train_cfg.eval_T if train_cfg.eval_T != -1 else min(2 * K, train_cfg.T)
        if train_cfg.dataset in DATASETS and DATASETS[train_cfg.dataset].T is not None:
            length = default_T(train_cfg.dataset, train_cfg.frame_skip)
            if T > length:
                raise ConfigError(f"--eval_T {T} is longer than the videos of dataset '{train_cfg.dataset}' "
                                  f"({length} frames).")
        preset = PRESETS[name]
        n_obs = K - (preset.chunk_size or K // 2)  # as Scheme.from_preset sets it
        if T <= n_obs:
            raise ConfigError(f"--eval_T {T} leaves no frame to generate after the {n_obs} frames --eval_scheme "
                              f"{name} observes at --max_frames {K}; pass --eval_T {n_obs + 1} or more.")
        respacing, steps = train_cfg.eval_respacing, diffusion_cfg.diffusion_steps
        try:
            space_timesteps(steps, respacing or [steps])
        except ValueError as e:
            raise ConfigError(f"--eval_respacing '{respacing}' does not fit --diffusion_steps {steps} "
                              f"({str(e).rstrip('.')}).") from None
        config = {**vars(train_cfg), **vars(model_cfg), **vars(diffusion_cfg)}
        try:
            request = SchemeRequest(name, T=T, timestep_respacing=train_cfg.eval_respacing)
            scheme = scheme_for_checkpoint(config, request.with_settings(use_ddim=True))
        except UserError as e:
            raise ConfigError(f"--eval_scheme {name} cannot sample --eval_T {T} frames with --max_frames {K} and "
                              f"--eval_respacing '{train_cfg.eval_respacing}': {str(e).rstrip('.')}.") from None
        with_actions = model_cfg.cond_dim > 0
        metrics = ["psnr", "ssim"]
        if train_cfg.dataset == "cue_recall" and T > cue.CUE_RETURN:  # the cue comes back at frame CUE_RETURN
            metrics.append("cue_recall")
        if train_cfg.keep_best == "eval_cue_recall" and "cue_recall" not in metrics:
            raise ConfigError(f"--keep_best eval_cue_recall needs videos in which the cue returns: pass --eval_T "
                              f"{cue.CUE_RETURN + 1} or more.")
        if train_cfg.dataset in manifold.DATASETS:
            metrics.append("on_manifold")
        if train_cfg.dataset == following.DATASET and with_actions:
            metrics.append("action_following")
        if train_cfg.keep_best == "eval_action_following" and "action_following" not in metrics:
            raise ConfigError("--keep_best eval_action_following needs a model conditioned on the actions "
                              "(--cond_dim -1).")
        count = train_cfg.eval_videos
        if train_cfg.eval_i3d_path and count < 2:
            raise ConfigError(f"FVD compares sets of videos: --eval_i3d_path needs --eval_videos 2 or more, got {count}.")
        dataset = get_dataset(train_cfg.dataset, split="test", T=T, image_size=model_cfg.image_size,
                              frame_skip=train_cfg.frame_skip)
        if count > len(dataset):
            raise ConfigError(f"--eval_videos {count} is more than the {len(dataset)} test videos of dataset "
                              f"'{train_cfg.dataset}'.")
        detector = None
        if train_cfg.eval_i3d_path:
            try:
                detector = load_detector(train_cfg.eval_i3d_path)
            except UserError as e:
                raise ConfigError(str(e).replace("--i3d_path", "--eval_i3d_path", 1)) from None
            metrics.append("fvd")
        clips = [dataset.video_and_actions(i) if with_actions else (dataset.video(i), None) for i in range(count)]
        return cls(dataset_name=train_cfg.dataset, scheme=scheme, diffusion=scheme.diffusion(diffusion_cfg),
                   truth=torch.stack([v for v, _ in clips]), metrics=metrics,
                   actions=torch.stack([a for _, a in clips]) if with_actions else None,
                   batch_size=train_cfg.batch_size, run_dir=run_dir, detector=detector)

    def sample(self, model):
        """uint8 [k x T x C x H x W]: each test video continued from its first n_obs frames by `model`."""
        device = next(model.parameters()).device
        n_obs = self.scheme.n_obs
        out = []
        for start in range(0, len(self.truth), self.batch_size):
            index = list(range(start, min(start + self.batch_size, len(self.truth))))
            videos = torch.zeros_like(self.truth[index])
            videos[:, :n_obs] = self.truth[index, :n_obs]
            conditions = None if self.actions is None else Conditions(actions=self.actions[index].to(device))
            generators = [video_generator(EVAL_SEED, 0, i) for i in index]
            with torch.no_grad():
                frames = sample_with_scheme(model, self.diffusion, self.scheme, videos.to(device), generators,
                                            conditions=conditions)
            out.append(to_uint8(frames))
        return torch.cat(out).numpy()

    def __call__(self, step, model, logger=None):
        """Sample, score, write <run dir>/evals/step<step>/ and log the videos; returns {eval_<metric>: value}."""
        samples = self.sample(model)
        truth = to_uint8(self.truth).numpy()
        actions = None if self.actions is None else self.actions.numpy()
        scores = compute_metrics(samples, truth, self.scheme.n_obs, self.metrics, self.dataset_name, actions=actions,
                                 detector=self.detector)
        figures = {f"eval_{name}": float(value) for name, value in scores["overall"].items()
                   if value is not None}  # cue_recall_when_shown has no value when no video shows the cue
        if self.run_dir is not None and checkpoint_io.is_local(self.run_dir):
            folder = os.path.join(self.run_dir, "evals", f"step{step:06d}")
            os.makedirs(folder, exist_ok=True)
            for i, video in enumerate(samples):
                np.save(os.path.join(folder, f"sample_{i:04d}.npy"), video)
            summary = {"step": step, "figures": figures, "per_frame": scores["per_frame"],
                       "skipped": scores["skipped"], "scheme": self.scheme.to_dict()}
            checkpoint_io.atomic_write_bytes(json.dumps(summary, indent=2).encode(),
                                             os.path.join(folder, "metrics.json"))
        if logger is not None:
            logger.log_video("eval_samples", video_grid(samples, truth), step)
        return figures


def video_grid(samples, truth, columns=4):
    """uint8 [T x C x 2H x nW]: up to `columns` samples side by side above their ground truth."""
    top = np.concatenate(list(samples[:columns]), axis=-1)
    bottom = np.concatenate(list(truth[:columns]), axis=-1)
    return np.concatenate([top, bottom], axis=-2)


# ----------------------------------------------------------------------------- the measurement flags


def check_measurements(cfg):
    """Raise ConfigError for measurement flags of TrainConfig `cfg` that cannot work (cheap: no files read)."""
    if cfg.eval_scheme not in PRESETS:
        raise ConfigError(f"--eval_scheme {cfg.eval_scheme} is not a sampling scheme; valid names are "
                          f"{', '.join(PRESETS)}.")
    if not cfg.keep_best:
        return
    figure_direction(cfg.keep_best)
    if cfg.keep_best in VAL_FIGURES and cfg.val_interval <= 0:
        raise ConfigError(f"--keep_best {cfg.keep_best} needs validation: pass --val_interval N (N > 0) too.")
    if cfg.keep_best in EVAL_FIGURES:
        if cfg.eval_interval <= 0:
            raise ConfigError(f"--keep_best {cfg.keep_best} needs evaluation: pass --eval_interval N (N > 0) too.")
        datasets = EVAL_FIGURES[cfg.keep_best]
        if cfg.keep_best == "eval_fvd" and not cfg.eval_i3d_path:
            raise ConfigError("--keep_best eval_fvd needs the I3D network: pass --eval_i3d_path too.")
        if datasets is not None and cfg.dataset not in datasets:
            raise ConfigError(f"--keep_best {cfg.keep_best} is measured on the {' and '.join(datasets)} "
                              f"dataset{'s' if len(datasets) > 1 else ''} only, not on '{cfg.dataset}'.")
