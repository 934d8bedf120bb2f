"""Network families behind one call: model(x, timesteps, x0=, frame_indices=, obs_mask=, latent_mask=).

FDM's UNet (unet.py), DF's 3D-UNet (df_unet3d.py), and the energy wrapper around either (energy.py:
the prediction is the gradient of a per-frame scalar energy).
"""

from .build import ARCHITECTURES, ModelConfig, create_model, df_unet3d_config, infer_channel_mult, parse_channel_mult
from .build import unet_config
from .df_unet3d import DFUNet3D, DFUNet3DConfig
from .energy import EnergyModel, is_energy_model
from .unet import UNetConfig, UNetVideoModel

__all__ = ["ARCHITECTURES", "DFUNet3D", "DFUNet3DConfig", "EnergyModel", "ModelConfig", "UNetConfig",
           "UNetVideoModel", "create_model", "df_unet3d_config", "infer_channel_mult", "is_energy_model",
           "parse_channel_mult", "unet_config"]
