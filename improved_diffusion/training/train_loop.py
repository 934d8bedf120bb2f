"""TrainLoop: data-parallel training with EMA, crash-safe checkpoints and exact resume.

What one step trains on and its loss are batches.py's; where its random numbers come from
(and why a resume needs no saved RNG state) is randomness.py's.

SIGTERM or SIGUSR1 (what Slurm sends before pre-empting a job) makes every rank finish
the current step, save it and raise Preempted, so a pre-empted job loses nothing.

Precision (--precision bf16|fp16, or FDM's --use_fp16 True): only the network's forward runs
under autocast (precision.PrecisionModel), and its output comes back as float32, so the loss
is computed and reduced in float32; weights, gradients, optimizer state, EMAs and checkpoints
stay float32. fp16 also scales the loss (torch.amp.GradScaler, gradients.grad_scaler): a step whose
scaled gradients overflow is skipped and the scale halved, which is the scaler working, not a
non-finite step. --compile True trains through torch.compile(network) (compile_network); EMAs and
checkpoints use the uncompiled model, so their state_dict keys are the plain ones.
"""

import math
import signal
import threading
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .. import dist_util
from ..errors import CheckpointError, TrainingError
from ..precision import PrecisionModel, compile_model
from . import checkpoint_io
from .batches import example_losses, split_data, timestep_quarters, training_batch
from .config import TrainConfig, parse_adam_betas, parse_ema_rates
from .ema import ema_state_dict, model_with_ema, update_ema
from .gradients import MIN_LOSS_SCALE, grad_scaler, gradient_norm, grads_finite
from .keep_best import BestCheckpoint
from .memory import peak_memory_mb
from .randomness import random_state_kept, step_seed
from .timestep_sampler import create_schedule_sampler


def compile_network(network):
    """The training network through torch.compile with static shapes (see precision.compile_model)."""
    return compile_model(network, dynamic=False)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal arrived and the step reached was saved; `exit_code` is 128 + the signal number."""

    def __init__(self, signum, step, run_dir):
        self.exit_code = 128 + signum
        super().__init__(f"Stopped by signal {signum} at step {step}, which is saved in {run_dir}; "
                         f"continue with --wandb_id.")


class TrainLoop:
    """Trains `model` on batches from `data(step)` -> [2B x T x C x H x W] videos in [-1, 1].

    The first B videos are trained on; the other B provide padding frames (FDM). `data(step)` may
    also return (videos, actions, labels), conditions of those videos (batches.py). Only rank 0 logs
    and writes files.

    Measurements (validation.py): `validation` (a ValidationSet, on every rank) gives val_loss every
    --val_interval steps; `evaluation` (callable(step, ema_model, logger) -> {figure: value}, rank 0) samples
    and scores test videos every --eval_interval steps. Both see a copy of the EMA model with every
    global RNG state restored afterwards, so they never change what is trained. --keep_best keeps the
    EMA weights of the best value of one figure as best_<figure>.pt (keep_best.py).
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
        self.best_checkpoint = None  # --keep_best's figure: rank 0 reads its best value back on a resume
        if config.keep_best:
            self.best_checkpoint = BestCheckpoint(run_dir, config.keep_best, logger, read=self.rank == 0)
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
                    found = (step, checkpoint_io.read_step(self.run_dir, step, self.ema_rates))
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
                    self.log_line(figures, (self.step - last_step) / max(now - last_time - measuring, 1e-9))
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

    def log_line(self, figures, steps_per_s):
        """Write the log line of this step: speed, learning rate, health and the step's measured figures."""
        self.logger.logkv("steps_per_sec", steps_per_s)
        self.logger.logkv("samples_per_sec", steps_per_s * self.cfg.batch_size * self.world_size)
        self.logger.logkv("lr", self.lr_at(self.step - 1))
        self.log_health()
        for key, value in figures.items():
            self.logger.logkv(key, value)
        self.logger.logkv("step", self.step)
        self.logger.dump(self.step)

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
        if figures and self.best_checkpoint is not None and self.rank == 0:
            self.best_checkpoint.keep_if_better(
                figures, self.step, lambda: self.checkpoint_dict(ema_state_dict(self.model, self.ema_params[0])))
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

    def ema_model(self):
        """A copy of the model holding the first EMA rate's weights, in eval mode (previews and measurements)."""
        return model_with_ema(self.model, self.ema_params[0])

    def run_step(self):
        """One optimizer step; returns rank 0's mean loss, or None when it was skipped for a non-finite loss."""
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))  # dropout
        batch = self.next_batch()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        total = self.accumulate_gradients(batch)
        return self.apply_gradients(total)

    def next_batch(self):
        """This rank's training batch of this step (batches.training_batch's dict, on the CPU), from `data(step)`."""
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
        return batch

    def accumulate_gradients(self, batch):
        """Forward and backward passes over the batch's microbatches; returns the batch's mean loss.

        DDP averages the gradients over ranks at the last microbatch. Each loss term is logged, and
        every rank's (timestep, loss) pairs go to the schedule sampler.
        """
        B = self.cfg.batch_size
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
        return total

    def apply_gradients(self, total):
        """Take the optimizer step (and update the EMAs) when every rank's loss `total` and gradients are finite.

        Returns `total`, or skip_step's / skip_overflow's value when the step is skipped.
        """
        if self.scaler.is_enabled():
            if not dist_util.all_ranks_agree(math.isfinite(total)):
                return self.skip_step()
            self.scaler.unscale_(self.opt)  # true gradients, for the finiteness check and clipping
            if not dist_util.all_ranks_agree(grads_finite(self.params)):
                return self.skip_overflow(total)
        elif not dist_util.all_ranks_agree(math.isfinite(total) and grads_finite(self.params)):
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
            model_state = checkpoint_io.to_cpu(self.model.state_dict())
            for ema, path in zip(self.ema_params, self.step_files()):
                checkpoint_io.atomic_save(self.checkpoint_dict(ema_state_dict(self.model, ema, model_state)), path)
            *_, model_file, opt_file = self.step_files()
            checkpoint_io.atomic_save(self.checkpoint_dict(model_state), model_file)
            opt_state = {"optimizer": checkpoint_io.to_cpu(self.opt.state_dict()), "step": self.step,
                         "schedule_sampler": self.schedule_sampler.state_dict(),
                         "nonfinite_skipped": self.nonfinite_skipped}
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

