"""Small building blocks shared by the video UNet.

Numerics follow the FDM / improved-diffusion conventions exactly (float32 group norm,
cos-then-sin timestep embedding) because FDM checkpoints must give the same outputs.
"""

import math

import torch
import torch.nn as nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (float64 in a float64 model) whatever the input dtype, as FDM does."""

    def forward(self, x):
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero a module's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N x dim].

    First half cos, second half sin, frequencies exp(-ln(max_period) * i / half);
    the layout of improved-diffusion, which FDM inherits.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
