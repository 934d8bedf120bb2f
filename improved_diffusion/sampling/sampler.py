"""Run a frame plan x a noise schedule on a model: the long-video sampler.

A plan gives stages (observed frame indices, latent frame indices). Each stage shows the
model its frames (observed first, then latent, FDM's layout) and denoises the latent ones
along the stage's noise-level matrix (rows = states, columns = latent frames, levels 0..S
with S = pure noise; see noise_schedules.py). Levels map to the diffusion's (respaced)
timesteps as Diffusion Forcing maps them. Per row transition (one model call), `run_rows`:

- latent frames whose level does not change are left untouched, bit for bit (a row where no level
  changes is skipped);
- the stage's update rule (stage_updates.py, `StageSettings.stabilization`) says what the model is
  shown and how the moving frames are updated: "generated" (ours, the default) is the diffusion's own
  `ddim_step` / `p_sample`, with latent frames that reached level 0 shown as observed frames and
  observed frames told the largest timestep being denoised, so `full_sequence` with S = the
  diffusion's step count is exactly FDM's sampler; "df" is Diffusion Forcing's `sample_step`
  (df_step.py). With `stabilization_level` k > 0 context frames are shown at timestep k - 1 of the
  training chain and told that timestep (DF's stabilization): "generated" only the frames the model
  generated, noised with fresh noise; "df" every context frame, given ones included. Their stored
  pixels never change;
- with `mcmc_steps` > 0, the frames that moved and are still noisy are refined (mcmc.py).

`clip_noise` > 0 clamps each stage's initial noise (and the sampler's other Gaussian draws)
to +-clip_noise, as DF does.

Without DDIM every transition is one ancestral (DDPM) step, so a schedule with fewer
levels than the diffusion has steps needs DDIM.

`sample_video(..., initial_noise=...)` takes each stage's starting noise from the caller, so a
trajectory of another codebase (e.g. DF's chunk noise) can be reproduced.

Randomness comes from one torch.Generator per video, used only for that video's noise, so a
video's sample does not depend on which other videos share its batch (or rank). A video's draws come
in a fixed order: the stage's initial noise (unless given), then per row the context noise, the step noise and
MCMC's draws (stage_updates.py).

Conditions (`conditions`, a guidance.Conditions): each model call gets, per stage slot, the vector
of the frame the slot holds (its action), and each video's label. `StageSettings.guidance_scale`
w != 1 samples with classifier-free guidance: every model call becomes one call on the doubled
batch [conditional; null] combined as uncond + w (cond - uncond) (guidance.py); the update, the
stabilization and every noise draw are the same as without guidance.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.gaussian_diffusion import model_output_tensor
from ..data.pixels import to_uint8
from ..errors import ConfigError, ScheduleError
from ..frame_batch import gather_frames
from . import df_step, mcmc
from .guidance import Conditions, guided
from .noise_schedules import levels_to_timesteps, noise_levels
from .scheme import Scheme
from .settings import check_settings
from .stage_updates import UPDATE_RULES, StageSlots


def stabilization_timestep(diffusion, level):
    """Index in the diffusion's (respaced) chain at which stabilized frames are shown.

    Diffusion Forcing shows them at timestep level - 1 of the training chain; after respacing we
    take the last kept timestep at or below it (kept timesteps always include 0).
    """
    kept = kept_timesteps(diffusion)
    return max(i for i, t in enumerate(kept) if t <= max(level - 1, kept[0]))


def stabilization_shown_at(diffusion, level):
    """The training-chain timestep stabilized frames are shown at: level - 1 unless respacing rounded it down."""
    return int(kept_timesteps(diffusion)[stabilization_timestep(diffusion, level)])


def kept_timesteps(diffusion):
    """The training-chain timestep of each step of the (respaced) chain."""
    return list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))


def stage_levels(settings, num_latent, num_timesteps):
    """The integer noise-level matrix [rows x num_latent] of one stage, and its S."""
    S = settings.sampling_steps or num_timesteps
    try:
        return np.asarray(noise_levels(settings.scheduling_matrix, num_latent, S, settings.uncertainty_scale)), S
    except ScheduleError as e:
        raise ConfigError(str(e)) from None


def video_generator(seed, sample_idx, video_index):
    """The generator of one video's noise: a function of (seed, sample_idx, video index) only.

    Its seed is the 64-bit number made of the two 32-bit words numpy's SeedSequence([seed,
    sample_idx, video_index]) generates first, so a results folder resumed by a later version draws
    the same noise (tested against that formula).
    """
    state = np.random.SeedSequence([seed, sample_idx, video_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_noise(shape, counts, generators, device):
    """Standard normal [B x K x C x H x W]; video b's first counts[b] frames come from generators[b] alone.

    Slots past a video's own frame count (padding) get zeros, so how a batch is padded never
    changes what a generator produces.
    """
    noise = torch.zeros(shape)
    for b, n in enumerate(counts):
        noise[b, :n] = torch.randn(n, *shape[2:], generator=generators[b])
    return noise.to(device)


def frame_batch(videos, obs_lists, latent_lists):
    """Each video's stage frames (observed first, then latent) in slots; padding repeats frame 0.

    Returns x0 [B x K x C x H x W], frame_indices [B x K], obs/latent masks [B x K x 1 x 1 x 1].
    (A slot's condition vector is gathered with the same frame_indices: Conditions.model_kwargs.)
    """
    batch = gather_frames(videos, [list(o) + list(l) for o, l in zip(obs_lists, latent_lists)],
                          [[True] * len(o) + [False] * len(l) for o, l in zip(obs_lists, latent_lists)])
    return batch["x"], batch["frame_indices"], batch["obs_mask"], batch["latent_mask"]


def draw_uniform(B, K, counts, generators, device):
    """Uniforms in [0, 1) [B x K]; video b's first counts[b] slots come from generators[b] alone (others: 0.5)."""
    values = torch.full((B, K), 0.5)
    for b, n in enumerate(counts):
        values[b, :n] = torch.rand(n, generator=generators[b])
    return values.to(device)


@torch.no_grad()
def sample_stage(model, diffusion, videos, obs_lists, latent_lists, settings, generated=None, generators=None,
                 callback=None, initial_noise=None, conditions=None, mcmc_stats=None):
    """Generate one stage's latent frames and write them into `videos` (in place).

    videos [B x T x C x H x W]; obs_lists/latent_lists: per video, lists of frame indices;
    generated: bool [B x T], frames produced by the model so far (the ones "generated"
    stabilization applies to; updated here); generators: one torch.Generator (or None: the global
    one) per video; callback: called after every model call with a dict (row, previous, x, t_from,
    t_to, t_model, pred_xstart), t_* being [B x K] timesteps per stage slot (-1: clean or not
    latent); initial_noise: [B x max latent frames x C x H x W], the latent frames' starting noise
    (used as given; None: drawn from the generators and clamped to +-clip_noise). conditions: a
    guidance.Conditions (None: an unconditional model); settings.guidance_scale guides with it.
    settings.mcmc_steps > 0 refines the latent frames after every transition with an energy model
    (mcmc.py); mcmc_stats (an mcmc.MCMCStats of the batch) collects acceptance and evaluation counts.
    """
    device = videos.device
    check_settings(settings, diffusion)
    model = guided(model, settings.guidance_scale)
    x0, frame_indices, obs_mask, latent_mask = frame_batch(videos, obs_lists, latent_lists)
    B, K = frame_indices.shape
    condition_kwargs = (conditions or Conditions()).model_kwargs(frame_indices)
    generators = [None] * B if generators is None else list(generators)
    n_obs = [len(o) for o in obs_lists]
    n_lat = [len(l) for l in latent_lists]
    counts = [o + l for o, l in zip(n_obs, n_lat)]
    levels, S = stage_levels(settings, max(n_lat), diffusion.num_timesteps)
    timesteps = levels_to_timesteps(levels, S, diffusion.num_timesteps)
    slots = StageSlots(x0, frame_indices, obs_mask.view(B, K).bool().cpu(), latent_columns(n_obs, n_lat, K),
                       condition_kwargs)
    generated_obs = observed_generated(generated if settings.stabilization_level else None, obs_lists, K)
    rule = UPDATE_RULES[settings.stabilization](
        diffusion, settings, slots, stabilization_timestep(diffusion, settings.stabilization_level), generated_obs)

    def noise_like():
        return df_step.clamp_noise(draw_noise(x0.shape, counts, generators, device), settings.clip_noise)

    x = torch.where(latent_mask.bool(), starting_noise(initial_noise, noise_like, x0, n_obs, n_lat), x0)
    mcmc_options = dict(steps=settings.mcmc_steps, step_size=settings.mcmc_step_size, noise=settings.mcmc_noise,
                        clamp=settings.mcmc_clamp, normal_fn=noise_like,
                        uniform_fn=lambda: draw_uniform(B, K, counts, generators, device), stats=mcmc_stats)
    x = run_rows(model, diffusion, rule, timesteps, x, noise_like, callback, mcmc_options)
    return finish_stage(videos, latent_lists, n_obs, generated, x)


def latent_columns(n_obs, n_lat, K):
    """[B x K]: column j of a stage's noise-level matrix drives the j-th latent frame of every video; -1 elsewhere."""
    column = torch.full((len(n_obs), K), -1, dtype=torch.long)
    for b, (o, l) in enumerate(zip(n_obs, n_lat)):
        column[b, o: o + l] = torch.arange(l)
    return column


def observed_generated(generated, obs_lists, K):
    """bool [B x K]: the observed slots holding frames the model generated (generated: bool [B x T], or None)."""
    flags = torch.zeros(len(obs_lists), K, dtype=torch.bool)
    if generated is not None:
        for b, obs in enumerate(obs_lists):
            flags[b, : len(obs)] = generated[b, torch.tensor(obs, dtype=torch.long)].cpu()
    return flags


def starting_noise(initial_noise, noise_like, x0, n_obs, n_lat):
    """The latent slots' starting noise, like x0: `initial_noise` [B x max latent x C x H x W] placed in
    the slots, or (None) noise_like()."""
    if initial_noise is None:
        return noise_like()
    B = x0.shape[0]
    if tuple(initial_noise.shape) != (B, max(n_lat), *x0.shape[2:]):
        raise ValueError(f"initial_noise must be [B x latent frames x C x H x W] = "
                         f"{[B, max(n_lat), *x0.shape[2:]]}, got {list(initial_noise.shape)}.")
    start = torch.zeros_like(x0)
    for b in range(B):
        start[b, n_obs[b]: n_obs[b] + n_lat[b]] = initial_noise[b, : n_lat[b]].to(x0.device, x0.dtype)
    return start


def run_rows(model, diffusion, rule, timesteps, x, noise_like, callback=None, mcmc_options=None):
    """The rows of one stage (timestep matrix `timesteps`, rows = states) on the slots x; returns the final x.

    rule: the stage's update rule (stage_updates.py), whose slots x holds. Per row transition in which
    some latent frame's timestep changes (rows where none does are skipped: DF calls the network there
    too, but changes no frame): the rule's context noise, model inputs, step noise and update, in that
    order; then, with mcmc_options["steps"] > 0 (mcmc.refine's options), the frames that moved and are
    still noisy are refined at their new level with the context shown as the row showed it; then the
    callback (see `sample_stage`).
    """
    slots = rule.slots
    for m in range(len(timesteps) - 1):
        t_from, t_to = slots.at_row(timesteps[m]), slots.at_row(timesteps[m + 1])
        moving = slots.is_latent & (t_to != t_from)
        if not moving.any():
            continue
        context_noise = rule.context_noise(noise_like)
        shown, t_model, kwargs = rule.model_inputs(x, t_from, moving, context_noise)
        step_noise = rule.step_noise(noise_like)
        new_x, pred_xstart = rule.update(model, x, shown, t_model, torch.where(moving, t_to, t_model), moving,
                                         kwargs, step_noise)
        previous, x = x, new_x
        refined = moving & (t_to >= 0)  # MCMC: frames that moved and are still noisy, at their new level
        if mcmc_options and mcmc_options["steps"] and refined.any():
            shown_now, t_mcmc, mcmc_kwargs = rule.model_inputs(x, torch.where(moving, t_to, t_from), refined,
                                                               context_noise)
            refined_slots = mcmc.refine(model, diffusion, shown_now, t_mcmc, mcmc_kwargs, refined, **mcmc_options)
            x = torch.where(slots.as_mask(refined), refined_slots, x)
        if callback is not None:
            callback({"row": m, "previous": previous, "x": x, "t_from": t_from, "t_to": t_to, "t_model": t_model,
                      "pred_xstart": pred_xstart})
    return x


def finish_stage(videos, latent_lists, n_obs, generated, x):
    """Write the stage's latent slots of x into `videos` and mark them generated; returns videos."""
    for b in range(len(latent_lists)):
        for j, frame in enumerate(latent_lists[b]):  # in order, so a repeated latent frame keeps its last copy
            videos[b, frame] = x[b, n_obs[b] + j]
            if generated is not None:
                generated[b, frame] = True
    return videos


def one_video_at_a_time(model, wrap=None):
    """`model`, called on each video of a batch separately, so a video's result never depends on its batch.

    Batched kernels (MKL, cuBLAS, cuDNN) pick their algorithm by batch size, so the same video
    sampled in batches of 1 and of 8 differs in the last float bits, and sometimes in a saved
    uint8 pixel. Calling the network per video makes samples bit-identical however the videos
    are split into batches or ranks, at the cost of smaller model calls. wrap: a function making
    the callable used for each batch slot (one per slot, so a slot's key/value cache follows its
    own video), default `model` itself.
    """
    per_slot = {}

    def call(x, t, **kwargs):
        outs = []
        for b in range(x.shape[0]):
            if b not in per_slot:
                per_slot[b] = model if wrap is None else wrap(model)
            one = {k: v[b: b + 1] if torch.is_tensor(v) else v for k, v in kwargs.items()}
            out = per_slot[b](x[b: b + 1], t[b: b + 1], **one)
            outs.append(out if kwargs.get("return_energy") else model_output_tensor(out))
        if kwargs.get("return_energy"):  # an energy model's (prediction or None, energies): each joined
            return tuple(None if part[0] is None else torch.cat(part) for part in zip(*outs))
        return torch.cat(outs)

    return call


def sample_video(model, diffusion, videos, n_obs, plan, settings, generators=None, progress=False, callback=None,
                 initial_noise=None, conditions=None, mcmc_stats=None):
    """Fill frames n_obs.. of `videos` [B x T x C x H x W] stage by stage along `plan`; returns a new tensor.

    `plan` is a plan object (plans.py; `Scheme.make_plan()`), asked for each stage with the videos
    so far. settings: StageSettings. generators: one torch.Generator per video (see
    `video_generator`), or None for torch's global one. callback: see `sample_stage`; its dict
    also holds the stage number. initial_noise: None, or a list with one tensor per stage
    [B x new frames x C x H x W], that stage's starting noise (to reproduce another sampler's
    trajectory). conditions: a guidance.Conditions whose actions cover all T frames (None:
    unconditional); settings.guidance_scale != 1 guides every model call with it. mcmc_stats: an
    mcmc.MCMCStats of the batch, for settings.mcmc_steps > 0 (see `sample_stage`).
    """
    check_settings(settings, diffusion)
    videos = videos.clone()
    B, T = videos.shape[:2]
    videos[:, n_obs:] = 0
    generated = torch.zeros(B, T, dtype=torch.bool)
    bar = tqdm(desc="stages", disable=not progress, leave=False)
    stage_number = 0
    while (stage := plan.next_stage(videos)) is not None:
        stage_callback = None if callback is None else (lambda info, s=stage_number: callback({"stage": s, **info}))
        stage_noise = None
        if initial_noise is not None:
            if stage_number >= len(initial_noise):
                raise ValueError(f"initial_noise has {len(initial_noise)} tensors, but the plan has more stages.")
            stage_noise = initial_noise[stage_number]
        sample_stage(model, diffusion, videos, stage.obs, stage.latent, settings, generated, generators,
                     stage_callback, stage_noise, conditions, mcmc_stats)
        stage_number += 1
        bar.update(1)
    bar.close()
    return videos


def sample_with_scheme(model, diffusion, scheme, videos, generators=None, progress=False, conditions=None,
                       mcmc_stats=None):
    """`sample_video` along `scheme` (a Scheme): its plan, from its first n_obs frames, with its stage settings."""
    return sample_video(model, diffusion, videos, scheme.n_obs, scheme.make_plan(), scheme.stage, generators,
                        progress, conditions=conditions, mcmc_stats=mcmc_stats)


def preview_rollout(model, diffusion, given, T, max_frames, seed=0, actions=None, mcmc_steps=0, mcmc_stats=None):
    """A quick look at a model in training: `autoreg` from the frames `given` [n x C x H x W] to T frames.

    Uses DDIM over the diffusion's (respaced) steps and a fixed per-video generator, so previews of
    different steps differ only by the weights. actions: [T x D] per-frame vectors of a model
    conditioned on them (None: unconditional). mcmc_steps: an energy model's MCMC refinement after
    each step (default step size), counted into mcmc_stats (an mcmc.MCMCStats(1)) when given.
    Returns uint8 [T x C x H x W].
    """
    n_obs = len(given)
    scheme = Scheme.from_preset("autoreg", T=T, n_obs=n_obs, max_frames=max_frames,
                                max_latent_frames=max_frames - n_obs, use_ddim=True, mcmc_steps=mcmc_steps)
    videos = torch.zeros(1, T, *given.shape[1:], device=given.device)
    videos[0, :n_obs] = given
    conditions = None if actions is None else Conditions(actions=actions[None].to(given.device))
    out = sample_with_scheme(model, diffusion, scheme, videos, generators=[video_generator(seed, 0, 0)],
                             conditions=conditions, mcmc_stats=mcmc_stats)
    return to_uint8(out[0])
