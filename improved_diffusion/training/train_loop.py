"""TrainLoop: data-parallel training with EMA, crash-safe checkpoints and exact resume.

Randomness is a pure function of the step, so a resumed run needs no saved RNG state to
continue exactly where it stopped:

- data: `data(step)` must be a pure function of (seed, step, rank), as
  video_datasets.train_batches is;
- frame masks, timesteps and noise: drawn per example from generators seeded with
  (seed, step, global example index), where rank r's local example j is global example
  r * batch_size + j. So N ranks with batch b see exactly the examples one rank with
  batch N * b would (given the same videos), and the effective batch is b * N;
- torch's global RNG (dropout is its only user in training): reseeded every step from
  (seed, step, rank). Dropout masks are the one thing that depends on how the global
  batch is split across ranks.

SIGTERM or SIGUSR1 (what Slurm sends before pre-empting a job) makes every rank finish
the current step, save it and raise Preempted, so a pre-empted job loses nothing.

Precision (--precision bf16|fp16, or FDM's --use_fp16 True): only the network's forward runs
under autocast (precision.PrecisionModel), and its output comes back as float32, so the loss
is computed and reduced in float32; weights, gradients, optimizer state, EMAs and checkpoints
stay float32. fp16 also scales the loss (torch.amp.GradScaler): a step whose scaled gradients
overflow is skipped and the scale halved, which is the scaler working, not a non-finite step.
--compile True trains through torch.compile(network) (compile_network); EMAs and checkpoints use
the uncompiled model, so their state_dict keys are the plain ones.

Conditions: `data(step)` may return (videos, actions, labels) instead of videos, actions being
[2B x T x D] per-frame vectors (or None) and labels [2B] class labels (or None). Actions are
gathered with the frames' indices (frame_masks.py); labels go with their video. With
cond_drop_prob p > 0 each example's conditions are replaced by the model's null ones with
probability p, drawn from the example's own generator after its masks, so a resumed run repeats it.
"""

import contextlib
import copy
import math
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .. import dist_util
from ..checkpoints import read_checkpoint_file, read_model_checkpoint
from ..errors import CheckpointError, ConfigError, TrainingError
from ..precision import PrecisionModel, check_precision, compile_model
from . import checkpoint_io
from .frame_masks import NOISE_MODES, training_example
from .timestep_sampler import SCHEDULE_SAMPLERS, create_schedule_sampler, importance_weights


