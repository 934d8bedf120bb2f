"""The flexible video UNet (FDM's architecture).

One network denoises any subset of a video's frames given any other subset: each frame
carries its own noise level (timesteps [B x T]), an "observed" indicator channel, and its
index in the full video, which only enters through relative positions in temporal
attention. Residual blocks and spatial attention act per frame. Module and parameter names
match FDM's UNetVideoModel, so FDM checkpoints load with `load_state_dict` unchanged.

Optional conditions (conditioning.py): per-frame vectors (cond_dim > 0) and per-video labels
(num_classes > 0) are embedded and added to each frame's time embedding. An unconditional
network (both 0) has no conditioning module at all, so its parameters and outputs are FDM's.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .conditioning import ConditionEmbedding
from .nn import normalization, timestep_embedding, zero_module
from .video_attention import FactorizedAttentionBlock

# FDM's channel multipliers per image size (32 and 64 from FDM's script_util; the others
# from improved/guided diffusion). Checkpoints carry their own, so loading never guesses.
DEFAULT_CHANNEL_MULT = {
    16: (1, 2, 2),
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}


@dataclass
class UNetConfig:
    """Everything that fixes the network's shape; saved with every checkpoint."""

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 32
    out_channels: int = 3
    num_res_blocks: int = 1
    attention_resolutions: tuple = (2, 4)  # downsample factors with attention
    channel_mult: tuple = (1, 2, 2, 2)
    num_heads: int = 4
    num_heads_upsample: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    use_checkpoint: bool = False
    causal: bool = False
    cond_dim: int = 0  # width of each frame's condition vector (0: none)
    num_classes: int = 0  # per-video class labels (0: none)
    null_cond: bool = False  # learned null conditions, for classifier-free guidance


class ResBlock(nn.Module):
    """Residual block conditioned on each frame's own noise-level embedding."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=True,
                 use_checkpoint=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and x.requires_grad:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Sequential):
    """A sequence of layers; each gets the arguments it understands."""

    def forward(self, h, emb, frame_indices, attn_mask, earlier=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, FactorizedAttentionBlock):
                h = layer(h, emb, frame_indices, attn_mask, earlier)
            else:
                h = layer(h)
        return h


class UNetVideoModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        mc = c.model_channels
        emb_dim = 4 * mc
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample

        def res(ch_in, ch_out):
            return ResBlock(ch_in, emb_dim, c.dropout, ch_out, c.use_scale_shift_norm, c.use_checkpoint)

        def attn(ch, heads):
            return FactorizedAttentionBlock(ch, heads, emb_dim, causal=c.causal)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conditioning = (ConditionEmbedding(emb_dim, c.cond_dim, c.num_classes, c.null_cond)
                             if c.cond_dim or c.num_classes else None)
        # +1 input channel: the observed-frame indicator.
        self.input_blocks = nn.ModuleList([Stage(nn.Conv2d(c.in_channels + 1, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(attn(ch, c.num_heads))
                self.input_blocks.append(Stage(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(Stage(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = Stage(res(ch, ch), attn(ch, c.num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Stage(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, c.out_channels, 3, padding=1)))

    def forward(self, x, timesteps, x0=None, frame_indices=None, obs_mask=None, latent_mask=None, earlier=None,
                cond=None, y=None, drop_cond=None, **unused):
        """Denoise the frames of a batch of videos.

        x: [B x T x C x H x W] noisy frames; timesteps: [B] or [B x T] (each frame's own
        noise level, in units of the 1000-step chain); x0: clean frames used where
        obs_mask is 1; frame_indices: [B x T] long, positions in the full video;
        obs_mask, latent_mask: [B x T x 1 x 1 x 1]. Frames in neither mask are padding
        and attend only to each other. earlier: for a causal model, an EarlierFrames
        (video_attention.py) holding cached frames that come before every frame of this call.
        cond: [B x T x cond_dim], each slot's condition vector; y: [B] class labels; drop_cond:
        [B] bool, videos shown the null condition instead (conditioning.py). An unconditional
        model refuses conditions. Returns [B x T x C_out x H x W].
        """
        B, T, C, H, W = x.shape
        if obs_mask is None:
            obs_mask = torch.zeros(B, T, 1, 1, 1, dtype=x.dtype, device=x.device)
        if latent_mask is None:
            latent_mask = 1 - obs_mask
        if x0 is None:
            x0 = torch.zeros_like(x)
        if frame_indices is None:
            frame_indices = torch.arange(T, device=x.device).expand(B, T)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(B)
        timesteps = timesteps.reshape(B, -1).expand(B, T).reshape(B * T)
        attn_mask = (obs_mask + latent_mask).clamp(max=1).reshape(B, T)

        indicator = torch.ones_like(x[:, :, :1]) * obs_mask
        h = torch.cat([x * (1 - obs_mask) + x0 * obs_mask, indicator], dim=2).reshape(B * T, C + 1, H, W)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.time_embed[0].weight.dtype))
        if self.conditioning is not None:
            emb = emb + self.conditioning(B, T, cond, y, drop_cond).reshape(B * T, -1)
        elif cond is not None or y is not None or drop_cond is not None:
            raise ValueError("this model is unconditional (cond_dim 0, num_classes 0): it takes no cond, y or "
                             "drop_cond.")
        if earlier is not None:
            if not self.config.causal:
                raise ValueError("only a causal model can attend to cached earlier frames.")
            earlier.recorded_temb = emb.view(B, T, -1)

        skips = []
        for block in self.input_blocks:
            h = block(h, emb, frame_indices, attn_mask, earlier)
            skips.append(h)
        h = self.middle_block(h, emb, frame_indices, attn_mask, earlier)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, frame_indices, attn_mask, earlier)
        return self.out(h).view(B, T, self.config.out_channels, H, W)
