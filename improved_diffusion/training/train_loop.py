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

import copy
import math
import signal
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
    rng = np.random.default_rng([seed, step, index])
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
                   actions=None, pad_actions=None, labels=None, cond_drop_prob=0.0):
    """One rank's training examples: frames, masks, timesteps and noise, example j being global example first_index + j.

    videos, pad_videos: [B x T x C x H x W] (pad_videos None: no padding frames); p: the
    timestep distribution (None: uniform). Returns training_example's dict plus `noise`
    and `obs_noise` (like `x`) and `weights`, the importance weights of `t` (like `t`).
    Conditions: actions, pad_actions [B x T x D] (each slot gets its frame's vector, `cond`
    [B x K x D]), labels [B] (`y`); cond_drop_prob > 0 adds `drop_cond` [B] bool, True with that
    probability per example. Classifier-free guidance samples the unconditional branch with
    every condition of a video null at once, so conditions are dropped per video (all frames'
    vectors and the label together): exactly the input the guided sampler shows the model.
    """
    examples = []
    for j in range(len(videos)):
        rng, torch_gen = example_generators(seed, step, first_index + j)
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


def split_data(item):
    """(videos, actions, labels) of what `data(step)` returned: videos alone or a tuple of two or three."""
    if not isinstance(item, (tuple, list)):
        return item, None, None
    videos, actions, labels = (*item, None, None)[:3]
    return videos, actions, labels


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
    """

    def __init__(self, *, model, diffusion, data, config: TrainConfig, run_dir, saved_config, logger,
                 device=None, start_step=0, preview=None, cond_drop_prob=0.0):
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
        self.stop_signal = None
        self.cond_drop_prob = cond_drop_prob  # ModelConfig.cond_drop_prob: the model has null conditions when > 0
        network_config = getattr(model, "config", None)  # what the model is conditioned on, so data can be checked
        self.cond_dim = getattr(network_config, "cond_dim", 0)
        self.num_classes = getattr(network_config, "num_classes", 0)

        self.preview = preview  # callable(step, ema_model), run on rank 0 every sample_interval steps
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
        None) of a complete step.

        Optimizer files are ours ({"optimizer", "step", ...}) or FDM's (the optimizer's bare
        state_dict, written by FDM's train_util.TrainLoop.save); model and EMA files have the
        same {"config", "state_dict", "step"} layout in both. Raises CheckpointError.
        """
        *ema_files, model_file, opt_file = checkpoint_io.step_files(self.run_dir, step, self.ema_rates)
        states = [read_model_checkpoint(path)["state_dict"] for path in [model_file, *ema_files]]
        opt = read_checkpoint_file(opt_file)
        if isinstance(opt, dict) and "optimizer" in opt:
            return states[0], states[1:], opt["optimizer"], opt.get("schedule_sampler"), opt.get("grad_scaler")
        if isinstance(opt, dict) and {"state", "param_groups"} <= set(opt):
            return states[0], states[1:], opt, None, None
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
        step, (model_state, ema_states, opt_state, sampler_state, scaler_state) = found
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
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self.request_stop) for s in STOP_SIGNALS}
        try:
            while not self.done():
                loss = self.run_step()
                self.step += 1
                bar.update(1)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % self.cfg.log_interval == 0:
                    now = time.time()
                    steps_per_s = (self.step - last_step) / max(now - last_time, 1e-9)
                    self.logger.logkv("steps_per_sec", steps_per_s)
                    self.logger.logkv("samples_per_sec", steps_per_s * self.cfg.batch_size * self.world_size)
                    self.logger.logkv("lr", self.lr_at(self.step - 1))
                    self.logger.logkv("step", self.step)
                    self.logger.dump(self.step)
                    last_time, last_step = now, self.step
                if self.step % self.cfg.save_interval == 0:
                    self.save()
                if self.preview is not None and self.rank == 0 and self.cfg.sample_interval > 0 \
                        and self.step % self.cfg.sample_interval == 0:
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

    def ema_model(self):
        """A copy of the model holding the first EMA rate's weights, in eval mode (for previews)."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.ema_params[0]):
                p.copy_(e)
        return model.eval()

    def run_step(self):
        """One optimizer step; returns rank 0's mean loss, or None when it was skipped for a non-finite loss."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))  # dropout
        videos, actions, labels = split_data(self.data(self.step))
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
        if self.cfg.grad_clip > 0:
            # One global 2-norm over all parameters, as Lightning's gradient_clip_val (DF's
            # exp_video.yaml: 1.0). Gradients are already averaged over ranks, so all agree.
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
            self.logger.logkv_mean("grad_norm", float(norm))
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
        self.opt.zero_grad(set_to_none=True)
        self.logger.logkv("nonfinite_skipped", self.nonfinite_in_a_row)
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
        dev = self.device
        part = {k: v[start:end].to(dev) for k, v in batch.items()}
        x, t = part["x"], part["t"]
        obs_mask, latent_mask = part["obs_mask"], part["latent_mask"]
        x0 = x
        if part["noisy_obs"].any():
            # Observed frames shown slightly noisy (mixed mode): noise them to their own t.
            obs_noise = self.diffusion.training_noise(part["obs_noise"])
            x0 = self.diffusion.q_sample(x, t, obs_noise, latent_mask=part["noisy_obs"])
        # Loss on every frame that is not observed: latent and padding frames (FDM).
        loss_mask = 1 - obs_mask if self.cfg.pad_with_random_frames else latent_mask
        model_kwargs = {"x0": x0, "frame_indices": part["frame_indices"], "obs_mask": obs_mask,
                        "latent_mask": latent_mask, **{k: part[k] for k in CONDITION_KEYS if k in part}}
        B, K = loss_mask.shape[:2]
        # SNR loss weights (diffusion/loss_weights): clean observed frames are known; the running
        # SNR goes over the example's own frames (observed and latent), not over padding frames.
        known = (obs_mask > 0) & ~(part["noisy_obs"] > 0)
        frame_weights = self.diffusion.loss_frame_weights(t, K, known=known.view(B, K),
                                                          in_sequence=((obs_mask + latent_mask) > 0).view(B, K))
        frame_terms = self.diffusion.training_losses(self.network, x, t, model_kwargs, noise=part["noise"],
                                                     latent_mask=loss_mask, per_frame_terms=True,
                                                     frame_weights=frame_weights)
        # Each trained frame's loss times its timestep's importance weight, averaged over the
        # example's trained frames (with uniform timesteps every weight is 1).
        trained = loss_mask.view(B, K)
        weights = part["weights"].view(B, -1)
        count = trained.sum(1).clamp(min=1)
        terms = {k: (v * weights).sum(1) / count for k, v in frame_terms.items()}
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
        B = t.shape[0]
        if t.dim() == 2:  # per-frame t: the mean t of each example's trained frames
            weights = trained.view(B, -1)
            t_example = (t.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            t_example = t.float()
        quarter = (4 * t_example / self.diffusion.num_timesteps).long().clamp(max=3)
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
            names = [name for name, _ in self.model.named_parameters()]
            model_state = to_cpu(self.model.state_dict())
            for rate, ema, path in zip(self.ema_rates, self.ema_params, self.step_files()):
                state = copy.copy(model_state)
                state.update({n: p.detach().cpu() for n, p in zip(names, ema)})
                checkpoint_io.atomic_save(self.checkpoint_dict(state), path)
            *_, model_file, opt_file = self.step_files()
            checkpoint_io.atomic_save(self.checkpoint_dict(model_state), model_file)
            opt_state = {"optimizer": to_cpu(self.opt.state_dict()), "step": self.step,
                         "schedule_sampler": self.schedule_sampler.state_dict()}
            if self.scaler.is_enabled():  # fp16's loss scale and growth count, for an exact resume
                opt_state["grad_scaler"] = self.scaler.state_dict()
            checkpoint_io.atomic_save(opt_state, opt_file)
            checkpoint_io.remove_old_steps(self.run_dir, self.ema_rates, self.cfg.keep_last)
            self.logger.info(f"saved step {self.step} to {self.run_dir}")
        self.last_saved_step = self.step
        dist_util.barrier()

    def step_files(self):
        return checkpoint_io.step_files(self.run_dir, self.step, self.ema_rates)

    def checkpoint_dict(self, state_dict):
        return {"config": dict(self.saved_config), "state_dict": state_dict, "step": self.step}

