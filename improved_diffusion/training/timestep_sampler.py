"""Which diffusion timesteps training draws: FDM's --schedule_sampler.

- uniform: every timestep equally likely (FDM's default).
- loss-second-moment: importance sampling of improved DDPM (Nichol & Dhariwal 2021,
  section 3.3), as FDM's improved_diffusion/resample.py does it: keep the last 10 losses
  seen at each timestep; once every timestep has 10, draw t with probability proportional
  to sqrt(mean of their squares), mixed with 0.1% of the uniform distribution. Each loss is
  multiplied by the importance weight 1 / (N p_t), so the objective's expectation is the
  uniform one; only its variance drops. Until every timestep has its 10 losses, sampling
  is uniform.

Per-frame timesteps (noise modes diffusion_forcing and mixed) draw each frame's t
independently from the same distribution; each frame's loss gets its own weight and is
recorded in the history at that frame's t. (FDM has one t per video and records the
video's loss.) With SNR loss weights (--loss_weighting), the history holds the weighted
losses: the objective being minimized.

The sampler's state is part of a checkpoint, so a resumed run draws the same timesteps an
uninterrupted one would. Every rank applies the same updates (the losses of all ranks, in
rank order), so all ranks hold the same distribution.
"""

import numpy as np
import torch

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


class UniformSampler:
    """Every timestep equally likely; `probabilities()` None means uniform."""

    def probabilities(self):
        return None

    def update(self, timesteps, losses):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class LossSecondMomentSampler:
    """p_t proportional to the root mean square of the last `history` losses at t (see module doc)."""

    def __init__(self, num_timesteps, history=10, uniform_prob=0.001):
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self):
        return bool((self.loss_counts == self.loss_history.shape[1]).all())

    def probabilities(self):
        """float64 [N] summing to 1, or None (uniform) before every timestep has a full history."""
        if not self.warmed_up():
            return None
        rms = np.sqrt(np.mean(self.loss_history ** 2, axis=1))
        p = (1 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob / len(rms)
        return p / p.sum()

    def update(self, timesteps, losses):
        """Record losses[i] as seen at timesteps[i], oldest first out once a timestep's history is full."""
        size = self.loss_history.shape[1]
        for t, loss in zip(np.asarray(timesteps).tolist(), np.asarray(losses, dtype=np.float64).tolist()):
            if self.loss_counts[t] == size:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self):
        return {"loss_history": torch.from_numpy(self.loss_history.copy()),
                "loss_counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state):
        self.loss_history = state["loss_history"].numpy().astype(np.float64)
        self.loss_counts = state["loss_counts"].numpy().astype(np.int64)


def create_schedule_sampler(name, num_timesteps):
    if name == "uniform":
        return UniformSampler()
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r}")  # argparse's choices= keep users from here


def draw_timesteps(size, num_timesteps, p, rng):
    """Timesteps of shape `size` from `p` (None: uniform, with rng.integers as always), as a long tensor."""
    if p is None:
        return torch.from_numpy(rng.integers(0, num_timesteps, size=size))
    return torch.from_numpy(rng.choice(num_timesteps, size=size, p=p))


def importance_weights(t, p):
    """1 / (N p_t) for every entry of t (all 1 when p is None): multiplying each loss by its
    weight makes the expected loss the uniform-t one."""
    if p is None:
        return torch.ones(t.shape)
    return torch.from_numpy(1.0 / (len(p) * p[t.numpy()])).float()
