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


@settings(database=None)  # the example budget is the profile's (improved_diffusion/conftest.py)
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


@settings(database=None)
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


def test_masks_follow_fdms_drawing_loop_step_by_step():
    """Scripted draws: the latent run first, then runs that go to obs when random() < 0.5, else to latent.

    Runs skip frames already chosen, and the first run that does not fit the room left ends the loop.
    """
    # Every run below has spacing 1 (u_scale = 0): its frames are floor(u_pos * (T - s + 1)) + 0..s-1.
    T, K = 20, 6
    rng = ScriptedRng(integers=[1, 2, 3, 2, 2],
                      randoms=[0.0, 0.5,  # latent run {10}
                               0.2, 0.0, 0.0,  # < 0.5: obs gets {0, 1}
                               0.5, 0.0, 0.5,  # 0.5 is not < 0.5: latent gets {9, 10, 11} less 10
                               0.9, 0.0, 0.0,  # latent run {0, 1}: both taken, nothing added
                               0.1, 0.0, 0.99])  # obs run {18, 19} does not fit the 1 frame left: stop
    obs, latent = sample_masks(1, T, K, rng)
    assert np.flatnonzero(obs[0]).tolist() == [0, 1]
    assert np.flatnonzero(latent[0]).tolist() == [9, 10, 11]
    assert not rng._integers and not rng._randoms  # every scripted draw was used, none more


def _videos(B, T):
    """Videos whose pixels hold their frame index (and pad videos its negative), to see which frame went where."""
    frames = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1, 1).expand(B, T, 1, 2, 2)
    return frames.clone(), -frames.clone() - 1


def test_padding_fills_the_window_with_random_frames_of_the_pad_videos():
    rng = np.random.default_rng(3)
    videos, pad_videos = _videos(400, 12)
    ex = training_example(videos, pad_videos, 8, "fdm", 1000, rng)
    B, K = ex["x"].shape[:2]
    assert K == 8
    chosen = (ex["obs_mask"] + ex["latent_mask"]).view(B, K) > 0
    assert (~chosen).any()  # some examples are padded
    value = ex["x"][:, :, 0, 0, 0]
    idx = ex["frame_indices"].float()
    assert torch.equal(value[chosen], idx[chosen])  # chosen slots: the video's own frames
    assert torch.equal(value[~chosen], -idx[~chosen] - 1)  # padding slots: the pad video's frame at that index
    pad_idx = ex["frame_indices"][~chosen]
    assert set(pad_idx.tolist()) == set(range(12))  # uniform over the whole video, first and last frame included
    assert any(len(set(ex["frame_indices"][b][~chosen[b]].tolist())) > 1 for b in range(B))  # one draw per slot
    # Padding fills the window even when no example of the batch chose max_frames frames.
    for seed in range(20):
        small = training_example(videos[:2], pad_videos[:2], 8, "fdm", 1000, np.random.default_rng(seed))
        assert small["x"].shape[1] == 8
    # Without pad videos, the batch is only as long as its longest example.
    lengths = []
    for seed in range(20):
        ex = training_example(videos[:2], None, 8, "fdm", 1000, np.random.default_rng(seed))
        chosen = (ex["obs_mask"] + ex["latent_mask"]).view(2, -1) > 0
        assert ex["x"].shape[1] == chosen.sum(dim=1).max()
        lengths.append(ex["x"].shape[1])
    assert min(lengths) < 8


