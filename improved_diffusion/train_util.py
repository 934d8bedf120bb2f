"""TrainLoop: data-parallel training with EMA, crash-safe checkpoints and exact resume.

Randomness is a pure function of (seed, step, rank): the data batch, the frame masks,
the timesteps, the noise and dropout are all drawn from generators seeded with those
three numbers. So a resumed run needs no saved RNG state to continue exactly where it
stopped, and two ranks never draw the same examples.
"""

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import checkpoint_io, dist_util
from .frame_masks import training_example
from .script_util import UserError


@dataclass
class TrainConfig:
    dataset: str = "bouncing_balls"
    batch_size: int = 4
    microbatch: int = -1  # -1: no gradient accumulation
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0  # linear decay of lr to 0 at this step (0: constant)
    ema_rate: str = "0.9999"  # comma-separated list
    log_interval: int = 10
    save_interval: int = 50000
    sample_interval: int = 50000
    max_frames: int = 20
    T: int = -1  # video length to train on; -1: the dataset's default
    pad_with_random_frames: bool = True
    num_workers: int = 0
    noise_mode: str = "fdm"  # fdm | diffusion_forcing | mixed
    max_steps: int = 0  # stop after this many steps (0: run forever, or until lr_anneal_steps)
    seed: int = 0
    checkpoint_dir: str = "checkpoints"
    resume_checkpoint: str = ""  # start a new run from these weights (FDM's meaning)
    wandb_id: str = ""  # resume this run
    resume_id: str = ""  # FDM's spelling of --wandb_id
    keep_last: int = 0  # keep only the newest K checkpoint steps (0: keep all)
    max_nonfinite_steps: int = 20  # stop after this many consecutive non-finite losses


def step_generators(seed, step, rank):
    """numpy and torch generators for one (seed, step, rank)."""
    rng = np.random.default_rng([seed, step, rank])
    torch_gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, torch_gen


def update_ema(target_params, source_params, rate):
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src.detach(), alpha=1 - rate)


class NonFiniteLossError(UserError):
    pass


