"""How one row of a stage moves its frames: the two update rules behind the stage loop (sampler.py).

The stage loop (`sampler.run_rows`) walks the rows of a stage's noise-level matrix; in every row in
which some latent frame's timestep changes it asks the stage's rule, in this order:

1. `context_noise(noise_like)`: the row's noise for the frames shown as (noisy) context, or None;
2. `model_inputs(x, t_state, active, context_noise)` -> (shown x, t_model, model kwargs): what the
   network is shown when the slots x stand at timesteps t_state [B x K] (-1: clean, or not latent)
   and the latent frames `active` are denoised (or refined);
3. `step_noise(noise_like)`: the update's noise (DDPM always, DDIM with eta > 0; otherwise None);
4. `update(model, x, shown, t_model, t_next, moving, kwargs, noise)` -> (new x, pred_xstart): the
   frames `moving` go from t_model to t_next, every other slot keeps its value bit for bit.

MCMC refinement of the row (mcmc.py) then calls `model_inputs` again with the same context noise
before drawing its own noise. Each draw takes one standard normal per slot of each video from that
video's generator (sampler.draw_noise), so this order of draws is part of every sample.

The two rules (`StageSettings.stabilization`); with `stabilization_level` k > 0 context frames are
shown at timestep stab_t, the last kept timestep at or below k - 1 of the training chain, and told
that timestep (Diffusion Forcing's stabilization, in its units). Their stored pixels never change.

- `OwnUpdate`, "generated" (ours, the default): latent frames already at level 0 are shown to the
  model as observed frames; observed frames are told the largest timestep being denoised, so
  `full_sequence` with S = the diffusion's step count is exactly FDM's sampler (`p_sample_loop` /
  `ddim_sample_loop` on the stage). With k > 0 only observed frames that the model generated earlier,
  and latent frames finished earlier in the stage, are stabilized, each noised with fresh noise by
  q_sample; given frames stay clean. The update is the diffusion's own (`ddim_step` / `p_sample`).
- `DiffusionForcingUpdate`, "df" (Diffusion Forcing's `Diffusion.sample_step`, the df-* presets):
  as DF's `ddim_sample_step` / `ddpm_sample_step`, every frame at level -1 (observed slots, given ones
  included, padding, latent frames finished earlier in the stage) is context, shown at stab_t as
  sqrt(alpha_bar) * x with ZERO noise (DDIM) or plus fresh noise (DDPM) (df_step.show_context); every
  other frame is shown as it is at its own timestep. The shown values go to the network both as x and
  as x0 (with obs_mask marking the context), so a network reading either sees DF's input. The update
  is DF's (df_step.py): a pred_noise output and every noise draw are clamped to +-clip_noise, x0_hat is
  clipped only with clip_denoised. Needs k >= 1.
"""

import torch

from . import df_step


class StageSlots:
    """One stage's K slots per video (observed frames first, then latent, then padding), as the rules see them.

    x0 [B x K x C x H x W]: the slots' frames (latent slots: unused); frame_indices [B x K]; is_obs: bool
    [B x K] (cpu); column [B x K]: the noise-level matrix column driving each latent slot, -1 elsewhere;
    condition_kwargs: the stage's cond / y / drop_cond model arguments (guidance.Conditions.model_kwargs).
    """

    def __init__(self, x0, frame_indices, is_obs, column, condition_kwargs):
        self.x0, self.frame_indices, self.is_obs, self.column = x0, frame_indices, is_obs, column
        self.is_latent = column >= 0
        self.condition_kwargs = condition_kwargs
        self.device = x0.device

    def as_mask(self, flags):
        """Bool flags [B x K] as a [B x K x 1 x 1 x 1] mask on the slots' device."""
        return flags.view(*flags.shape, 1, 1, 1).to(self.device)

    def at_row(self, row_timesteps):
        """Per-slot timesteps [B x K] of one row of the stage's timestep matrix (-1: clean or not latent)."""
        return torch.where(self.is_latent, row_timesteps[self.column.clamp(min=0)], torch.full_like(self.column, -1))

    def model_kwargs(self, shown, observed, latent):
        """The model call's keyword arguments: shown slots as x0, the observed / latent flags as masks."""
        return {
            "x0": shown,
            "frame_indices": self.frame_indices,
            "obs_mask": self.as_mask(observed).float(),
            "latent_mask": self.as_mask(latent).float(),
            **self.condition_kwargs,
        }


