"""Run a frame plan x a noise schedule on a model: the long-video sampler.

A plan gives stages (observed frame indices, latent frame indices). Each stage shows the
model its frames (observed first, then latent, FDM's layout) and denoises the latent ones
along the stage's noise-level matrix (rows = denoising steps, columns = latent frames,
levels 0..S with S = pure noise). Levels map to the diffusion's (respaced) timesteps as
Diffusion Forcing maps them. Per row transition:

- latent frames whose level does not change are left untouched;
- latent frames already at level 0 are shown to the model as observed (clean) frames;
- observed frames get the largest timestep being denoised (so `full_sequence` is exactly
  FDM's sampler), or, with stabilization, generated observed frames get the timestep of
  `stabilization_level` (Diffusion Forcing): their pixels never change, only the noise
  level the model is told.

Transitions that move every changing frame by one step use ancestral (DDPM) sampling
unless DDIM is asked for; larger jumps need DDIM.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .noise_schedules import levels_to_timesteps, noise_schedules
from .script_util import UserError


@dataclass
class StageSettings:
    noise_schedule: str = "full_sequence"
    uncertainty_scale: float = 1.0
    sampling_steps: int = 0  # levels per schedule; 0: the diffusion's number of (respaced) steps
    stabilization_level: int = 0  # 0: observed frames are shown clean, at the current t
    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True


def stage_levels(settings, num_latent, num_timesteps):
    """The integer noise-level matrix [rows x num_latent] of one stage, and its S."""
    S = settings.sampling_steps or num_timesteps
    if settings.noise_schedule not in noise_schedules:
        raise UserError(f"Unknown noise schedule '{settings.noise_schedule}'; choose one of "
                        f"{', '.join(sorted(noise_schedules))}.")
    levels = np.asarray(noise_schedules[settings.noise_schedule](num_latent, S, settings.uncertainty_scale))
    return levels, S


def frame_batch(videos, obs_lists, latent_lists):
    """Gather each video's stage frames (observed first, then latent), padded to one length.

    Returns x0 [B x K x C x H x W], frame_indices [B x K], obs/latent masks [B x K x 1 x 1 x 1].
    Padding slots repeat frame 0 and sit in neither mask.
    """
    B = videos.shape[0]
    K = max(len(o) + len(l) for o, l in zip(obs_lists, latent_lists))
    frame_indices = torch.zeros(B, K, dtype=torch.long)
    obs_mask = torch.zeros(B, K, 1, 1, 1)
    latent_mask = torch.zeros(B, K, 1, 1, 1)
    for b, (obs, lat) in enumerate(zip(obs_lists, latent_lists)):
        idx = list(obs) + list(lat)
        frame_indices[b, : len(idx)] = torch.tensor(idx, dtype=torch.long)
        obs_mask[b, : len(obs)] = 1
        latent_mask[b, len(obs): len(idx)] = 1
    x0 = torch.stack([videos[b, frame_indices[b]] for b in range(B)])
    return x0, frame_indices.to(videos.device), obs_mask.to(videos.device), latent_mask.to(videos.device)


@torch.no_grad()
def sample_stage(model, diffusion, videos, obs_lists, latent_lists, settings, generated=None, generator=None):
    """Generate one stage's latent frames and write them into `videos` (in place).

    videos [B x T x C x H x W]; obs_lists/latent_lists: per video, lists of frame indices;
    generated: bool [B x T], frames produced by the model so far (for stabilization).
    """
    device = videos.device
    x0, frame_indices, obs_mask, latent_mask = frame_batch(videos, obs_lists, latent_lists)
    B, K = frame_indices.shape
    n_obs = [len(o) for o in obs_lists]
    n_lat = [len(l) for l in latent_lists]
    h = max(n_lat)
    levels, S = stage_levels(settings, h, diffusion.num_timesteps)
    timesteps = torch.from_numpy(np.asarray(levels_to_timesteps(levels, S, diffusion.num_timesteps))).long()
    if settings.stabilization_level:
        stab_t = int(levels_to_timesteps(np.array([settings.stabilization_level]), S, diffusion.num_timesteps)[0])

    # Column j of the matrix drives the j-th latent frame of every video.
    column = torch.full((B, K), -1, dtype=torch.long)
    for b in range(B):
        column[b, n_obs[b]: n_obs[b] + n_lat[b]] = torch.arange(n_lat[b])
    is_latent = column >= 0
    is_obs = obs_mask.view(B, K).bool().cpu()
    stabilized = torch.zeros(B, K, dtype=torch.bool)
    if settings.stabilization_level and generated is not None:
        for b in range(B):
            stabilized[b, : n_obs[b]] = generated[b, torch.tensor(list(obs_lists[b]), dtype=torch.long)].cpu()

    x = x0.clone()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device)
    x = torch.where(latent_mask.bool(), noise, x)
    for m in range(len(timesteps) - 1):
        t_from = torch.where(is_latent, timesteps[m][column.clamp(min=0)], torch.full_like(column, -1))
        t_to = torch.where(is_latent, timesteps[m + 1][column.clamp(min=0)], torch.full_like(column, -1))
        moving = is_latent & (t_to != t_from)
        if not moving.any():
            continue
        done = is_latent & (t_from < 0)  # finished earlier in this stage: condition on it
        shown_obs = is_obs | done
        current = int(t_from[moving].max())
        t_model = torch.where(is_latent & ~done, t_from, torch.full_like(t_from, current))
        if settings.stabilization_level:
            t_model = torch.where(stabilized | done, torch.full_like(t_model, stab_t), t_model)
        kwargs = {
            "x0": torch.where(done.view(B, K, 1, 1, 1).to(device), x, x0),
            "frame_indices": frame_indices,
            "obs_mask": shown_obs.view(B, K, 1, 1, 1).float().to(device),
            "latent_mask": (is_latent & ~done).view(B, K, 1, 1, 1).float().to(device),
        }
        move_mask = moving.view(B, K, 1, 1, 1).float().to(device)
        t_model, t_to_dev = t_model.to(device), t_to.to(device)
        one_step = bool(((t_from - t_to)[moving] == 1).all())
        if settings.use_ddim or not one_step:
            if not settings.use_ddim:
                raise UserError("This noise schedule skips diffusion steps; sample it with --use_ddim True.")
            out = diffusion.ddim_step(model, x, t_model, torch.where(moving.to(device), t_to_dev, t_model),
                                      settings.clip_denoised, model_kwargs=kwargs, latent_mask=move_mask,
                                      eta=settings.eta, generator=generator)
        else:
            step_noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device)
            out = diffusion.p_sample(model, x, t_model, settings.clip_denoised, model_kwargs=kwargs,
                                     latent_mask=move_mask, noise=step_noise)
        x = out["sample"]
    for b in range(B):
        lat = torch.tensor(list(latent_lists[b]), dtype=torch.long)
        videos[b, lat] = x[b, n_obs[b]: n_obs[b] + n_lat[b]]
        if generated is not None:
            generated[b, lat] = True
    return videos


def per_video_lists(indices, batch_size):
    """Accept a plan's output for one video (list of ints) or per video (list of lists)."""
    if len(indices) and isinstance(indices[0], (list, tuple, np.ndarray, torch.Tensor)):
        return [list(map(int, i)) for i in indices]
    return [list(map(int, indices)) for _ in range(batch_size)]


def sample_video(model, diffusion, videos, n_obs, plan, settings, generator=None, progress=False):
    """Fill frames n_obs.. of `videos` [B x T x C x H x W] stage by stage along `plan`.

    `plan` is an iterable of (obs, latent) stages; plans that need the videos so far
    (adaptive ones) expose `set_videos`, called before every stage.
    """
    videos = videos.clone()
    B, T = videos.shape[:2]
    videos[:, n_obs:] = 0
    generated = torch.zeros(B, T, dtype=torch.bool)
    iterator = iter(plan)
    bar = tqdm(desc="stages", disable=not progress, leave=False)
    while True:
        if hasattr(iterator, "set_videos"):
            iterator.set_videos(videos)
        try:
            obs, latent = next(iterator)
        except StopIteration:
            break
        obs_lists, latent_lists = per_video_lists(obs, B), per_video_lists(latent, B)
        sample_stage(model, diffusion, videos, obs_lists, latent_lists, settings, generated, generator)
        bar.update(1)
    bar.close()
    return videos
