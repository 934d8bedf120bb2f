"""Network families behind one call: model(x, timesteps, x0=, frame_indices=, obs_mask=, latent_mask=)."""

from .build import ARCHITECTURES, ModelConfig, create_model, df_unet3d_config, infer_channel_mult, parse_channel_mult
from .build import unet_config
from .df_unet3d import DFUNet3D, DFUNet3DConfig
from .unet import UNetConfig, UNetVideoModel

__all__ = ["ARCHITECTURES", "DFUNet3D", "DFUNet3DConfig", "ModelConfig", "UNetConfig", "UNetVideoModel",
           "create_model", "df_unet3d_config", "infer_channel_mult", "parse_channel_mult", "unet_config"]
