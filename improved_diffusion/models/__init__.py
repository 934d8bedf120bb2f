"""Network families behind one call: model(x, timesteps, x0=, frame_indices=, obs_mask=, latent_mask=)."""

from .build import ModelConfig, create_model, infer_channel_mult, parse_channel_mult, unet_config
from .unet import UNetConfig, UNetVideoModel

__all__ = ["ModelConfig", "UNetConfig", "UNetVideoModel", "create_model", "infer_channel_mult", "parse_channel_mult",
           "unet_config"]