class UpdateRule:
    """What the rules share: the settings, the slots, the stabilization timestep and the step noise.

    generated_obs: bool [B x K], observed slots holding frames the model generated (read by OwnUpdate).
    """

    def __init__(self, diffusion, settings, slots, stab_t, generated_obs):
        self.diffusion, self.settings, self.slots = diffusion, settings, slots
        self.stab_t, self.generated_obs = stab_t, generated_obs

    def step_noise(self, noise_like):
        """The update's noise, drawn after the context noise: DDPM always, DDIM only with eta > 0."""
        return noise_like() if not self.settings.use_ddim or self.settings.eta > 0 else None


class OwnUpdate(UpdateRule):
    """Stabilization "generated": the diffusion's own update; see the module docstring."""

    def context_noise(self, noise_like):
        return noise_like() if self.settings.stabilization_level else None

    def model_inputs(self, x, t_state, active, noise):
        slots = self.slots
        done = slots.is_latent & (t_state < 0)  # finished earlier in this stage: condition on it
        current = int(t_state[active].max())
        t_model = torch.where(slots.is_latent & ~done, t_state, torch.full_like(t_state, current))
        shown = torch.where(slots.as_mask(done), x, slots.x0)
        if self.settings.stabilization_level:
            noisy = self.generated_obs | done
            t_model = torch.where(noisy, torch.full_like(t_model, self.stab_t), t_model)
            t_noisy = torch.full(t_state.shape, self.stab_t, dtype=torch.long, device=slots.device)
            shown = self.diffusion.q_sample(shown, t_noisy, noise, latent_mask=slots.as_mask(noisy))
        return x, t_model, slots.model_kwargs(shown, slots.is_obs | done, slots.is_latent & ~done)

    def update(self, model, x, shown, t_model, t_next, moving, kwargs, noise):
        s, device = self.settings, self.slots.device
        move_mask = self.slots.as_mask(moving).float()
        if s.use_ddim:
            out = self.diffusion.ddim_step(model, x, t_model.to(device), t_next.to(device), s.clip_denoised,
                                           model_kwargs=kwargs, latent_mask=move_mask, eta=s.eta, noise=noise)
        else:  # check_settings guarantees that every moving frame drops exactly one step
            out = self.diffusion.p_sample(model, x, t_model.to(device), s.clip_denoised, model_kwargs=kwargs,
                                          latent_mask=move_mask, noise=noise)
        return out["sample"], out["pred_xstart"]


class DiffusionForcingUpdate(UpdateRule):
    """Stabilization "df": Diffusion Forcing's `sample_step`; see the module docstring."""

    def __init__(self, *args):
        super().__init__(*args)
        shape = self.slots.column.shape
        self.t_stab = torch.full(shape, self.stab_t, dtype=torch.long, device=self.slots.device)

    def context_noise(self, noise_like):
        return None if self.settings.use_ddim else noise_like()

    def model_inputs(self, x, t_state, active, noise):
        slots = self.slots
        context = t_state < 0  # observed slots, padding and frames finished in this stage
        t_model = torch.where(context, torch.full_like(t_state, self.stab_t), t_state)
        shown = torch.where(slots.as_mask(context), df_step.show_context(self.diffusion, x, self.t_stab, noise), x)
        return shown, t_model, slots.model_kwargs(shown, context & (slots.is_obs | slots.is_latent), ~context)

    def update(self, model, x, shown, t_model, t_next, moving, kwargs, noise):
        s, device = self.settings, self.slots.device
        if s.use_ddim:
            new, pred_xstart = df_step.ddim_step(
                self.diffusion, model, shown, t_model.to(device), t_next.to(device), kwargs, eta=s.eta,
                clip_noise=s.clip_noise, clip_denoised=s.clip_denoised, noise=noise)
        else:  # check_settings guarantees that every moving frame drops exactly one step
            new, pred_xstart = df_step.ddpm_step(self.diffusion, model, shown, t_model.to(device), kwargs, noise,
                                                 clip_noise=s.clip_noise, clip_denoised=s.clip_denoised)
        return torch.where(self.slots.as_mask(moving), new, x), pred_xstart


UPDATE_RULES = {"generated": OwnUpdate, "df": DiffusionForcingUpdate}  # by StageSettings.stabilization
