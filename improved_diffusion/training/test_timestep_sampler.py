"""--schedule_sampler: the loss-second-moment distribution against its closed form, and its use in training."""

import numpy as np
import torch

from improved_diffusion.training.frame_masks import training_example
from improved_diffusion.training.test_train_loop import tiny_loop
from improved_diffusion.training.timestep_sampler import (
    LossSecondMomentSampler,
    UniformSampler,
    draw_timesteps,
    importance_weights,
)


def warmed_up(scales, history=10):
    """A sampler whose losses at t are scales[t] * (1, 2, ..., history), fed in random order."""
    sampler = LossSecondMomentSampler(len(scales), history=history)
    pairs = [(t, scales[t] * k) for t in range(len(scales)) for k in range(1, history + 1)]
    order = np.random.default_rng(0).permutation(len(pairs))
    sampler.update([pairs[i][0] for i in order], [pairs[i][1] for i in order])
    return sampler


def test_probabilities_are_the_closed_form_rms_mixture():
    scales = np.array([0.5, 1.0, 2.0, 4.0, 0.25])
    p = warmed_up(scales).probabilities()
    # rms_t = scales[t] * sqrt(mean(k^2)) is proportional to scales[t]; 0.1% uniform is mixed in.
    expected = 0.999 * scales / scales.sum() + 0.001 / len(scales)
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_uniform_until_every_timestep_has_a_full_history_then_oldest_out():
    sampler = LossSecondMomentSampler(3, history=2)
    sampler.update([0, 0, 1, 1, 2], [1.0, 1.0, 1.0, 1.0, 5.0])
    assert sampler.probabilities() is None  # timestep 2 has one loss
    sampler.update([2, 2], [3.0, 4.0])  # 5.0 drops out: history of t=2 is (3, 4)
    rms = np.array([1.0, 1.0, np.sqrt((9 + 16) / 2)])
    np.testing.assert_allclose(sampler.probabilities(), 0.999 * rms / rms.sum() + 0.001 / 3, rtol=1e-12)
    restored = LossSecondMomentSampler(3, history=2)
    restored.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(restored.probabilities(), sampler.probabilities())
    assert UniformSampler().probabilities() is None


def test_draws_follow_p_and_weights_make_the_expectation_uniform():
    p = np.array([0.1, 0.6, 0.05, 0.25])
    t = draw_timesteps(200_000, 4, p, np.random.default_rng(1))
    freq = np.bincount(t.numpy(), minlength=4) / len(t)
    np.testing.assert_allclose(freq, p, atol=0.005)
    # E_p[w(t) f(t)] = sum_t p_t f(t) / (N p_t) = mean_t f(t), for any f.
    f = torch.tensor([3.0, -1.0, 7.0, 2.0])
    all_t = torch.arange(4)
    assert torch.isclose((torch.from_numpy(p).float() * importance_weights(all_t, p) * f).sum(), f.mean())
    assert torch.equal(importance_weights(all_t, None), torch.ones(4))


def test_per_frame_timesteps_are_drawn_frame_by_frame_from_p():
    videos = torch.zeros(3, 12, 3, 4, 4)
    p = np.full(50, 1e-9)
    p[[7, 30]] = 0.5
    p /= p.sum()
    ex = training_example(videos, None, 6, "diffusion_forcing", 50, np.random.default_rng(0), p)
    t = ex["t"]
    assert t.shape == (3, 6) and set(t.flatten().tolist()) == {7, 30}  # frames differ within a video
    weights = importance_weights(t, p)
    torch.testing.assert_close(weights, torch.full((3, 6), 1 / (50 * 0.5)), rtol=1e-6, atol=0)


def test_training_records_one_loss_per_trained_frame_or_per_video(tmp_path, monkeypatch, one_thread):
    for mode in ("fdm", "diffusion_forcing"):
        loop = tiny_loop(tmp_path, monkeypatch, schedule_sampler="loss-second-moment", noise_mode=mode,
                         pad_with_random_frames=False)
        recorded = []
        update = loop.schedule_sampler.update
        loop.schedule_sampler.update = lambda ts, ls: (recorded.append((ts, ls)), update(ts, ls))
        loop.run_step()
        (ts, losses), = recorded
        expected = 2 if mode == "fdm" else 2 * 4  # batch 2; per-frame: every frame of the 4 is trained
        assert len(ts) == len(losses) == expected and loop.schedule_sampler.loss_counts.sum() == expected
        assert np.all(np.isfinite(losses)) and np.all(losses > 0)
