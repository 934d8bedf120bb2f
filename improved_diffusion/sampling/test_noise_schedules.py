"""Tests for within-stage noise schedules: formulas, shape rules, and Diffusion Forcing's level mapping."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from improved_diffusion.sampling.noise_schedules import (
    ScheduleError,
    autoregressive,
    full_sequence,
    levels_to_timesteps,
    noise_levels,
    noise_schedules,
    pyramid,
    trapezoid,
)


def slow_pyramid(h, S, u):
    """Diffusion Forcing's formula written as plain loops: clip(S + int(j*u) - m, 0, S)."""
    rows = S + int((h - 1) * u) + 1
    return [[min(max(S + int(j * u) - m, 0), S) for j in range(h)] for m in range(rows)]


def slow_trapezoid(h, S, u):
    lag = [int(min(j, h - 1 - j) * u) for j in range(h)]
    rows = S + max(lag) + 1
    return [[min(max(S + lag[j] - m, 0), S) for j in range(h)] for m in range(rows)]


def test_full_sequence_example():
    assert full_sequence(2, 3, 7.0).tolist() == [[3, 3], [2, 2], [1, 1], [0, 0]]


def test_pyramid_examples():
    assert pyramid(3, 2, 1).tolist() == [[2, 2, 2], [1, 2, 2], [0, 1, 2], [0, 0, 1], [0, 0, 0]]
    # int() truncation: with u = 0.5 neighbouring frames share a level.
    assert pyramid(4, 2, 0.5).tolist() == [[2, 2, 2, 2], [1, 1, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_autoregressive_is_staircase_and_ignores_u():
    m = autoregressive(3, 2, 0.25)
    assert m.tolist() == [[2, 2, 2], [1, 2, 2], [0, 2, 2], [0, 1, 2], [0, 0, 2], [0, 0, 1], [0, 0, 0]]
    assert np.array_equal(m, autoregressive(3, 2, 3.0))
    # With one frame every schedule is full_sequence.
    for schedule in noise_schedules.values():
        assert np.array_equal(schedule(1, 5, 2.0), full_sequence(1, 5))


def test_trapezoid_example_and_symmetry():
    assert trapezoid(4, 2, 1).tolist() == [[2, 2, 2, 2], [1, 2, 2, 1], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert trapezoid(5, 1, 1).tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]


@settings(database=None)  # the example budget is the profile's (improved_diffusion/conftest.py)
@given(h=st.integers(1, 12), S=st.integers(1, 20),
       u=st.one_of(st.integers(0, 4), st.sampled_from([0.1, 0.25, 0.5, 0.7, 1.5, 2.5])))
def test_schedules_match_formulas_and_rules(h, S, u):
    expected = {
        "full_sequence": slow_pyramid(h, S, 0),
        "pyramid": slow_pyramid(h, S, u),
        "autoregressive": slow_pyramid(h, S, S),
        "trapezoid": slow_trapezoid(h, S, u),
    }
    for name, schedule in noise_schedules.items():
        m = schedule(h, S, u)
        assert m.dtype.kind == "i" and m.tolist() == expected[name], name
        assert (m[0] == S).all() and (m[-1] == 0).all(), name
        steps = m[:-1] - m[1:]
        assert ((steps == 0) | (steps == 1)).all(), name  # never rises, falls one level at a time
    assert pyramid(h, S, u).shape[0] == S + int((h - 1) * u) + 1
    t = trapezoid(h, S, u)
    assert np.array_equal(t, t[:, ::-1])


def test_bad_parameters():
    with pytest.raises(ScheduleError, match="valid names are full_sequence"):
        noise_levels("nope", 3, 10)
    with pytest.raises(ScheduleError, match="at least one latent frame"):
        pyramid(0, 10)
    with pytest.raises(ScheduleError, match="sampling_steps"):
        pyramid(3, 0)
    with pytest.raises(ScheduleError, match="uncertainty_scale"):
        pyramid(3, 10, -1.0)


def test_levels_to_timesteps_examples():
    # Diffusion Forcing's mapping, from SCHEMES.md.
    assert levels_to_timesteps(np.arange(51), 50, 1000).tolist() == [-1] + [20 * k - 1 for k in range(1, 51)]
    assert levels_to_timesteps(np.arange(101), 100, 1000).tolist() == [-1] + [10 * k - 1 for k in range(1, 101)]
    assert levels_to_timesteps([0, 1], 1, 1000).tolist() == [-1, 999]
    assert levels_to_timesteps(np.arange(4), 3, 1000).tolist() == [-1, 332, 665, 999]
    m = pyramid(3, 4, 1)
    out = levels_to_timesteps(torch.from_numpy(m), 4, 1000)
    assert out.dtype == torch.long and out.shape == m.shape and out[0, 0] == 999 and out[-1, -1] == -1


def test_levels_to_timesteps_keeps_float32_truncation():
    # The table is torch.linspace in float32 truncated by .long(). Exact arithmetic would give
    # trunc(-1 + k * 1000 / S), which is one higher at these levels (found by comparing the two).
    assert levels_to_timesteps([13], 26, 1000).tolist() == [498]  # exact: 499
    assert levels_to_timesteps([15, 27], 60, 1000).tolist() == [248, 448]  # exact: 249, 449
    assert levels_to_timesteps([15, 27, 30], 120, 1000).tolist() == [123, 223, 248]  # exact: 124, 224, 249
    with pytest.raises(ScheduleError, match="0..10"):
        levels_to_timesteps([11], 10, 1000)


def test_noise_levels_passes_every_argument_and_defaults_to_u_1():
    # The docstrings' default lag per frame is u = 1 (DF's default uncertainty_scale).
    assert pyramid(3, 2).tolist() == slow_pyramid(3, 2, 1)
    assert trapezoid(5, 2).tolist() == slow_trapezoid(5, 2, 1)
    assert noise_levels("pyramid", 3, 2).tolist() == slow_pyramid(3, 2, 1)
    assert noise_levels("pyramid", 4, 3, 2.0).tolist() == slow_pyramid(4, 3, 2.0)
    assert noise_levels("trapezoid", 5, 2, 0.5).tolist() == slow_trapezoid(5, 2, 0.5)
    assert noise_levels("autoregressive", 2, 3, 0.1).tolist() == slow_pyramid(2, 3, 3)


@pytest.mark.parametrize("h, S", [(True, 3), (2.0, 3), (3, True), (3, 2.0), (3, 0)])
def test_schedules_refuse_non_integer_sizes(h, S):
    for schedule in noise_schedules.values():
        with pytest.raises(ScheduleError, match="latent frame" if h != 3 or isinstance(h, bool) else "sampling_steps"):
            schedule(h, S)


def test_levels_to_timesteps_steps_range():
    # S may equal the number of timesteps (level k -> timestep k - 1), not exceed it, and must be a positive int.
    assert levels_to_timesteps(np.arange(11), 10, 10).tolist() == list(range(-1, 10))
    with pytest.raises(ScheduleError, match=r"sampling_steps \(11\) cannot exceed .* \(10\)"):
        levels_to_timesteps([0], 11, 10)
    for S in (0, True, 2.0, -1):
        with pytest.raises(ScheduleError, match="sampling_steps must be a positive integer"):
            levels_to_timesteps([0], S, 1000)
