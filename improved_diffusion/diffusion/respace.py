"""Sampling with fewer steps than the model was trained with (improved DDPM, section 4).

A SpacedDiffusion keeps a subset of the original timesteps and recomputes betas so that
its abar values equal the original ones at the kept steps. The network is wrapped so that
it still receives timesteps in units of the original chain; neither the network nor the
core diffusion knows that respacing happened.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, model_output_tensor


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    section_counts is a string as improved DDPM accepts it: "250" (evenly spaced), "10,10,10"
    (the chain cut into equal sections, each with its own count) or "ddim25" (DDIM's striding,
    range(0, N, stride) with exactly 25 steps). A list of ints is the same as comma-separated.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"Cannot take exactly {desired} DDIM steps out of {num_timesteps}.")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"Cannot take {count} steps from a section of {size} timesteps.")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.timestep_map = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def call_model(self, model, x, t, model_kwargs):
        """Map respaced indices to original timesteps, then scale to a 1000-step chain."""
        map_tensor = torch.tensor(self.timestep_map, device=t.device, dtype=torch.long)
        original = map_tensor[t.clamp(min=0)]
        if self.rescale_timesteps:
            original = original.float() * (1000.0 / self.original_num_steps)
        return model_output_tensor(model(x, original, **(model_kwargs or {})))
