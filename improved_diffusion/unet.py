"""FDM's import path for the video UNet; the code lives in `models/unet.py`."""

import sys

from .models import unet as _module

sys.modules[__name__] = _module  # the same module object, so every name is shared
