"""FDM's training masks and the noise levels of each noise mode."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from improved_diffusion.training.frame_masks import (
    MAX_OBS_NOISE_FRACTION,
    NOISE_MODES,
    sample_masks,
    sample_some_indices,
    training_example,
)


@settings(max_examples=200, deadline=None)
@given(max_indices=st.integers(1, 12), T=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_indices_are_an_evenly_spaced_run_inside_the_video(max_indices, T, seed):
    indices = sample_some_indices(max_indices, T, np.random.default_rng(seed))
    assert 1 <= len(indices) <= max_indices
    assert all(0 <= i < T for i in indices)
    # Evenly spaced: truncating pos + i * scale leaves gaps that differ by at most one frame,
    # and a spacing of at least one frame (while the run fits the video) repeats no frame.
    gaps = np.diff(indices)
    if len(gaps):
        assert gaps.max() - gaps.min() <= 1
        if max_indices <= T:
            assert gaps.min() >= 1


class ScriptedRng:
    """A stand-in for numpy's Generator that returns given draws, to check FDM's formula step by step."""

    def __init__(self, integers, randoms):
        self._integers, self._randoms = list(integers), list(randoms)
        self.integer_calls = []

    def integers(self, low, high):
        self.integer_calls.append((low, high))
        return self._integers.pop(0)

    def random(self):
        return self._randoms.pop(0)


def fdm_run(s, u_scale, u_pos, T):
    """FDM's sample_some_indices by hand: spacing exp(u * log(T / (s - 0.999))), start u' * (T - spacing (s - 1))."""
    import math

    scale = math.exp(u_scale * math.log(T / (s - 0.999)))
    pos = u_pos * (T - scale * (s - 1))
    return [math.floor(pos + i * scale) for i in range(s)]


@pytest.mark.parametrize("s, u_scale, u_pos, T", [(3, 0.5, 0.25, 40), (1, 0.9, 0.7, 10), (5, 0.0, 0.5, 12),
                                                  (4, 0.999, 0.1, 60), (2, 0.3, 0.999, 7)])
def test_indices_follow_fdms_log_uniform_spacing(s, u_scale, u_pos, T):
    rng = ScriptedRng([s], [u_scale, u_pos])
    assert sample_some_indices(6, T, rng) == fdm_run(s, u_scale, u_pos, T)
    assert rng.integer_calls == [(1, 7)]  # the run's length is uniform on 1..max_indices


@settings(max_examples=200, deadline=None)
@given(max_frames=st.integers(1, 10), extra=st.integers(0, 30), batch=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_masks_are_disjoint_nonempty_and_fit_the_window(max_frames, extra, batch, seed):
    # extra == 0 is T == max_frames: every frame can be chosen, and drawing must still stop.
    T = max_frames + extra
    obs, latent = sample_masks(batch, T, max_frames, np.random.default_rng(seed))
    assert obs.shape == latent.shape == (batch, T)
    assert not (obs & latent).any()
    assert (latent.sum(axis=1) >= 1).all()
    assert ((obs | latent).sum(axis=1) <= max_frames).all()


def test_a_window_as_long_as_the_video_is_often_filled_completely():
    rng = np.random.default_rng(0)
    obs, latent = sample_masks(200, 8, 8, rng)
    assert ((obs | latent).sum(axis=1) == 8).mean() > 0.2
    assert obs.any(axis=1).mean() > 0.3  # observed frames are common, not an edge case


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_training_examples_of_every_mode(mode):
    rng = np.random.default_rng(1)
    videos = torch.rand(64, 20, 3, 4, 4) * 2 - 1
    pad = torch.rand(64, 20, 3, 4, 4) * 2 - 1
    ex = training_example(videos, pad, 6, mode, 1000, rng)
    B, K = ex["x"].shape[:2]
    assert (B, K) == (64, 6)
    obs = ex["obs_mask"].view(B, K) > 0
    latent = ex["latent_mask"].view(B, K) > 0
    assert not (obs & latent).any() and latent.any(dim=1).all()
    # every chosen frame is the video's frame at its index
    for b in range(B):
        for k in np.flatnonzero((obs | latent)[b].numpy()):
            assert torch.equal(ex["x"][b, k], videos[b, ex["frame_indices"][b, k]])
    t = ex["t"]
    assert ((t >= 0) & (t < 1000)).all()
    if mode == "fdm":
        assert t.shape == (B,) and not ex["noisy_obs"].any()
    elif mode == "diffusion_forcing":
        assert t.shape == (B, K) and not obs.any()
        idx = ex["frame_indices"]
        assert torch.equal(idx[:, 1:] - idx[:, :-1], torch.ones(B, K - 1, dtype=idx.dtype))  # a contiguous clip
    else:
        noisy = ex["noisy_obs"].view(B, K) > 0
        assert noisy.any() and not (noisy & ~obs).any()
        assert (t[noisy] < MAX_OBS_NOISE_FRACTION * 1000).all()
        per_frame = (t * latent != (t * latent).amax(dim=1, keepdim=True) * latent).any(dim=1)
        assert per_frame.any() and not per_frame.all()  # both kinds of example occur