class TrainLoop:
    """Trains `model` on batches from `data(step)` -> [2B x T x C x H x W] videos in [-1, 1].

    The first B videos are trained on; the other B provide padding frames (FDM).
    """

    def __init__(self, *, model, diffusion, data, config: TrainConfig, run_dir, saved_config, logger,
                 device=None, start_step=0):
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
        self.ema_rates = [float(r) for r in str(config.ema_rate).split(",") if r]
        self.microbatch = config.microbatch if config.microbatch > 0 else config.batch_size
        self.step = start_step
        self.nonfinite_in_a_row = 0

        self.params = list(model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        if self.world_size > 1:
            dist_util.sync_params(self.params)
            self.ddp_model = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                 broadcast_buffers=False)
        else:
            self.ddp_model = model

    # ------------------------------------------------------------------ resume

    def load_state(self, step):
        """Restore model, every EMA, optimizer and step from a complete checkpoint step."""
        model_file, opt_file = (checkpoint_io.bf.join(self.run_dir, f"{n}{step:06d}.pt") for n in ("model", "opt"))
        self.model.load_state_dict(checkpoint_io.load(model_file)["state_dict"])
        for rate, ema in zip(self.ema_rates, self.ema_params):
            state = checkpoint_io.load(checkpoint_io.bf.join(self.run_dir, f"ema_{rate}_{step:06d}.pt"))["state_dict"]
            for p, (name, _) in zip(ema, self.model.named_parameters()):
                p.copy_(state[name])
        self.opt.load_state_dict(checkpoint_io.load(opt_file)["optimizer"])
        self.step = step

    # ------------------------------------------------------------------ training

    def lr_at(self, step):
        if not self.cfg.lr_anneal_steps:
            return self.cfg.lr
        return self.cfg.lr * max(0.0, 1 - step / self.cfg.lr_anneal_steps)

    def done(self):
        if self.cfg.max_steps and self.step >= self.cfg.max_steps:
            return True
        return bool(self.cfg.lr_anneal_steps) and self.step >= self.cfg.lr_anneal_steps

    def run(self):
        bar = tqdm(initial=self.step, total=self.cfg.max_steps or None, disable=self.rank != 0, desc="train",
                   dynamic_ncols=True)
        last_time, last_step = time.time(), self.step
        try:
            while not self.done():
                losses = self.run_step()
                self.step += 1
                bar.update(1)
                if losses is not None:
                    bar.set_postfix(loss=f"{losses:.4f}")
                if self.step % self.cfg.log_interval == 0:
                    now = time.time()
                    steps_per_s = (self.step - last_step) / max(now - last_time, 1e-9)
                    self.logger.logkv("steps_per_sec", steps_per_s)
                    self.logger.logkv("samples_per_sec", steps_per_s * self.cfg.batch_size * self.world_size)
                    self.logger.logkv("step", self.step)
                    self.logger.dump(self.step)
                    last_time, last_step = now, self.step
                if self.step % self.cfg.save_interval == 0:
                    self.save()
        finally:
            bar.close()
        if not checkpoint_io.complete_steps(self.run_dir, self.ema_rates)[-1:] == [self.step]:
            self.save()

    def run_step(self):
        """One optimizer step; returns the mean loss, or None when the step was skipped."""
        rng, torch_gen = step_generators(self.cfg.seed, self.step, self.rank)
        torch.manual_seed(int(rng.integers(0, 2**62)))  # dropout
        videos = self.data(self.step)
        B = self.cfg.batch_size
        example = training_example(videos[:B], videos[B:] if self.cfg.pad_with_random_frames else None,
                                   self.cfg.max_frames, self.cfg.noise_mode, self.diffusion.num_timesteps, rng)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=False)
        total = 0.0
        for start in range(0, B, self.microbatch):
            end = min(start + self.microbatch, B)
            last = end >= B
            loss, terms, t, latent = self.microbatch_loss(example, start, end, torch_gen)
            scaled = loss * (end - start) / B
            if last or self.world_size == 1:
                scaled.backward()
            else:
                with self.ddp_model.no_sync():
                    scaled.backward()
            total += float(loss.detach()) * (end - start) / B
            self.log_loss_terms(terms, t, latent)
        if not math.isfinite(total) or not all(torch.isfinite(p.grad).all() for p in self.params if p.grad is not None):
            self.nonfinite_in_a_row += 1
            self.logger.logkv("nonfinite_skipped", self.nonfinite_in_a_row)
            self.logger.info(f"step {self.step}: non-finite loss, optimizer step skipped")
            if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"Training stopped after {self.nonfinite_in_a_row} consecutive non-finite losses at step "
                    f"{self.step}; the last good checkpoint in {self.run_dir} is intact."
                )
            return None
        self.nonfinite_in_a_row = 0
        self.opt.step()
        for rate, ema in zip(self.ema_rates, self.ema_params):
            update_ema(ema, self.params, rate)
        return total

    def microbatch_loss(self, example, start, end, torch_gen):
        dev = self.device
        part = {k: v[start:end].to(dev) for k, v in example.items()}
        x, t = part["x"], part["t"]
        obs_mask, latent_mask = part["obs_mask"], part["latent_mask"]
        noise = torch.randn(x.shape, generator=torch_gen).to(dev)
        x0 = x
        if part["noisy_obs"].any():
            # Observed frames shown slightly noisy (mixed mode): noise them to their own t.
            obs_noise = torch.randn(x.shape, generator=torch_gen).to(dev)
            x0 = torch.where(part["noisy_obs"].bool(), self.diffusion.q_sample(x, t, obs_noise), x)
        # Loss on every frame that is not observed: latent and padding frames (FDM).
        loss_mask = 1 - obs_mask if self.cfg.pad_with_random_frames else latent_mask
        model_kwargs = {"x0": x0, "frame_indices": part["frame_indices"], "obs_mask": obs_mask,
                        "latent_mask": latent_mask}
        terms = self.diffusion.training_losses(self.ddp_model, x, t, model_kwargs, noise=noise, latent_mask=loss_mask)
        return terms["loss"].mean(), terms, t, loss_mask

    def log_loss_terms(self, terms, t, latent):
        """Mean of each loss term, overall and per quarter of the timestep range."""
        B = t.shape[0]
        if t.dim() == 2:  # per-frame t: the mean t of each example's trained frames
            weights = latent.view(B, -1)
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
        """Write EMA, model and optimizer files for this step (rank 0), atomically."""
        if self.rank == 0:
            names = [name for name, _ in self.model.named_parameters()]
            for rate, ema in zip(self.ema_rates, self.ema_params):
                state = copy.copy(self.model.state_dict())
                state.update({n: p.detach().cpu().clone() for n, p in zip(names, ema)})
                checkpoint_io.atomic_save(self.checkpoint_dict(state),
                                          checkpoint_io.bf.join(self.run_dir, f"ema_{rate}_{self.step:06d}.pt"))
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            checkpoint_io.atomic_save(self.checkpoint_dict(state),
                                      checkpoint_io.bf.join(self.run_dir, f"model{self.step:06d}.pt"))
            checkpoint_io.atomic_save({"optimizer": self.opt.state_dict(), "step": self.step},
                                      checkpoint_io.bf.join(self.run_dir, f"opt{self.step:06d}.pt"))
            checkpoint_io.remove_old_steps(self.run_dir, self.ema_rates, self.cfg.keep_last)
            self.logger.info(f"saved step {self.step} to {self.run_dir}")
        dist_util.barrier()

    def checkpoint_dict(self, state_dict):
        return {"config": dict(self.saved_config), "state_dict": state_dict, "step": self.step}


def train_config_fields():
    return [f.name for f in dataclasses.fields(TrainConfig)]
