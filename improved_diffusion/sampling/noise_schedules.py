"""Within-stage noise schedules: how the noise levels of a stage's new frames fall over denoising steps.

Every schedule is a plain function with one signature, in the style of k-diffusion's schedule
constructors:

    schedule(h, S, uncertainty_scale) -> integer array [R x h]

h is the number of latent frames in the stage and S the number of sampling steps. Row 0 is the first
state, each later row one denoising step further; column j is the stage's j-th latent frame. Values
are coarse noise levels: S is pure noise, 0 is clean. Consecutive rows lower each frame by at most one
level, the first row is all S and the last all 0, so R rows mean R - 1 model calls.

The matrices follow Diffusion Forcing (buoyancy99/diffusion-forcing,
algorithms/diffusion_forcing/df_base.py, `_generate_scheduling_matrix`), except `trapezoid`, which
is made symmetric (see its docstring). `levels_to_timesteps` maps levels to diffusion timesteps the
way Diffusion Forcing's `sample_step` does.
"""

import math

import numpy as np
import torch

from ..errors import ScheduleError


def _check(h, S, uncertainty_scale):
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
        raise ScheduleError(f"a stage needs at least one latent frame, got h={h!r}.")
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < 1:
        raise ScheduleError(f"sampling_steps must be a positive integer, got {S!r}.")
    if not (isinstance(uncertainty_scale, (int, float, np.number)) and math.isfinite(uncertainty_scale)
            and uncertainty_scale >= 0):
        raise ScheduleError(f"uncertainty_scale must be a finite number >= 0, got {uncertainty_scale!r}.")


def _staggered(offsets, S):
    """Frame j starts falling `offsets[j]` steps late: level clip(S + offsets[j] - m, 0, S) at row m."""
    offsets = np.asarray(offsets, dtype=np.int64)
    rows = np.arange(S + int(offsets.max()) + 1, dtype=np.int64)[:, None]
    return np.clip(S + offsets[None, :] - rows, 0, S)


def full_sequence(h, S, uncertainty_scale=1.0):
    """All frames fall together, S+1 rows (FDM's behaviour); uncertainty_scale is ignored."""
    _check(h, S, uncertainty_scale)
    return _staggered([0] * h, S)


def pyramid(h, S, uncertainty_scale=1.0):
    """Frame j lags int(j * u) steps behind frame 0: S + int((h-1) * u) + 1 rows.

    int() truncates as in Diffusion Forcing, so with u = 0.5 neighbouring frames share a level.
    """
    _check(h, S, uncertainty_scale)
    return _staggered([int(j * uncertainty_scale) for j in range(h)], S)


def autoregressive(h, S, uncertainty_scale=1.0):
    """Each frame is fully denoised before the next starts: the pyramid with u = S (h*S + 1 rows)."""
    _check(h, S, uncertainty_scale)
    return pyramid(h, S, S)


def trapezoid(h, S, uncertainty_scale=1.0):
    """Both ends lead and the middle lags: frame j lags int(min(j, h-1-j) * u) steps.

    Column j mirrors column h-1-j, the first row is all S and the last all 0. Diffusion Forcing's
    version differs in three ways that we do not copy: it mirrors column t onto column -t, i.e. h-t
    rather than h-1-t, so odd h gives a lopsided shape; for even h its middle column is never assigned
    and stays at level 0 (treated as clean from the start); and its S + int(((h+1)//2) * u) rows lack
    the final "+1", so with u = 0.5 some frames never reach level 0 while with u >= 2 it ends in
    repeated all-zero rows.
    """
    _check(h, S, uncertainty_scale)
    return _staggered([int(min(j, h - 1 - j) * uncertainty_scale) for j in range(h)], S)


noise_schedules = {
    "full_sequence": full_sequence,
    "pyramid": pyramid,
    "autoregressive": autoregressive,
    "trapezoid": trapezoid,
}


def noise_levels(name, h, S, uncertainty_scale=1.0):
    """The matrix of schedule `name`, with a one-sentence ScheduleError for an unknown name."""
    if name not in noise_schedules:
        raise ScheduleError(f"unknown noise schedule {name!r}; valid names are {', '.join(noise_schedules)}.")
    return noise_schedules[name](h, S, uncertainty_scale)


def levels_to_timesteps(levels, S, num_timesteps):
    """Map coarse levels 0..S to diffusion timesteps as Diffusion Forcing's sample_step does.

    Level k becomes entry k of torch.linspace(-1, num_timesteps - 1, S + 1) in float32, truncated
    towards zero by .long(): level 0 is -1 (clean), level S is num_timesteps - 1, and when S divides
    num_timesteps level k is k * num_timesteps / S - 1. Returns a long tensor shaped like `levels`.
    """
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < 1:
        raise ScheduleError(f"sampling_steps must be a positive integer, got {S!r}.")
    if S > num_timesteps:
        raise ScheduleError(f"sampling_steps ({S}) cannot exceed the number of diffusion timesteps ({num_timesteps}).")
    table = torch.linspace(-1, num_timesteps - 1, S + 1, dtype=torch.float32).long()
    if torch.is_tensor(levels):
        levels = levels.long()
    else:
        levels = torch.as_tensor(np.asarray(levels), dtype=torch.long)
    if levels.numel() and (levels.min() < 0 or levels.max() > S):
        raise ScheduleError(f"noise levels must lie in 0..{S}.")
    return table.to(levels.device)[levels]
