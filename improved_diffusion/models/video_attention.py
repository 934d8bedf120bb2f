"""Factorized video attention: temporal attention with relative frame positions, then
spatial attention.

Temporal attention is FDM's: each pixel attends over the frames of its video, and the
logits and values are corrected by relative-position encodings computed by small
networks (RPENet) from the index difference of the two frames and the diffusion time of
the query frame. Because only index differences enter, frames far apart in the long
video can be conditioned on. Parameter names match FDM's so its checkpoints load.

Shapes: [B x T x C x H x W] videos are processed as B*T images inside the UNet.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import normalization, zero_module


class RPENet(nn.Module):
    """Maps (index difference, query-frame time embedding) to a per-head vector."""

    def __init__(self, channels, num_heads, time_embed_dim):
        super().__init__()
        self.embed_distances = nn.Linear(3, channels)
        self.embed_diffusion_time = nn.Linear(time_embed_dim, channels)
        self.out = zero_module(nn.Linear(channels, channels))
        self.channels = channels
        self.num_heads = num_heads

    def forward(self, temb, distances):
        """temb [B*T x E], distances [B x T x T] (query minus key) -> [B x T x T x heads x C/heads]."""
        B, T, _ = distances.shape
        d = distances.float()
        features = torch.stack(
            [torch.log1p(d.clamp(min=0)), torch.log1p((-d).clamp(min=0)), (distances == 0).float()],
            dim=-1,
        )
        h = self.embed_diffusion_time(temb).view(B, T, 1, self.channels) + self.embed_distances(features)
        out = self.out(F.silu(h))
        return out.view(B, T, T, self.num_heads, self.channels // self.num_heads)


class RPE(nn.Module):
    """Holder that keeps FDM's parameter path `rpe_q.rpe_net.*`."""

    def __init__(self, channels, num_heads, time_embed_dim):
        super().__init__()
        self.rpe_net = RPENet(channels, num_heads, time_embed_dim)

    def forward(self, temb, distances):
        return self.rpe_net(temb, distances)


def group_attention_bias(attn_mask, frame_indices, causal):
    """Additive logit bias [B x 1 x 1 x T x T] (0 or -inf), or None.

    FDM's rule: frames in the model (mask 1) attend only to each other, padding frames
    (mask 0) only to each other. In causal mode a frame additionally never attends to a
    frame with a larger index in the video.
    """
    allowed = None
    if attn_mask is not None:
        m = attn_mask.bool()
        allowed = m[:, :, None] == m[:, None, :]
    if causal:
        later = frame_indices[:, None, :] > frame_indices[:, :, None]
        allowed = ~later if allowed is None else allowed & ~later
    if allowed is None:
        return None
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[:, None, None]


class TemporalAttention(nn.Module):
    """Per-pixel self-attention over frames with FDM's relative position encodings."""

    def __init__(self, channels, num_heads, time_embed_dim, causal=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (channels // num_heads) ** -0.5
        self.causal = causal
        self.qkv = nn.Linear(channels, channels * 3)
        self.proj_out = zero_module(nn.Linear(channels, channels))
        self.norm = normalization(channels)
        self.rpe_q = RPE(channels, num_heads, time_embed_dim)
        self.rpe_k = RPE(channels, num_heads, time_embed_dim)
        self.rpe_v = RPE(channels, num_heads, time_embed_dim)

    def normalize(self, x):
        """x [B x T x C x H x W] -> normalized [B x H*W x T x C].

        FDM normalizes over (channel group x all frames) per pixel. That mixes frames, so
        the causal model normalizes each frame over (channel group x pixels) instead.
        """
        B, T, C, H, W = x.shape
        if self.causal:
            h = self.norm(x.reshape(B * T, C, H * W)).view(B, T, C, H * W)
            return h.permute(0, 3, 1, 2)
        h = x.permute(0, 3, 4, 2, 1).reshape(B * H * W, C, T)
        return self.norm(h).view(B, H * W, C, T).transpose(2, 3)

    def forward(self, x, temb, frame_indices, attn_mask):
        B, T, C, H, W = x.shape
        heads = self.num_heads
        h = self.normalize(x)  # [B x D x T x C], D = H*W
        D = h.shape[1]
        qkv = self.qkv(h).view(B, D, T, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # [B x D x heads x T x C/heads]

        distances = frame_indices[:, :, None] - frame_indices[:, None, :]  # query - key
        r_q = self.rpe_q(temb, distances)
        r_k = self.rpe_k(temb, distances)
        r_v = self.rpe_v(temb, distances)  # [B x T x T x heads x C/heads]

        logits = q @ k.transpose(-1, -2)
        logits = logits + torch.einsum("bdhif,bijhf->bdhij", q, r_k)
        # Query-side encoding: key j's scaled vector against R_q evaluated at (j, i).
        logits = logits + torch.einsum("bdhjf,bjihf->bdhij", k * self.scale, r_q)
        bias = group_attention_bias(attn_mask, frame_indices, self.causal)
        if bias is not None:
            logits = logits + bias
        weights = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
        out = weights @ v + torch.einsum("bdhij,bijhf->bdhif", weights, r_v)
        out = self.proj_out(out.permute(0, 1, 3, 2, 4).reshape(B, D, T, C))
        out = h + out  # FDM adds the residual to the normalized input
        return out.permute(0, 2, 3, 1).reshape(B, T, C, H, W)


class SpatialAttention(nn.Module):
    """Per-frame self-attention over pixels, through scaled_dot_product_attention."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, channels * 3)
        self.proj_out = zero_module(nn.Linear(channels, channels))
        self.norm = normalization(channels)

    def forward(self, x):
        N, C, H, W = x.shape
        heads = self.num_heads
        h = self.norm(x.reshape(N, C, H * W)).transpose(1, 2)  # [N x HW x C]
        qkv = self.qkv(h).view(N, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N x heads x HW x C/heads]
        out = self.proj_out(out.transpose(1, 2).reshape(N, H * W, C))
        out = h + out  # residual on the normalized input, as FDM
        return out.transpose(1, 2).reshape(N, C, H, W)


class FactorizedAttentionBlock(nn.Module):
    """Temporal attention then spatial attention (FDM's order)."""

    def __init__(self, channels, num_heads, time_embed_dim, causal=False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} attention heads.")
        self.spatial_attention = SpatialAttention(channels, num_heads)
        self.temporal_attention = TemporalAttention(channels, num_heads, time_embed_dim, causal=causal)

    def forward(self, x, temb, frame_indices, attn_mask):
        BT, C, H, W = x.shape
        B = frame_indices.shape[0]
        h = self.temporal_attention(x.view(B, BT // B, C, H, W), temb, frame_indices, attn_mask)
        return self.spatial_attention(h.reshape(BT, C, H, W))
