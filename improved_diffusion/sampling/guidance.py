"""What a conditional model is conditioned on while sampling, and classifier-free guidance.

`Conditions` holds each video's per-frame vectors over the whole video being sampled (the
actions, [B x T x D], row t = the action taken at frame t) and per-video labels. The sampler
turns them into each model call's keyword arguments with `model_kwargs(frame_indices)`: slot k of
video b gets the vector of the frame it holds, `cond[b, frame_indices[b, k]]`, so a frame keeps its
own action under any plan, consecutive or not. `null=True` shows every video the model's learned
null condition instead (unconditional sampling of a model trained with cond_drop_prob > 0).

Classifier-free guidance (Ho & Salimans 2022) with scale w: `ClassifierFreeGuidance(model, w)`
calls the model ONCE on a doubled batch, the videos with their conditions and the same videos
with the null condition (drop_cond True), and returns

    out = uncond + w * (cond - uncond)

on the network's raw output, i.e. in its own prediction space: eps, v or x0, whichever the
diffusion was trained to predict. Why there: eps, v and x0 are affine functions of one another
at a fixed (x_t, t) that is the same in both halves, and (1 - w) + w = 1, so combining any of them
gives the same result; combining the raw output keeps every sampler unchanged (DDIM, DDPM, DF's
update) and puts guidance before every nonlinear step (x0 clipping, DF's pred-noise clamp), as Ho
& Salimans guide eps before deriving x0. Their eps~ = (1 + s) eps_c - s eps_u is w = 1 + s here:
w = 1 is the conditional model (no extra call: the sampler does not wrap it at all), w = 0 the
unconditional one. Output channels beyond the frames' own (a learned variance) are taken from the
conditional half, as in GLIDE (whose guided sampler guides eps only and keeps the variance).

An energy model (models/energy.py) asked for its energies (`return_energy=True`, as MCMC refinement
asks) returns (prediction, energies); both are combined with the same weights, E_u + w (E_c - E_u),
whose gradient is the guided prediction, so guided sampling refines on the guided energy (the product
of experts p_u^(1-w) p_c^w of Du et al. 2023).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ..diffusion.gaussian_diffusion import model_output_tensor


@dataclass
class Conditions:
    """Per-video conditions of a batch being sampled; see the module docstring."""

    actions: Optional[torch.Tensor] = None  # [B x T x D], one vector per frame of the whole video
    labels: Optional[torch.Tensor] = None  # [B] class labels
    null: bool = False  # every video gets the null condition instead

    def model_kwargs(self, frame_indices):
        """cond / y / drop_cond for a model call whose slots hold frames `frame_indices` [B x K]."""
        B, K = frame_indices.shape
        kwargs = {}
        if self.null:
            return {"drop_cond": torch.ones(B, dtype=torch.bool, device=frame_indices.device)}
        if self.actions is not None:
            actions = self.actions.to(frame_indices.device)
            if actions.shape[0] != B or int(frame_indices.max()) >= actions.shape[1]:
                raise ValueError(f"actions of shape {list(actions.shape)} do not cover frames up to "
                                 f"{int(frame_indices.max())} of {B} videos.")
            kwargs["cond"] = actions.gather(1, frame_indices[..., None].expand(B, K, actions.shape[-1]))
        if self.labels is not None:
            kwargs["y"] = torch.as_tensor(self.labels, device=frame_indices.device).long()
        return kwargs


class ClassifierFreeGuidance:
    """Call it like the model: one call of `model` on [conditional; null] halves, combined with scale w."""

    def __init__(self, model, scale):
        self.model = model
        self.scale = float(scale)

    def __call__(self, x, t, **kwargs):
        B = x.shape[0]

        def twice(value):
            if torch.is_tensor(value) and value.dim() and value.shape[0] == B:
                return torch.cat([value, value])
            return value

        doubled = {k: twice(v) for k, v in kwargs.items() if k != "drop_cond"}
        dropped = kwargs.get("drop_cond")
        dropped = torch.zeros(B, dtype=torch.bool, device=x.device) if dropped is None else dropped.bool()
        doubled["drop_cond"] = torch.cat([dropped.to(x.device), torch.ones(B, dtype=torch.bool, device=x.device)])
        t = torch.as_tensor(t, device=x.device)
        out = self.model(torch.cat([x, x]), twice(t) if t.dim() else t, **doubled)
        if kwargs.get("return_energy"):  # an energy model's (prediction or None, energies [2B x T])
            prediction, energies = out
            guided_energies = energies[B:] + self.scale * (energies[:B] - energies[B:])
            return (None if prediction is None else self.combine(prediction, x.shape[2])), guided_energies
        return self.combine(model_output_tensor(out), x.shape[2])

    def combine(self, out, C):
        """uncond + w (cond - uncond) of a doubled output's first C channels; the rest from the conditional half."""
        B = out.shape[0] // 2
        cond, uncond = out[:B], out[B:]
        guided = uncond[:, :, :C] + self.scale * (cond[:, :, :C] - uncond[:, :, :C])
        return torch.cat([guided, cond[:, :, C:]], dim=2) if out.shape[2] > C else guided


def guided(model, scale):
    """`model` with classifier-free guidance at `scale`; scale 1 is the conditional model itself."""
    return model if float(scale) == 1.0 else ClassifierFreeGuidance(model, scale)
