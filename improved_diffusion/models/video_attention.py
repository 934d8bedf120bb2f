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
        """temb [B*T x E] of the frames on distances' first axis, distances [B x T x T2] (that frame's index
        minus the other's) -> [B x T x T2 x heads x C/heads]."""
        B, T, T2 = distances.shape
        d = distances.to(self.embed_distances.weight.dtype)  # float32, or float64 in a float64 model
        features = torch.stack(
            [torch.log1p(d.clamp(min=0)), torch.log1p((-d).clamp(min=0)), (distances == 0).to(d.dtype)],
            dim=-1,
        )
        h = self.embed_diffusion_time(temb).view(B, T, 1, self.channels) + self.embed_distances(features)
        out = self.out(F.silu(h))
        return out.view(B, T, T2, self.num_heads, self.channels // self.num_heads)


class RPE(nn.Module):
    """Holder that keeps FDM's parameter path `rpe_q.rpe_net.*`."""

    def __init__(self, channels, num_heads, time_embed_dim):
        super().__init__()
        self.rpe_net = RPENet(channels, num_heads, time_embed_dim)

    def forward(self, temb, distances):
        return self.rpe_net(temb, distances)


def group_attention_bias(attn_mask, frame_indices, causal, key_mask=None, key_indices=None):
    """Additive logit bias [B x 1 x 1 x Tq x Tk] (0 or -inf), or None.

    FDM's rule: frames in the model (mask 1) attend only to each other, padding frames
    (mask 0) only to each other. In causal mode a frame additionally never attends to a
    frame with a larger index in the video. Keys are the queries themselves unless
    key_mask/key_indices say otherwise (a call that attends to cached earlier frames too).
    """
    key_mask = attn_mask if key_mask is None else key_mask
    key_indices = frame_indices if key_indices is None else key_indices
    allowed = None
    if attn_mask is not None:
        allowed = attn_mask.bool()[:, :, None] == key_mask.bool()[:, None, :]
    if causal:
        later = key_indices[:, None, :] > frame_indices[:, :, None]
        allowed = ~later if allowed is None else allowed & ~later
    if allowed is None:
        return None
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[:, None, None]


class EarlierFrames:
    """Earlier frames that a causal network call attends to without recomputing them.

    In a causal network a frame's activations depend only on frames with smaller (or equal)
    indices, so frames that come before every frame of a call and have not changed since an
    earlier call need not be recomputed: temporal attention only needs their keys and values.
    `layers` holds them per temporal-attention layer in call order, each (k, v) of shape
    [B x D x heads x P x C/heads] for P earlier frames, with their time embeddings `temb`
    [B x P x E] and frame indices [B x P] (all of them frames in the model, not padding).
    Each layer of a call gets the earlier and its own frames' (k, v) from `extend`, which records
    them, so the caller can keep them for later calls (sampling/kv_cache.py); the UNet sets
    `recorded_temb` to this call's time embeddings.
    """

    def __init__(self, layers=(), temb=None, frame_indices=None):
        self.layers = list(layers)
        self.temb = temb
        self.frame_indices = frame_indices
        self.recorded = []
        self.recorded_temb = None

    def extend(self, k, v):
        """This call's (k, v) of the next layer preceded by the earlier frames' (if any), recorded for the caller."""
        if self.layers:
            past_k, past_v = self.layers[len(self.recorded)]
            k, v = torch.cat([past_k, k], dim=3), torch.cat([past_v, v], dim=3)
        self.recorded.append((k, v))
        return k, v


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

    def forward(self, x, temb, frame_indices, attn_mask, earlier=None):
        """x [B x T x C x H x W]; temb [B*T x E]; earlier: an EarlierFrames to attend to as well, or None."""
        B, T, C, H, W = x.shape
        heads = self.num_heads
        h = self.normalize(x)  # [B x D x T x C], D = H*W
        D = h.shape[1]
        qkv = self.qkv(h).view(B, D, T, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # [B x D x heads x T x C/heads]
        key_temb, key_indices, key_mask = temb, frame_indices, attn_mask
        if earlier is not None:
            k, v = earlier.extend(k, v)  # keys: the P earlier frames, then this call's frames
        if earlier is not None and earlier.layers:
            key_temb = torch.cat([earlier.temb, temb.view(B, T, -1)], dim=1).flatten(0, 1)
            key_indices = torch.cat([earlier.frame_indices, frame_indices], dim=1)
            key_mask = torch.cat([torch.ones_like(earlier.frame_indices, dtype=attn_mask.dtype), attn_mask], dim=1)

        distances = frame_indices[:, :, None] - key_indices[:, None, :]  # query - key, [B x T x Tk]
        r_k = self.rpe_k(temb, distances)
        r_v = self.rpe_v(temb, distances)  # [B x T x Tk x heads x C/heads]
        r_q = self.rpe_q(key_temb, -distances.transpose(1, 2))  # [B x Tk x T x heads x C/heads]

        logits = q @ k.transpose(-1, -2)  # [B x D x heads x T x Tk]
        logits = logits + torch.einsum("bdhif,bijhf->bdhij", q, r_k)
        # Query-side encoding: key j's scaled vector against R_q evaluated at (j, i).
        logits = logits + torch.einsum("bdhjf,bjihf->bdhij", k * self.scale, r_q)
        bias = group_attention_bias(attn_mask, frame_indices, self.causal, key_mask, key_indices)
        if bias is not None:
            logits = logits + bias
        weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).type(logits.dtype)
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

    def forward(self, x, temb, frame_indices, attn_mask, earlier=None):
        BT, C, H, W = x.shape
        B = frame_indices.shape[0]
        h = self.temporal_attention(x.view(B, BT // B, C, H, W), temb, frame_indices, attn_mask, earlier)
        return self.spatial_attention(h.reshape(BT, C, H, W))
