"""Where training's random numbers come from, so that a resumed run needs no saved RNG state.

Randomness is a pure function of the step, so a resumed run continues exactly where it stopped:

- data: `data(step)` must be a pure function of (seed, step, rank), as
  data.batches.train_batches is;
- frame masks, timesteps and noise: drawn per example from generators seeded with
  (seed, step, global example index), where rank r's local example j is global example
  r * batch_size + j. So N ranks with batch b see exactly the examples one rank with
  batch N * b would (given the same videos), and the effective batch is b * N;
- torch's global RNG (dropout is its only user in training): reseeded every step from
  (seed, step, rank). Dropout masks are the one thing that depends on how the global
  batch is split across ranks.

Measurements during training run inside `random_state_kept`, so they never move these numbers.
"""

import contextlib
import random

import numpy as np
import torch


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
