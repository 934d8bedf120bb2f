"""Diffusion Forcing's 3D-UNet (`Unet3D`) behind our model call.

The network of DF's video experiments (buoyancy99/diffusion-forcing,
algorithms/diffusion_forcing/models/unet3d.py with attention.py, resnet.py, embeddings.py):
per-frame 2D convolutions, spatial attention per frame, temporal attention per pixel with
rotary frame positions, and each frame's own noise level as a scale-shift conditioning.
Module and parameter names mirror DF's module tree, so the weights DF stores under
`diffusion_model.model.module.<name>` load with `load_state_dict` once the prefix is dropped.

How our call maps onto DF's network:

- Layout: our frames are B x T x C x H x W; DF's network works on b c f h w (its `Diffusion`
  wraps it for f b c h w callers). The permutation is the only difference.
- Observed frames: DF's network has no "observed" channel; DF conditions on context frames only
  through their noise level. So the input at observed slots is `x0` and at all other slots `x`,
  each frame with its own timestep (the sampler gives observed frames the level it wants them
  seen at, e.g. 0 or DF's stabilization level).
- Frame positions: temporal attention rotates queries and keys by each frame's index in the
  video (`frame_indices`) instead of DF's slot position 0..F-1. Rotary attention only sees
  position differences, so non-consecutive frames are placed correctly; positions are taken
  relative to each video's smallest index (exact for the rotation, and it keeps the angles small
  in long videos). With frame_indices = 0..T-1 the output equals DF's.
- Causal: DF's `is_causal` masks temporal attention by slot order; here a frame never attends to
  a frame with a larger index (the same rule as FDM's causal UNet, identical for 0..T-1). DF's
  ResnetBlock normalizes with GroupNorm over all frames, so its "causal" network still lets later
  frames change earlier outputs (../shared/reference/DF_MODEL.md); that is reproduced by default,
  and `strict_causal` normalizes each frame on its own instead, which makes it truly causal.
- Padding slots (in neither mask) attend only to each other in temporal attention, as in FDM's
  UNet; without strict_causal they still enter the all-frames GroupNorm statistics (DF's design).
- Conditions (cond_dim, num_classes; conditioning.py): DF's Unet3D raises NotImplementedError for
  `external_cond_dim`; here each frame's condition embedding is added to its noise-level embedding
  (what DF's Transformer does in effect, and DiT for labels), the same design as FDM's UNet. With
  neither, no conditioning module exists and the network is DF's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conditioning import ConditionEmbedding
from .video_attention import group_attention_bias


@dataclass
class DFUNet3DConfig:
    """Everything that fixes the network's shape (DF's `Unet3D.__init__` arguments)."""

    image_size: int = 64
    channels: int = 3
    out_channels: int = 3
    network_size: int = 64  # DF's `dim`
    dim_mults: tuple = (1, 2, 4, 8)
    attn_factors: tuple = (4, 2, 1)  # downsample factors with attention (DF: resolution // attn_resolutions)
    attn_heads: int = 4
    attn_dim_head: int = 64
    use_linear_attn: bool = True
    use_init_temporal_attn: bool = True
    time_emb_type: str = "rotary"  # rotary | sinusoidal
    causal: bool = False
    strict_causal: bool = False
    resnet_groups: int = 8  # DF's resnet_block_groups default
    init_kernel_size: int = 7  # DF's init_kernel_size default
    cond_dim: int = 0  # width of each frame's condition vector (0: none)
    num_classes: int = 0  # per-video class labels (0: none)
    null_cond: bool = False  # learned null conditions, for classifier-free guidance


# ----------------------------------------------------------------------------- embeddings

def sinusoidal_embedding(t, dim, max_period=10000):
    """DF's `get_timestep_embedding` with flip_sin_to_cos=True, shift 0 (embeddings.py): [..., dim].

    Frequencies exp(-ln(max_period) * i / (dim // 2)); cosines first, then sines; odd dims padded
    with one zero.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal embedding (DF's `Timesteps(dim, True, 0)`)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return sinusoidal_embedding(t, self.dim)


class TimestepEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding` as DF uses it: linear_1, SiLU, linear_2."""

    def __init__(self, in_channels, time_embed_dim, out_dim=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class RotaryEmbedding(nn.Module):
    """Rotary position angles (rotary-embedding-torch's `RotaryEmbedding(dim)`, freqs_for='lang').

    `freqs` = 1 / 10000^(2i / dim) for i < dim // 2, kept as a buffer so a checkpoint's values are
    the ones used (DF stores it as a frozen parameter). Each angle is repeated for one pair of
    adjacent features, which `rotate` turns as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    """

    def __init__(self, dim, theta=10000):
        super().__init__()
        self.register_buffer("freqs", 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))

    def angles(self, positions):
        """positions [...] -> angles [..., 2 * (dim // 2)], each frequency twice (interleaved)."""
        return (positions[..., None].float() * self.freqs).repeat_interleave(2, dim=-1)

    @staticmethod
    def rotate(t, angles):
        """Rotate the first angles.shape[-1] features of t [..., n, d]; the rest pass unchanged."""
        n = angles.shape[-1]
        head, rest = t[..., :n], t[..., n:]
        pairs = head.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat([head * angles.cos() + turned * angles.sin(), rest], dim=-1)


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """Softmax attention over the token axis (DF's attention.py `Attention`), rotary optional.

    Input [..., n, query_dim]; `angles` (broadcastable to [..., heads, n, d]) rotate queries and
    keys; `mask` (bool or additive, broadcastable to [..., heads, n, n]) restricts the keys.
    """

    def __init__(self, query_dim, heads, dim_head, rotary_emb=None):
        super().__init__()
        self.heads = heads
        self.rotary_emb = rotary_emb
        self.to_qkv = nn.Linear(query_dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Linear(heads * dim_head, query_dim)

    def forward(self, x, angles=None, mask=None):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-2, -3) for t in self.to_qkv(x).chunk(3, dim=-1))
        if angles is not None:
            q, k = RotaryEmbedding.rotate(q, angles), RotaryEmbedding.rotate(k, angles)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(-2, -3).flatten(-2))


class LinearAttention(nn.Module):
    """DF's `LinearAttention`: softmax over features for queries, over tokens for keys."""

    def __init__(self, query_dim, heads, dim_head, rotary_emb=None):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_qkv = nn.Linear(query_dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Linear(heads * dim_head, query_dim)

    def forward(self, x, angles=None, mask=None):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-2, -3) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q.softmax(dim=-1) * self.scale  # [..., h, n, d]: over features
        k = k.softmax(dim=-2)  # over tokens
        context = k.transpose(-1, -2) @ v  # [..., h, d, e]
        out = q @ context  # [..., h, n, e]
        return self.to_out(out.transpose(-2, -3).flatten(-2))


class AttentionBlock(nn.Module):
    """Pre-norm residual attention (DF's `AttentionBlock`): x + attn(LayerNorm(x))."""

    def __init__(self, dim, heads, dim_head, use_linear=False, rotary_emb=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = (LinearAttention if use_linear else Attention)(dim, heads, dim_head, rotary_emb=rotary_emb)

    def forward(self, x, angles=None, mask=None):
        return x + self.attn(self.norm(x), angles=angles, mask=mask)


class _TemporalAttention(nn.Module):
    """DF's `_TemporalAttentionBlock`: frame positions by rotation, or by an added embedding."""

    def __init__(self, dim, heads, dim_head, rotary_emb=None):
        super().__init__()
        self.attn_block = AttentionBlock(dim, heads, dim_head, rotary_emb=rotary_emb)
        self.time_pos_embedding = (nn.Sequential(Timesteps(dim), TimestepEmbedding(dim, dim * 4, out_dim=dim))
                                   if rotary_emb is None else None)

    def forward(self, x, frames):
        """x [B x HW x T x C]; frames: the call's `Frames`."""
        angles = None
        if self.time_pos_embedding is not None:
            x = x + self.time_pos_embedding(frames.positions)[:, None]
        else:
            angles = self.attn_block.attn.rotary_emb.angles(frames.positions)[:, None, None]
        return self.attn_block(x, angles=angles, mask=frames.mask)


class Holder(nn.Module):
    """Keeps DF's parameter path `wrapper.module.*` (DF's EinopsWrapper)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class SpatialAttentionBlock(nn.Module):
    """Attention among the pixels of each frame (DF: b c t h w -> (b t) (h w) c)."""

    def __init__(self, dim, heads, dim_head, use_linear=False):
        super().__init__()
        self.wrapper = Holder(AttentionBlock(dim, heads, dim_head, use_linear=use_linear))

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.wrapper.module(x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c))
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class TemporalAttentionBlock(nn.Module):
    """Attention among the frames at each pixel (DF: b c t h w -> (b h w) t c); B kept apart for positions."""

    def __init__(self, dim, heads, dim_head, rotary_emb=None):
        super().__init__()
        self.wrapper = Holder(_TemporalAttention(dim, heads, dim_head, rotary_emb=rotary_emb))

    def forward(self, x, frames):
        b, c, t, h, w = x.shape
        y = self.wrapper.module(x.permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c), frames)
        return y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)


# ----------------------------------------------------------------------------- convolutions

class ResnetBlock(nn.Module):
    """DF's resnet.py `ResnetBlock`: GroupNorm-SiLU-conv twice, noise-level scale-shift, skip.

    DF's GroupNorm normalizes each group over all frames and pixels; `per_frame` normalizes each
    frame on its own (same parameters), so no statistic mixes frames.
    """

    def __init__(self, dim, dim_out, emb_dim=None, groups=8, per_frame=False, eps=1e-6):
        super().__init__()
        self.per_frame = per_frame
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, dim, eps=eps), nn.SiLU(),
                                       nn.Conv3d(dim, dim_out, kernel_size=(1, 3, 3), padding=(0, 1, 1)))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, dim_out, eps=eps), nn.SiLU(),
                                        nn.Conv3d(dim_out, dim_out, kernel_size=(1, 3, 3), padding=(0, 1, 1)))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2)) if emb_dim else None
        self.skip_conv = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def norm(self, layer, x):
        if not self.per_frame:
            return layer(x)
        b, c, t, h, w = x.shape
        y = layer(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)

    def forward(self, x, emb=None):
        h = self.in_layers[2](self.in_layers[1](self.norm(self.in_layers[0], x)))
        h = self.norm(self.out_layers[0], h)
        if self.emb_layers is not None:
            scale, shift = self.emb_layers(emb).permute(0, 2, 1)[..., None, None].chunk(2, dim=1)  # b c f 1 1
            h = h * (1 + scale) + shift
        h = self.out_layers[2](self.out_layers[1](h))
        return self.skip_conv(x) + h


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=(1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class Stage(nn.Sequential):
    """DF's `NoiseLevelSequential`: each layer gets the arguments it understands."""

    def forward(self, x, emb, frames):
        for layer in self:
            if isinstance(layer, ResnetBlock):
                x = layer(x, emb)
            elif isinstance(layer, TemporalAttentionBlock):
                x = layer(x, frames)
            else:
                x = layer(x)
        return x


class Frames:
    """What temporal attention needs from one call: positions [B x T] and the key mask (or None):
    bool [B x 1 x 1 x T x T], True where a frame may attend to another."""

    def __init__(self, positions, mask):
        self.positions = positions
        self.mask = mask


# ----------------------------------------------------------------------------- network

class DFUNet3D(nn.Module):
    """DF's `Unet3D`, called as model(x, timesteps, x0=, frame_indices=, obs_mask=, latent_mask=)."""

    def __init__(self, config: DFUNet3DConfig):
        super().__init__()
        self.config = c = config
        dim = c.network_size
        dims = [dim] + [dim * m for m in c.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        emb_dim = dim * 4

        def res(d_in, d_out):
            return ResnetBlock(d_in, d_out, emb_dim, c.resnet_groups, per_frame=c.strict_causal)

        def spatial(d, use_linear=False):
            return SpatialAttentionBlock(d, c.attn_heads, c.attn_dim_head, use_linear=use_linear)

        def temporal(d):
            return TemporalAttentionBlock(d, c.attn_heads, c.attn_dim_head, rotary_emb=self.rotary_time_pos_embedding)

        self.noise_level_pos_embedding = nn.Sequential(Timesteps(dim), TimestepEmbedding(dim, emb_dim))
        self.conditioning = (ConditionEmbedding(emb_dim, c.cond_dim, c.num_classes, c.null_cond)
                             if c.cond_dim or c.num_classes else None)
        self.rotary_time_pos_embedding = RotaryEmbedding(c.attn_dim_head) if c.time_emb_type == "rotary" else None
        pad = c.init_kernel_size // 2
        self.init_conv = nn.Conv3d(c.channels, dim, kernel_size=(1, c.init_kernel_size, c.init_kernel_size),
                                   padding=(0, pad, pad))
        self.init_temporal_attn = temporal(dim) if c.use_init_temporal_attn else nn.Identity()

        # Level i works at downsample factor 2**i; DF labels it `curr_resolution`.
        self.down_blocks = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            attn = 2 ** i in c.attn_factors
            self.down_blocks.append(nn.ModuleList([
                Stage(res(d_in, d_out), res(d_out, d_out),
                      spatial(d_out, use_linear=c.use_linear_attn and not last) if attn else nn.Identity(),
                      temporal(d_out) if attn else nn.Identity()),
                Downsample(d_out) if not last else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid_block = Stage(res(mid, mid), spatial(mid), temporal(mid), res(mid, mid))
        self.up_blocks = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            attn = 2 ** (len(in_out) - 1 - i) in c.attn_factors
            self.up_blocks.append(Stage(
                res(d_out * 2, d_in), res(d_in, d_in),
                spatial(d_in, use_linear=c.use_linear_attn and i > 0) if attn else nn.Identity(),
                temporal(d_in) if attn else nn.Identity(),
                Upsample(d_in) if not last else nn.Identity(),
            ))
        self.out = nn.Sequential(ResnetBlock(dim * 2, dim, None, c.resnet_groups, per_frame=c.strict_causal),
                                 nn.Conv3d(dim, c.out_channels, 1))

    def forward(self, x, timesteps, x0=None, frame_indices=None, obs_mask=None, latent_mask=None, cond=None, y=None,
                drop_cond=None, **unused):
        """Denoise the frames of a batch of videos.

        x: [B x T x C x H x W] noisy frames; timesteps: [B] or [B x T], each frame's noise level
        (DF embeds it as given: the chain's step index); x0: clean or stabilized frames shown at
        obs_mask slots instead of x; frame_indices: [B x T] positions in the full video;
        obs_mask, latent_mask: [B x T x 1 x 1 x 1]; cond [B x T x cond_dim], y [B], drop_cond [B]:
        the conditions, as FDM's UNet takes them. Returns [B x T x C_out x H x W].
        """
        B, T = x.shape[:2]
        if obs_mask is not None and x0 is not None:
            x = x * (1 - obs_mask) + x0 * obs_mask
        if frame_indices is None:
            frame_indices = torch.arange(T, device=x.device).expand(B, T)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        timesteps = timesteps.reshape(B, -1).expand(B, T) if timesteps.dim() else timesteps.expand(B, T)

        positions = frame_indices - frame_indices.min(dim=1, keepdim=True).values
        mask = None
        if obs_mask is not None or latent_mask is not None:  # defaults as in FDM's UNet
            obs = torch.zeros(B, T, device=x.device) if obs_mask is None else obs_mask.reshape(B, T)
            latent = 1 - obs if latent_mask is None else latent_mask.reshape(B, T)
            in_model = (obs + latent).clamp(max=1)
            if not in_model.bool().all():
                mask = group_attention_bias(in_model, frame_indices, self.config.causal)
        if mask is None and self.config.causal:
            mask = group_attention_bias(None, frame_indices, True)
        frames = Frames(positions, None if mask is None else mask == 0)  # bool: any precision

        emb = self.noise_level_pos_embedding(timesteps)  # [B x T x 4 dim]
        if self.conditioning is not None:
            emb = emb + self.conditioning(B, T, cond, y, drop_cond)
        elif cond is not None or y is not None or drop_cond is not None:
            raise ValueError("this model is unconditional (cond_dim 0, num_classes 0): it takes no cond, y or "
                             "drop_cond.")
        h = self.init_conv(x.transpose(1, 2))  # b c t h w
        if isinstance(self.init_temporal_attn, TemporalAttentionBlock):
            h = self.init_temporal_attn(h, frames)
        first = h
        skips = []
        for block, downsample in self.down_blocks:
            h = block(h, emb, frames)
            skips.append(h)
            h = downsample(h)
        h = self.mid_block(h, emb, frames)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, frames)
        h = self.out(torch.cat([h, first], dim=1))
        return h.transpose(1, 2)