@dataclass
class TrainConfig:
    """FDM's training flags with FDM's defaults (scripts/video_train.py), then ours."""

    dataset: str = ""  # required: a registered name or a folder of videos
    schedule_sampler: str = "uniform"  # uniform | loss-second-moment (see timestep_sampler)
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0  # linear decay of lr to 0 at this step (0: constant)
    batch_size: int = 1  # per rank: the effective batch is batch_size x number of ranks
    microbatch: int = -1  # <= 0: no gradient accumulation
    ema_rate: str = "0.9999"  # comma-separated list
    log_interval: int = 10
    save_interval: int = 50000
    resume_checkpoint: str = ""  # start a new run from these weights (FDM's meaning)
    use_fp16: bool = False  # FDM's flag: True means --precision fp16
    fp16_scale_growth: float = 1e-3  # fp16 loss scale growth per step (FDM's, in log2 units), see grad_scaler
    resume_id: str = ""  # FDM's spelling of --wandb_id
    num_workers: int = -1  # threads reading videos; -1: number of cores - 1 (FDM's rule)
    pad_with_random_frames: bool = True
    max_frames: int = 20
    T: int = -1  # video length to train on; -1: the dataset's default
    sample_interval: int = 50000  # <= 0: no previews
    preview_mcmc_steps: int = 0  # energy models: MCMC steps in previews, logging preview_mcmc_acceptance
    noise_mode: str = "fdm"  # fdm | diffusion_forcing | mixed
    max_steps: int = 0  # stop after this many steps (0: run forever, or until lr_anneal_steps)
    seed: int = 0
    checkpoint_dir: str = "checkpoints"
    wandb_id: str = ""  # resume this run
    keep_last: int = 0  # keep only the newest K checkpoint steps (0: keep all)
    max_nonfinite_steps: int = 20  # stop after this many consecutive non-finite losses
    on_bad_video: str = "stop"  # stop | skip: what an unreadable or malformed video does to training
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps (0: none), see lr_at
    adam_betas: str = "0.9,0.999"  # AdamW's (beta1, beta2); Diffusion Forcing's video recipe uses 0.9,0.99
    grad_clip: float = 0.0  # clip the gradient's global 2-norm to this (0: no clipping)
    precision: str = field(default="fp32", metadata={"help": (
        "the network's forward runs in this precision (autocast); weights, optimizer state, EMAs and "
        "checkpoints stay float32; fp16 also scales the loss (FDM's --use_fp16 True means fp16)")})
    compile: bool = field(default=False, metadata={"help": (
        "train through torch.compile(network) (the first steps compile; checkpoints are unchanged)")})
    frame_skip: int = field(default=1, metadata={"help": (
        "keep every k-th frame of the dataset's videos, with the action of each kept frame (dmlab and minecraft, "
        "as Diffusion Forcing; the default --T becomes the episode length // k)")})
    val_interval: int = field(default=0, metadata={"help": (
        "every N steps, log val_loss: the EMA model's diffusion loss on --val_videos fixed test clips, with fixed "
        "frame masks, timesteps and noise, so curves compare across steps and resumes (0: off)")})
    val_videos: int = field(default=16, metadata={"help": (
        "test clips in the validation set (split across ranks); part of what val_loss means, so a resumed run "
        "keeps its own")})
    eval_interval: int = field(default=0, metadata={"help": (
        "every N steps, sample --eval_videos test videos from the EMA model with --eval_scheme and log their "
        "metrics (eval_psnr, eval_ssim, ...) and videos, written to <run dir>/evals/step<N>/ (0: off)")})
    eval_videos: int = field(default=8, metadata={"help": "test videos sampled at each evaluation"})
    eval_scheme: str = field(default="autoreg", metadata={"help": "the sampling scheme of evaluations (any registered name)"})
    eval_T: int = field(default=-1, metadata={"help": (
        "length of the videos sampled at evaluations (-1: min(2 x max_frames, T))")})
    eval_respacing: str = field(default="ddim25", metadata={"help": (
        "timestep respacing of evaluation sampling (DDIM, as previews; '' samples the whole chain)")})
    eval_i3d_path: str = field(default="", metadata={"help": (
        "the I3D TorchScript file FVD needs (StyleGAN-V's i3d_torchscript.pt): evaluations then also log eval_fvd "
        "between the sampled and the true test videos (needs --eval_videos 2 or more); empty: no FVD")})
    keep_best: str = field(default="", metadata={"help": (
        "also keep the EMA checkpoint with the best value of this figure as <run dir>/best_<figure>.pt: val_loss "
        "(or val_loss_q0..3; lower is better, needs --val_interval) or an eval figure such as eval_psnr, eval_ssim "
        "(needs --eval_interval); empty: off")})

    def validate(self):
        """Raise ConfigError naming the first flag that training cannot run with (cheap: no files read).

        T == -1 (the dataset's length) must be resolved before max_frames is compared with it.
        """
        if not self.dataset:
            raise ConfigError("--dataset is required: a registered dataset name or a folder of videos.")
        for name in ("batch_size", "log_interval", "save_interval", "max_frames", "max_nonfinite_steps", "frame_skip"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("lr_anneal_steps", "max_steps", "keep_last", "seed", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 or positive, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}.")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight_decay must be 0 or positive, got {self.weight_decay}.")
        parse_ema_rates(self.ema_rate)
        parse_adam_betas(self.adam_betas)
        if not self.grad_clip >= 0:
            raise ConfigError(f"--grad_clip must be 0 (no clipping) or positive, got {self.grad_clip}.")
        if self.T != -1 and self.T < 1:
            raise ConfigError(f"--T must be -1 (the dataset's length) or positive, got {self.T}.")
        if self.T != -1 and self.max_frames > self.T:
            raise ConfigError(f"--max_frames {self.max_frames} is larger than --T {self.T}: "
                              f"an example cannot hold more frames than its video has.")
        if self.num_workers < -1:
            raise ConfigError(f"--num_workers must be -1 (cores - 1) or at least 0, got {self.num_workers}.")
        check_precision(self.precision)
        if self.use_fp16 and self.precision not in ("fp16", "fp32"):
            raise ConfigError(f"--use_fp16 True means --precision fp16, which contradicts --precision "
                              f"{self.precision}: give only one of them.")
        if not self.fp16_scale_growth >= 0:
            raise ConfigError(f"--fp16_scale_growth must be 0 or positive, got {self.fp16_scale_growth}.")
        for name, allowed in (("noise_mode", NOISE_MODES), ("schedule_sampler", SCHEDULE_SAMPLERS),
                              ("on_bad_video", ON_BAD_VIDEO)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'.")
        for name in ("val_interval", "eval_interval", "preview_mcmc_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 (off) or positive, got {getattr(self, name)}.")
        for name in ("val_videos", "eval_videos"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.eval_T != -1 and self.eval_T < 2:
            raise ConfigError(f"--eval_T must be -1 (min(2 x max_frames, T)) or at least 2, got {self.eval_T}.")
        from .validation import check_measurements  # validation builds on this module

        check_measurements(self)

    def training_precision(self):
        """The precision training runs in: FDM's --use_fp16 True is --precision fp16."""
        return "fp16" if self.use_fp16 else self.precision


ON_BAD_VIDEO = ("stop", "skip")


def parse_ema_rates(text):
    """--ema_rate as a list of floats, each in (0, 1)."""
    try:
        rates = [float(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--ema_rate must be comma-separated numbers, got '{text}'.") from None
    if not rates or not all(0 < r < 1 for r in rates):
        raise ConfigError(f"--ema_rate must be one or more rates in (0, 1), got '{text}'.")
    return rates


def parse_adam_betas(text):
    """--adam_betas as (beta1, beta2), each in [0, 1)."""
    try:
        betas = tuple(float(b) for b in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--adam_betas must be two comma-separated numbers, got '{text}'.") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"--adam_betas must be two numbers in [0, 1) such as 0.9,0.999, got '{text}'.")
    return betas


# Below this loss scale fp16 gradients stay non-finite however small the loss is scaled (from the
# initial 2**16 that takes 30 overflowing steps in a row): training stops rather than skip forever.
MIN_LOSS_SCALE = 2.0 ** -14


def grad_scaler(device, precision, fp16_scale_growth):
    """torch.amp.GradScaler for dynamic fp16 loss scaling (disabled, a no-op, in fp32 and bf16).

    FDM raises log2(loss scale) by fp16_scale_growth after every step and lowers it by 1 on an
    overflow: the scale doubles every 1 / fp16_scale_growth overflow-free steps and halves on an
    overflow. GradScaler does the same in whole doublings: growth_factor 2 after growth_interval
    = 1 / fp16_scale_growth steps without an overflow, backoff 0.5. fp16_scale_growth 0: never grows.
    """
    interval = max(1, round(1 / fp16_scale_growth)) if fp16_scale_growth > 0 else 2 ** 30
    return torch.amp.GradScaler(torch.device(device).type, growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=interval, enabled=precision == "fp16")


def compile_network(network):
    """The training network through torch.compile with static shapes (see precision.compile_model)."""
    return compile_model(network, dynamic=False)


def example_generators(seed, step, index):
    """numpy and torch generators of one training example, from (seed, step, global example index)."""
    return generators_of([seed, step, index])


def generators_of(key):
    """numpy and torch generators from one numpy seed `key` (a list of non-negative integers)."""
    rng = np.random.default_rng(key)
    torch_gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, torch_gen


def step_seed(seed, step, rank):
    """Seed of torch's global RNG (dropout) for one step of one rank."""
    return int(np.random.default_rng([seed, step, rank, 0xD209]).integers(0, 2**62))


def collate(examples):
    """Stack per-example dicts of [1 x K_i x ...] tensors, zero-padding the frame axis to the largest K_i.

    Zero frames in neither mask are padding frames: the model keeps them apart from the
    real ones (they only attend to each other) and the loss ignores them.
    """
    K = max(ex["x"].shape[1] for ex in examples)
    batch = {}
    for key in examples[0]:
        parts = []
        for ex in examples:
            value = ex[key]
            if value.dim() >= 2 and value.shape[1] < K:
                pad = torch.zeros(1, K - value.shape[1], *value.shape[2:], dtype=value.dtype)
                value = torch.cat([value, pad], dim=1)
            parts.append(value)
        batch[key] = torch.cat(parts)
    return batch


def training_batch(videos, pad_videos, first_index, seed, step, max_frames, noise_mode, num_timesteps, p=None,
                   actions=None, pad_actions=None, labels=None, cond_drop_prob=0.0, generators=None):
    """One rank's training examples: frames, masks, timesteps and noise, example j being global example first_index + j.

    videos, pad_videos: [B x T x C x H x W] (pad_videos None: no padding frames); p: the
    timestep distribution (None: uniform). Returns training_example's dict plus `noise`
    and `obs_noise` (like `x`) and `weights`, the importance weights of `t` (like `t`).
    Conditions: actions, pad_actions [B x T x D] (each slot gets its frame's vector, `cond`
    [B x K x D]), labels [B] (`y`); cond_drop_prob > 0 adds `drop_cond` [B] bool, True with that
    probability per example. Classifier-free guidance samples the unconditional branch with
    every condition of a video null at once, so conditions are dropped per video (all frames'
    vectors and the label together): exactly the input the guided sampler shows the model.
    generators: a function of the global example index giving its (numpy, torch) generators, for
    examples that are not training ones (validation.py); None: example_generators(seed, step, index).
    """
    examples = []
    for j in range(len(videos)):
        if generators is None:
            rng, torch_gen = example_generators(seed, step, first_index + j)
        else:
            rng, torch_gen = generators(first_index + j)
        pad = None if pad_videos is None else pad_videos[j: j + 1]
        example = training_example(
            videos[j: j + 1], pad, max_frames, noise_mode, num_timesteps, rng, p,
            actions=None if actions is None else actions[j: j + 1],
            pad_actions=None if actions is None or pad_actions is None else pad_actions[j: j + 1])
        example["noise"] = torch.randn(example["x"].shape, generator=torch_gen)
        example["obs_noise"] = torch.randn(example["x"].shape, generator=torch_gen)
        example["weights"] = importance_weights(example["t"], p)
        if labels is not None:
            example["y"] = torch.as_tensor(labels[j: j + 1], dtype=torch.long)
        if cond_drop_prob > 0:  # drawn after every other draw of the example: its masks are unchanged
            example["drop_cond"] = torch.tensor([bool(rng.random() < cond_drop_prob)])
        examples.append(example)
    return collate(examples)


CONDITION_KEYS = ("cond", "y", "drop_cond")  # a training batch's entries that go to the model as they are


def example_losses(network, diffusion, part, pad_with_random_frames):
    """Per-example loss terms of a training batch `part` (training_batch's dict, on the network's device).

    The one definition of the training loss, which validation.py evaluates too. Returns (terms
    {name: [B]}, loss mask [B x K x 1 x 1 x 1], per-frame terms {name: [B x K]}, trained frames
    [B x K], trained-frame count [B]).
    """
    x, t = part["x"], part["t"]
    obs_mask, latent_mask = part["obs_mask"], part["latent_mask"]
    x0 = x
    if part["noisy_obs"].any():
        # Observed frames shown slightly noisy (mixed mode): noise them to their own t.
        obs_noise = diffusion.training_noise(part["obs_noise"])
        x0 = diffusion.q_sample(x, t, obs_noise, latent_mask=part["noisy_obs"])
    # Loss on every frame that is not observed: latent and padding frames (FDM).
    loss_mask = 1 - obs_mask if pad_with_random_frames else latent_mask
    model_kwargs = {"x0": x0, "frame_indices": part["frame_indices"], "obs_mask": obs_mask,
                    "latent_mask": latent_mask, **{k: part[k] for k in CONDITION_KEYS if k in part}}
    B, K = loss_mask.shape[:2]
    # SNR loss weights (diffusion/loss_weights): clean observed frames are known; the running
    # SNR goes over the example's own frames (observed and latent), not over padding frames.
    known = (obs_mask > 0) & ~(part["noisy_obs"] > 0)
    frame_weights = diffusion.loss_frame_weights(t, K, known=known.view(B, K),
                                                 in_sequence=((obs_mask + latent_mask) > 0).view(B, K))
    frame_terms = diffusion.training_losses(network, x, t, model_kwargs, noise=part["noise"],
                                            latent_mask=loss_mask, per_frame_terms=True,
                                            frame_weights=frame_weights)
    # Each trained frame's loss times its timestep's importance weight, averaged over the
    # example's trained frames (with uniform timesteps every weight is 1).
    trained = loss_mask.view(B, K)
    weights = part["weights"].view(B, -1)
    count = trained.sum(1).clamp(min=1)
    terms = {k: (v * weights).sum(1) / count for k, v in frame_terms.items()}
    return terms, loss_mask, frame_terms, trained, count


def timestep_quarters(t, trained, num_timesteps):
    """Which quarter (0..3) of the timestep range each example's loss belongs to, [B] long.

    A per-video t is its own; a per-frame t counts as the mean t of the example's trained frames.
    """
    B = t.shape[0]
    if t.dim() == 2:
        weights = trained.view(B, -1)
        t_example = (t.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
    else:
        t_example = t.float()
    return (4 * t_example / num_timesteps).long().clamp(max=3)


def peak_memory_mb(device):
    """The most memory this process has held so far, in MiB: CUDA memory allocated on a GPU, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@contextlib.contextmanager
def random_state_kept(device):
    """Run the block and restore torch's (CPU and this CUDA device's), numpy's and Python's global RNG states.

    Measurements during training (validation, evaluation, previews) must not move the training run's
    random numbers, whatever the code they call draws.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def split_data(item):
    """(videos, actions, labels) of what `data(step)` returned: videos alone or a tuple of two or three."""
    if not isinstance(item, (tuple, list)):
        return item, None, None
    videos, actions, labels = (*item, None, None)[:3]
    return videos, actions, labels


def gradient_norm(params):
    """The global 2-norm of the parameters' gradients (a 0-d tensor), as clip_grad_norm_ computes it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def update_ema(target_params, source_params, rate):
    """target <- rate * target + (1 - rate) * source, as one multi-tensor operation."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target_params), list(source_params), 1 - rate)


def to_cpu(obj):
    """A copy of a nested dict/list of tensors with every tensor on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal arrived and the step reached was saved; `exit_code` is 128 + the signal number."""

    def __init__(self, signum, step, run_dir):
        self.exit_code = 128 + signum
        super().__init__(f"Stopped by signal {signum} at step {step}, which is saved in {run_dir}; "
                         f"continue with --wandb_id.")


class TrainLoop:
    """Trains `model` on batches from `data(step)` -> [2B x T x C x H x W] videos in [-1, 1].

    The first B videos are trained on; the other B provide padding frames (FDM). Only rank
    0 logs and writes files.

    Measurements (validation.py): `validation` (a ValidationSet, on every rank) gives val_loss every
    --val_interval steps; `evaluation` (callable(step, ema_model, logger) -> {figure: value}, rank 0) samples
    and scores test videos every --eval_interval steps. Both see a copy of the EMA model with every
    global RNG state restored afterwards, so they never change what is trained. --keep_best keeps the
    EMA weights of the best value of one figure as best_<figure>.pt.
    """

    def __init__(self, *, model, diffusion, data, config: TrainConfig, run_dir, saved_config, logger,
                 device=None, start_step=0, preview=None, cond_drop_prob=0.0, validation=None, evaluation=None):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.cfg = config
        self.run_dir = run_dir
        self.saved_config = saved_config
        self.logger = logger
        self.device = device or dist_util.dev()
        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.ema_rates = parse_ema_rates(config.ema_rate)
        self.schedule_sampler = create_schedule_sampler(config.schedule_sampler, diffusion.num_timesteps)
        self.microbatch = config.microbatch if config.microbatch > 0 else config.batch_size
        self.step = start_step
        self.last_saved_step = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_skipped = 0  # non-finite steps skipped in the whole run (saved with the optimizer)
        self.grad_norm_sum, self.grad_norm_count = None, 0  # this log interval's, a tensor: no device sync per step
        self.data_wait = 0.0  # seconds the last step waited for its batch
        self.stop_signal = None
        self.cond_drop_prob = cond_drop_prob  # ModelConfig.cond_drop_prob: the model has null conditions when > 0
        network_config = getattr(model, "config", None)  # what the model is conditioned on, so data can be checked
        self.cond_dim = getattr(network_config, "cond_dim", 0)
        self.num_classes = getattr(network_config, "num_classes", 0)

        self.preview = preview  # callable(step, ema_model), run on rank 0 every sample_interval steps
        self.validation = validation
        self.evaluation = evaluation
        self.best = None  # (value, step) of --keep_best's figure, read back from its file on a resume
        if config.keep_best:
            from .validation import figure_direction, read_best  # validation builds on this module

            self.best_higher = figure_direction(config.keep_best) == "higher"
            self.best = read_best(self.best_path(), self.logger) if self.rank == 0 else None
        self.params = list(model.parameters())
        dist_util.sync_params(self.params)  # before the EMA copies: every rank starts from rank 0's weights
        # foreach: one multi-tensor update instead of a Python loop over parameters (CPU default).
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                     betas=parse_adam_betas(config.adam_betas), foreach=True)
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        if self.world_size > 1:
            self.ddp_model = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        else:
            self.ddp_model = model
        self.precision = config.training_precision()
        self.scaler = grad_scaler(self.device, self.precision, config.fp16_scale_growth)
        # What the training forward calls: the (DDP-wrapped) network, compiled around DDP as torch
        # recommends (DDP's gradient hooks stay eager), under autocast with a float32 output.
        # self.model stays the plain module: EMAs, previews and checkpoints never see the compiled
        # wrapper, so state_dict keys carry no "_orig_mod." prefix.
        network = compile_network(self.ddp_model) if config.compile else self.ddp_model
        self.network = PrecisionModel(network, self.precision, self.device)

    # ------------------------------------------------------------------ resume

    def read_step(self, step):
        """(model state, EMA states, optimizer state, schedule sampler state, fp16 loss scaler state or
        None, non-finite steps skipped before it) of a complete step.

        Optimizer files are ours ({"optimizer", "step", ...}) or FDM's (the optimizer's bare
        state_dict, written by FDM's train_util.TrainLoop.save); model and EMA files have the
        same {"config", "state_dict", "step"} layout in both. Raises CheckpointError.
        """
        *ema_files, model_file, opt_file = checkpoint_io.step_files(self.run_dir, step, self.ema_rates)
        states = [read_model_checkpoint(path)["state_dict"] for path in [model_file, *ema_files]]
        opt = read_checkpoint_file(opt_file)
        if isinstance(opt, dict) and "optimizer" in opt:
            return (states[0], states[1:], opt["optimizer"], opt.get("schedule_sampler"), opt.get("grad_scaler"),
                    int(opt.get("nonfinite_skipped", 0)))
        if isinstance(opt, dict) and {"state", "param_groups"} <= set(opt):
            return states[0], states[1:], opt, None, None, 0
        raise CheckpointError(f"'{opt_file}' is not an optimizer checkpoint: it has neither 'optimizer' "
                              f"nor 'state' and 'param_groups'.")

    def load_newest_readable(self, steps):
        """Restore model, EMAs, optimizer, sampler, fp16 loss scale and step from the newest of `steps`
        whose files all read.

        A step with an unreadable file (truncated by a crash, corrupt) is skipped with one
        line naming the file; a file of the wrong model is an error. Rank 0 reads the files
        and sends their contents to the others, so only rank 0 needs to see the run directory.
        Returns the step loaded.
        """
        found = None
        if self.rank == 0:
            for step in sorted(steps, reverse=True):
                try:
                    found = (step, self.read_step(step))
                    break
                except CheckpointError as e:
                    self.logger.info(f"skipping checkpoint step {step}: {e}")
            if found is None:
                found = CheckpointError(f"No checkpoint step in {self.run_dir} can be read "
                                        f"(tried {', '.join(map(str, sorted(steps, reverse=True)))}).")
        found = dist_util.broadcast_object(found)
        if isinstance(found, CheckpointError):
            raise found
        step, (model_state, ema_states, opt_state, sampler_state, scaler_state, nonfinite_skipped) = found
        names = [name for name, _ in self.model.named_parameters()]
        try:
            self.model.load_state_dict(model_state)
            for state in ema_states:
                missing = [n for n in names if n not in state or state[n].shape != model_state[n].shape]
                if missing:
                    raise RuntimeError(f"EMA weights lack or misshape {missing[0]}")
            self.opt.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"Checkpoint step {step} in {self.run_dir} does not fit this model: {first}") \
                from None
        with torch.no_grad():
            for ema, state in zip(self.ema_params, ema_states):
                for p, name in zip(ema, names):
                    p.copy_(state[name])
        if sampler_state:
            self.schedule_sampler.load_state_dict(sampler_state)
        # Files written in fp32 or bf16 have no loss scale: fp16 then starts from the initial one.
        if scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler_state)
        self.nonfinite_skipped = nonfinite_skipped
        self.step = self.last_saved_step = step
        return step

    # ------------------------------------------------------------------ training

    def lr_at(self, step):
        """The learning rate of step `step` (0-based): lr x warm-up factor x anneal factor.

        Warm-up as Diffusion Forcing (df_base.py, `optimizer_step`): after optimizer step g
        (0-based, g < warmup_steps) it sets lr * min(1, (g + 1) / warmup_steps), so step k >= 1
        runs at lr * min(1, k / warmup_steps). Its step 0 runs at the full lr, the optimizer's
        initial value; here step 0 runs at lr / warmup_steps like step 1, which avoids a
        full-size first step from a random start.
        """
        lr = self.cfg.lr
        if self.cfg.warmup_steps:
            lr = lr * min(1.0, max(step, 1) / self.cfg.warmup_steps)
        if self.cfg.lr_anneal_steps:
            lr = lr * max(0.0, 1 - step / self.cfg.lr_anneal_steps)
        return lr

    def done(self):
        if self.cfg.max_steps and self.step >= self.cfg.max_steps:
            return True
        return bool(self.cfg.lr_anneal_steps) and self.step >= self.cfg.lr_anneal_steps

    def request_stop(self, signum, frame):
        self.stop_signal = signum

    def run(self):
        bar = tqdm(initial=self.step, total=self.cfg.max_steps or None, disable=self.rank != 0, desc="train",
                   dynamic_ncols=True)
        last_time, last_step = time.time(), self.step
        measuring = 0.0  # seconds spent on validation and evaluation since the last log line
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self.request_stop) for s in STOP_SIGNALS}
        try:
            while not self.done():
                loss = self.run_step()
                self.step += 1
                bar.update(1)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", data_wait=f"{self.data_wait:.3f}s")
                started = time.time()
                figures = self.measure()
                measuring += time.time() - started
                if self.step % self.cfg.log_interval == 0:
                    now = time.time()
                    # Training speed: the time measurements took is not training time.
                    steps_per_s = (self.step - last_step) / max(now - last_time - measuring, 1e-9)
                    self.logger.logkv("steps_per_sec", steps_per_s)
                    self.logger.logkv("samples_per_sec", steps_per_s * self.cfg.batch_size * self.world_size)
                    self.logger.logkv("lr", self.lr_at(self.step - 1))
                    self.log_health()
                    for key, value in figures.items():
                        self.logger.logkv(key, value)
                    self.logger.logkv("step", self.step)
                    self.logger.dump(self.step)
                    last_time, last_step, measuring = now, self.step, 0.0
                elif figures:  # a measurement between log lines gets a row of its own, at its own step
                    self.logger.log_row({**figures, "step": self.step}, self.step)
                if self.step % self.cfg.save_interval == 0:
                    self.save()
                if self.preview is not None and self.rank == 0 and self.cfg.sample_interval > 0 \
                        and self.step % self.cfg.sample_interval == 0:
                    with random_state_kept(self.device):
                        self.preview(self.step, self.ema_model())
                if dist_util.any_rank(self.stop_signal is not None):  # every rank stops at the same step
                    if self.last_saved_step != self.step:
                        self.save()
                    raise Preempted(int(self.stop_signal or signal.SIGTERM), self.step, self.run_dir)
        finally:
            bar.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if self.last_saved_step != self.step:
            self.save()

    def log_health(self):
        """What every log line reports besides losses and speed: gradient norm, peak memory, skipped steps."""
        if self.grad_norm_count:  # the mean global 2-norm of the steps taken since the last log line
            self.logger.logkv("grad_norm", float(self.grad_norm_sum) / self.grad_norm_count)
            self.grad_norm_sum, self.grad_norm_count = None, 0
        self.logger.logkv("peak_mem_mb", peak_memory_mb(self.device))
        self.logger.logkv("nonfinite_skipped", self.nonfinite_skipped)

    # ------------------------------------------------------------------ measurements

    def measure(self):
        """Validate and evaluate when due, then keep the best checkpoint; returns the figures to log.

        Validation runs on every rank (each computes its share of the clips); evaluation on rank 0.
        """
        figures = {}
        if self.validation is not None and self.cfg.val_interval > 0 and self.step % self.cfg.val_interval == 0:
            figures.update(self.validate())
        if self.evaluation is not None and self.rank == 0 and self.cfg.eval_interval > 0 \
                and self.step % self.cfg.eval_interval == 0:
            figures.update(self.evaluate())
        if figures:
            self.keep_best_if_better(figures)
        return figures

    def validate(self):
        """{val_loss, val_loss_q0..3} of the EMA model (first rate) on the validation set, the same on every rank.

        The loss runs at the training precision, eagerly (a compiled network would recompile for the copy).
        """
        with random_state_kept(self.device), torch.no_grad():
            network = PrecisionModel(self.ema_model(), self.precision, self.device)
            return self.validation.figures(network, self.diffusion, batch_size=self.microbatch, device=self.device)

    def evaluate(self):
        """The evaluation's figures (eval_psnr, ...) of the EMA model at this step (rank 0)."""
        with random_state_kept(self.device), torch.no_grad():
            return self.evaluation(self.step, self.ema_model(), self.logger)

    def best_path(self):
        return checkpoint_io.bf.join(self.run_dir, f"best_{self.cfg.keep_best}.pt")

    def keep_best_if_better(self, figures):
        """--keep_best: when this step's figure beats the best so far, write the EMA checkpoint to best_<figure>.pt.

        Rank 0 only. The file holds the step and the figure's value, which a resumed run reads back.
        A NaN is never better; the first finite-or-infinite value always is.
        """
        name = self.cfg.keep_best
        if not name or self.rank != 0 or name not in figures:
            return
        value = float(figures[name])
        if math.isnan(value):
            return
        if self.best is not None and not (value > self.best[0] if self.best_higher else value < self.best[0]):
            return
        state = self.ema_state_dict(self.ema_params[0])
        checkpoint_io.atomic_save({**self.checkpoint_dict(state), "figure": name, "value": value}, self.best_path())
        self.best = (value, self.step)
        self.logger.info(f"step {self.step}: best {name} so far ({value:.6g}), saved to {self.best_path()}")

    def ema_model(self):
        """A copy of the model holding the first EMA rate's weights, in eval mode (previews and measurements)."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.ema_params[0]):
                p.copy_(e)
        return model.eval()

    def run_step(self):
        """One optimizer step; returns rank 0's mean loss, or None when it was skipped for a non-finite loss."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))  # dropout
        started = time.perf_counter()
        item = self.data(self.step)
        self.data_wait = time.perf_counter() - started  # the loader fell behind the model by this much
        self.logger.logkv_mean("data_wait", self.data_wait)
        videos, actions, labels = split_data(item)
        if (self.cond_dim and actions is None) or (self.num_classes and labels is None):
            raise ValueError(f"the model is conditioned on {'actions' if self.cond_dim else 'labels'}, but data(step) "
                             f"gave none: it must return (videos, actions, labels).")
        B = self.cfg.batch_size
        pad = self.cfg.pad_with_random_frames
        batch = training_batch(videos[:B], videos[B:] if pad else None,
                               first_index=self.rank * B, seed=self.cfg.seed, step=self.step,
                               max_frames=self.cfg.max_frames, noise_mode=self.cfg.noise_mode,
                               num_timesteps=self.diffusion.num_timesteps, p=self.schedule_sampler.probabilities(),
                               actions=None if actions is None else actions[:B],
                               pad_actions=None if actions is None or not pad else actions[B:],
                               labels=None if labels is None else labels[:B], cond_drop_prob=self.cond_drop_prob)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        seen_t, seen_losses = [], []
        for start in range(0, B, self.microbatch):
            end = min(start + self.microbatch, B)
            loss, terms, t, trained, (ts, losses) = self.microbatch_loss(batch, start, end)
            seen_t.append(ts)
            seen_losses.append(losses)
            scaled = self.scaler.scale(loss * (end - start) / B)  # fp16: times the loss scale
            if end >= B or self.world_size == 1:
                scaled.backward()  # DDP averages the accumulated gradients over ranks here
            else:
                with self.ddp_model.no_sync():
                    scaled.backward()
            total += float(loss.detach()) * (end - start) / B
            self.log_loss_terms(terms, t, trained)
        self.update_schedule_sampler(np.concatenate(seen_t), np.concatenate(seen_losses))
        if self.scaler.is_enabled():
            if not dist_util.all_ranks_agree(math.isfinite(total)):
                return self.skip_step()
            self.scaler.unscale_(self.opt)  # true gradients, for the finiteness check and clipping
            if not dist_util.all_ranks_agree(self.grads_finite()):
                return self.skip_overflow(total)
        elif not dist_util.all_ranks_agree(math.isfinite(total) and self.grads_finite()):
            return self.skip_step()
        self.nonfinite_in_a_row = 0
        # The global 2-norm over all parameters (of the true, unscaled gradients), logged always and
        # clipped with --grad_clip, as Lightning's gradient_clip_val (DF's exp_video.yaml: 1.0).
        # Gradients are already averaged over ranks, so all agree.
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        else:
            norm = gradient_norm(self.params)
        norm = norm.detach().float()
        self.grad_norm_sum = norm if self.grad_norm_sum is None else self.grad_norm_sum + norm
        self.grad_norm_count += 1
        self.scaler.step(self.opt)  # opt.step() (the gradients are finite here)
        self.scaler.update()  # fp16: doubles the scale after growth_interval steps in a row
        if self.scaler.is_enabled():
            self.logger.logkv_mean("fp16_overflow", 0.0)
            self.logger.logkv("loss_scale", self.scaler.get_scale())
        for rate, ema in zip(self.ema_rates, self.ema_params):
            update_ema(ema, self.params, rate)
        return total

    def grads_finite(self):
        """Whether every gradient of this rank is finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        # The max-abs norm is non-finite exactly when some element is (it cannot overflow).
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()) if grads else True

    def skip_step(self):
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        self.opt.zero_grad(set_to_none=True)
        self.logger.info(f"step {self.step}: non-finite loss, optimizer step skipped")
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise TrainingError(
                f"Training stopped after {self.nonfinite_in_a_row} consecutive non-finite losses at step "
                f"{self.step} ({self.last_checkpoint()})."
            )
        return None

    def skip_overflow(self, loss):
        """fp16: the scaled gradients overflowed, the loss was finite. Skip the step and halve the loss scale.

        This is dynamic loss scaling finding its scale, so it resets the non-finite loss count
        like a taken step; a scale that falls below MIN_LOSS_SCALE means gradients that no
        scale makes finite, and stops training.
        """
        self.scaler.update()  # unscale_ recorded the overflow: the scale is halved
        self.opt.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row = 0
        scale = self.scaler.get_scale()
        self.logger.logkv_mean("fp16_overflow", 1.0)  # the fraction of steps skipped, per log line
        self.logger.logkv("loss_scale", scale)
        if scale < MIN_LOSS_SCALE:
            raise TrainingError(
                f"Training stopped at step {self.step}: fp16 gradients stayed non-finite down to loss scale "
                f"{scale:g} ({self.last_checkpoint()}); train with --precision bf16 or fp32."
            )
        return loss

    def last_checkpoint(self):
        """Where a stopped run can resume from, for its error message."""
        saved = self.last_saved_step
        last = "no checkpoint yet" if saved is None else f"last checkpoint: step {saved}"
        return f"{last}, in {self.run_dir}"

    def microbatch_loss(self, batch, start, end):
        part = {k: v[start:end].to(self.device) for k, v in batch.items()}
        terms, loss_mask, frame_terms, trained, count = example_losses(self.network, self.diffusion, part,
                                                                       self.cfg.pad_with_random_frames)
        t = part["t"]
        return terms["loss"].mean(), terms, t, loss_mask, self.losses_seen(t, frame_terms["loss"], trained, count)

    def losses_seen(self, t, frame_losses, trained, count):
        """(timesteps, unweighted losses) for the schedule sampler's history, as numpy arrays:
        one per example for a per-video t (FDM's rule), one per trained frame for per-frame t."""
        frame_losses = frame_losses.detach().float().cpu()
        if t.dim() == 1:
            return t.cpu().numpy(), (frame_losses.sum(1) / count.cpu()).numpy()
        chosen = trained.cpu() > 0
        return t.cpu()[chosen].numpy(), frame_losses[chosen].numpy()

    def update_schedule_sampler(self, timesteps, losses):
        """Give every rank's (timestep, loss) pairs, in rank order, to the schedule sampler of every rank."""
        if self.cfg.schedule_sampler == "uniform":
            return
        for ts, ls in dist_util.all_gather_object((timesteps, losses)):
            self.schedule_sampler.update(ts, ls)

    def log_loss_terms(self, terms, t, trained):
        """Mean of each loss term, overall and per quarter of the timestep range."""
        quarter = timestep_quarters(t, trained, self.diffusion.num_timesteps)
        for key, values in terms.items():
            values = values.detach().float()
            self.logger.logkv_mean(key, values.mean().item())
            for q in range(4):
                sel = values[quarter == q]
                if len(sel):
                    self.logger.logkv_mean(f"{key}_q{q}", sel.mean().item())

    # ------------------------------------------------------------------ saving

    def save(self):
        """Write EMA, model and optimizer files for this step (rank 0), each atomically."""
        if self.rank == 0:
            model_state = to_cpu(self.model.state_dict())
            for ema, path in zip(self.ema_params, self.step_files()):
                checkpoint_io.atomic_save(self.checkpoint_dict(self.ema_state_dict(ema, model_state)), path)
            *_, model_file, opt_file = self.step_files()
            checkpoint_io.atomic_save(self.checkpoint_dict(model_state), model_file)
            opt_state = {"optimizer": to_cpu(self.opt.state_dict()), "step": self.step,
                         "schedule_sampler": self.schedule_sampler.state_dict(),
                         "nonfinite_skipped": self.nonfinite_skipped}
            if self.scaler.is_enabled():  # fp16's loss scale and growth count, for an exact resume
                opt_state["grad_scaler"] = self.scaler.state_dict()
            checkpoint_io.atomic_save(opt_state, opt_file)
            checkpoint_io.remove_old_steps(self.run_dir, self.ema_rates, self.cfg.keep_last)
            self.logger.info(f"saved step {self.step} to {self.run_dir}")
        self.last_saved_step = self.step
        dist_util.barrier()

    def ema_state_dict(self, ema, model_state=None):
        """The model's state dict (on the CPU) with the EMA weights `ema` in place of its parameters."""
        names = [name for name, _ in self.model.named_parameters()]
        state = copy.copy(to_cpu(self.model.state_dict()) if model_state is None else model_state)
        state.update({n: p.detach().cpu() for n, p in zip(names, ema)})
        return state

    def step_files(self):
        return checkpoint_io.step_files(self.run_dir, self.step, self.ema_rates)

    def checkpoint_dict(self, state_dict):
        return {"config": dict(self.saved_config), "state_dict": state_dict, "step": self.step}