def test_diffusion_forcing_clips_start_anywhere_the_window_fits():
    videos, _ = _videos(300, 10)
    ex = training_example(videos, None, 4, "diffusion_forcing", 1000, np.random.default_rng(0))
    starts = ex["frame_indices"][:, 0]
    assert set(starts.tolist()) == set(range(7))  # 0 .. T - K
    assert torch.equal(ex["noisy_obs"], torch.zeros_like(ex["obs_mask"]))


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_timesteps_come_from_the_given_distribution(mode):
    """A distribution p that puts all mass on t = 900: every latent frame gets it; in mixed mode the
    observed frames of a noisy-obs example get a small uniform t, and only those."""
    N = 1000
    p = np.zeros(N)
    p[900] = 1.0
    videos, pad_videos = _videos(400, 16)
    ex = training_example(videos, pad_videos, 6, mode, N, np.random.default_rng(2), p=p)
    B, K = ex["x"].shape[:2]
    t = ex["t"] if ex["t"].dim() == 2 else ex["t"][:, None].expand(B, K)
    obs = ex["obs_mask"].view(B, K) > 0
    noisy = ex["noisy_obs"].view(B, K) > 0
    assert ex["noisy_obs"].shape == ex["obs_mask"].shape and ex["noisy_obs"].dtype == ex["obs_mask"].dtype
    assert (t[~noisy] == 900).all()
    if mode != "mixed":
        assert not noisy.any()
        return
    assert torch.equal(noisy, obs & noisy.any(dim=1, keepdim=True))  # all observed frames of chosen examples
    small = t[noisy]
    assert small.max() < MAX_OBS_NOISE_FRACTION * N
    assert small.max() > 0.8 * MAX_OBS_NOISE_FRACTION * N  # spread over [0, 100), not a fixed level
    per_example = [t[b][noisy[b]] for b in range(B) if noisy[b].sum() >= 3]
    assert any(len(set(v.tolist())) > 1 for v in per_example)  # one draw per frame
    fraction = noisy.any(dim=1)[obs.any(dim=1)].float().mean()
    assert abs(fraction - 0.25) < 0.08  # MIXED_NOISY_OBS_PROB of the examples that observe frames


@pytest.mark.parametrize("N, levels", [(40, {0, 1, 2, 3}), (5, {0})])
def test_small_observed_noise_levels_are_the_first_tenth_of_the_chain(N, levels):
    """Uniform over t < 10 % of N, t = 0 included; with 5 timesteps that rounds down to t = 0 only."""
    videos, pad_videos = _videos(200, 16)
    ex = training_example(videos, pad_videos, 6, "mixed", N, np.random.default_rng(4))
    B, K = ex["x"].shape[:2]
    noisy = ex["noisy_obs"].view(B, K) > 0
    assert set(ex["t"][noisy].tolist()) == levels


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_each_slot_carries_the_action_of_its_own_frame(mode):
    """cond[b, k] is the action of the frame in slot k: the video's for chosen slots, the pad video's
    (at the pad frame's index) for padding slots, in every noise mode; and actions draw no random numbers."""
    B, T, D = 64, 12, 3
    videos, pad_videos = _videos(B, T)
    b_idx, t_idx = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    actions = torch.from_numpy(np.stack([b_idx, t_idx, 0 * t_idx], axis=-1).astype(np.float32))  # [B x T x D]
    pad_actions = actions.clone()
    pad_actions[..., 2] = 1.0  # marks the pad video's actions
    pad = None if mode == "diffusion_forcing" else pad_videos
    ex = training_example(videos, pad, 8, mode, 1000, np.random.default_rng(5), actions=actions,
                          pad_actions=None if pad is None else pad_actions)
    plain = training_example(videos, pad, 8, mode, 1000, np.random.default_rng(5))
    for key in ("x", "frame_indices", "obs_mask", "latent_mask", "t"):
        assert torch.equal(ex[key], plain[key])
    K = ex["x"].shape[1]
    assert ex["cond"].shape == (B, K, D)
    chosen = (ex["obs_mask"] + ex["latent_mask"]).view(B, K) > 0
    rows = torch.arange(B)[:, None].expand(B, K)
    assert torch.equal(ex["cond"][..., 0], rows.float())
    assert torch.equal(ex["cond"][..., 1], ex["frame_indices"].float())
    assert torch.equal(ex["cond"][..., 2], (~chosen).float())
    if pad is not None:
        assert (~chosen).any()
