"""Which frames a training example shows the model, and at which noise levels.

FDM trains one network for every sampling scheme by drawing, per video, a random set of
latent frames and a random set of observed frames (at most `max_frames` together), each
set an evenly spaced run with a log-uniform spacing, then padding the example to
`max_frames` with random frames of another video. Diffusion Forcing instead gives every
frame its own noise level. `noise_mode` chooses between them:

- fdm: FDM's masks, one t for all latent frames of a video.
- diffusion_forcing: every frame latent, each with an independent t.
- mixed: FDM's masks; half of the examples give each latent frame its own t, and a
  quarter give the observed frames a small noise level (so that stabilized sampling, which
  shows generated frames as slightly noisy, is in distribution). Serves every scheme.

Every random choice takes an explicit numpy Generator, so a batch is a pure function of
(seed, step, rank) and a resumed run repeats it exactly.

Per-frame conditions (actions, [T x D] per video) are gathered with the same frame indices as
the frames, so each slot's vector is that of the frame it holds; a padding frame taken from
another video brings that video's vector for it.
"""

import numpy as np
import torch

from ..frame_batch import gather_frames
from .timestep_sampler import draw_timesteps

NOISE_MODES = ("fdm", "diffusion_forcing", "mixed")
MIXED_PER_FRAME_PROB = 0.5
MIXED_NOISY_OBS_PROB = 0.25
MAX_OBS_NOISE_FRACTION = 0.1  # observed frames get t < 10% of the chain in mixed mode


def sample_some_indices(max_indices, T, rng):
    """An evenly spaced run of 1..max_indices frame indices in [0, T), log-uniform spacing.

    FDM's rule: s ~ U{1..max_indices}, spacing = exp(U * log(T / (s - 0.999))), start
    uniform where the run fits; retried in the rare case truncation leaves [0, T).
    """
    while True:
        s = int(rng.integers(1, max_indices + 1))
        max_scale = T / (s - 0.999)
        scale = np.exp(rng.random() * np.log(max_scale))
        pos = rng.random() * (T - scale * (s - 1))
        indices = [int(pos + i * scale) for i in range(s)]
        if all(0 <= i < T for i in indices):
            return indices


def sample_masks(batch_size, T, max_frames, rng):
    """Boolean obs and latent masks [B x T]: disjoint, at most max_frames frames together."""
    obs = np.zeros((batch_size, T), dtype=bool)
    latent = np.zeros((batch_size, T), dtype=bool)
    for b in range(batch_size):
        latent[b, sample_some_indices(max_frames, T, rng)] = True
        while True:
            room = max_frames - obs[b].sum() - latent[b].sum()
            if room == 0:  # full: FDM's loop would draw forever when T == max_frames
                break
            target = obs if rng.random() < 0.5 else latent
            indices = np.array(sample_some_indices(max_frames, T, rng))
            indices = indices[~(obs[b, indices] | latent[b, indices])]
            if len(indices) > room:
                break
            target[b, indices] = True
    return obs, latent


def gather_training_batch(videos, pad_videos, obs, latent, max_frames, rng, actions=None, pad_actions=None):
    """Select the chosen frames of each video and pad to max_frames.

    videos, pad_videos: [B x T x C x H x W]; obs, latent: bool [B x T]. Returns a dict with
    x [B x K x C x H x W], frame_indices [B x K] and float masks [B x K x 1 x 1 x 1].
    Padding frames (from pad_videos, at random indices; pad_videos None disables padding)
    are in neither mask: they attend only to each other and are denoised unconditionally.
    actions, pad_actions: [B x T x D] vectors of the frames of videos and pad_videos (or None);
    with them the dict also holds `cond` [B x K x D], each slot's frame's vector.
    """
    B, T = obs.shape
    chosen = obs | latent
    K = max_frames if pad_videos is not None else int(chosen.sum(axis=1).max())
    frames = [np.flatnonzero(chosen[b]) for b in range(B)]

    def pad(b, n):
        pad_idx = rng.integers(0, T, size=n)
        if actions is None:
            return pad_videos[b, pad_idx], pad_idx
        return pad_videos[b, pad_idx], pad_idx, pad_actions[b, pad_idx]

    return gather_frames(videos, frames, [obs[b, frames[b]] for b in range(B)], K,
                         pad=None if pad_videos is None else pad, actions=actions)


def training_example(videos, pad_videos, max_frames, noise_mode, num_timesteps, rng, p=None, actions=None,
                     pad_actions=None):
    """Everything one training step needs, for any noise mode.

    Returns dict(x, frame_indices, obs_mask, latent_mask, t, noisy_obs): `t` is [B] or
    [B x K], drawn from the timestep distribution `p` (None: uniform; see timestep_sampler);
    `noisy_obs` [B x K x 1 x 1 x 1] marks observed frames that must be shown noised to their
    own t (mixed mode only). `noise_mode` is one of NOISE_MODES (TrainConfig.validate checks).
    actions, pad_actions: per-frame vectors [B x T x D] of videos and pad_videos (None: none);
    with them the dict holds `cond` [B x K x D] too. They draw no random numbers.
    """
    B, T = videos.shape[:2]
    if noise_mode == "diffusion_forcing":
        K = min(max_frames, T)
        starts = rng.integers(0, T - K + 1, size=B)
        obs = np.zeros((B, T), dtype=bool)
        latent = np.zeros((B, T), dtype=bool)
        for b, s in enumerate(starts):
            latent[b, s:s + K] = True
        batch = gather_training_batch(videos, None, obs, latent, K, rng, actions)
        batch["t"] = draw_timesteps((B, K), num_timesteps, p, rng)
        batch["noisy_obs"] = torch.zeros_like(batch["obs_mask"])
        return batch

    obs, latent = sample_masks(B, T, max_frames, rng)
    batch = gather_training_batch(videos, pad_videos, obs, latent, max_frames, rng, actions, pad_actions)
    K = batch["x"].shape[1]
    if noise_mode == "fdm":
        batch["t"] = draw_timesteps(B, num_timesteps, p, rng)
        batch["noisy_obs"] = torch.zeros_like(batch["obs_mask"])
        return batch
    # mixed
    per_video = draw_timesteps((B, 1), num_timesteps, p, rng).numpy().repeat(K, axis=1)
    per_frame = draw_timesteps((B, K), num_timesteps, p, rng).numpy()
    use_per_frame = rng.random(B) < MIXED_PER_FRAME_PROB
    t = np.where(use_per_frame[:, None], per_frame, per_video)
    noisy_obs = rng.random(B) < MIXED_NOISY_OBS_PROB
    # Observed frames carry no loss, so their small t stays uniform whatever p is.
    small = rng.integers(0, max(1, int(MAX_OBS_NOISE_FRACTION * num_timesteps)), size=(B, K))
    is_obs = batch["obs_mask"].view(B, K).numpy() > 0
    t = np.where(is_obs & noisy_obs[:, None], small, t)
    batch["t"] = torch.from_numpy(t)
    batch["noisy_obs"] = batch["obs_mask"] * torch.from_numpy(noisy_obs.astype(np.float32)).view(B, 1, 1, 1, 1)
    return batch
