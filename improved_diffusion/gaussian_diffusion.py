"""FDM's import path for the diffusion core; the code lives in `diffusion/gaussian_diffusion.py`."""

import sys

from .diffusion import gaussian_diffusion as _module

sys.modules[__name__] = _module  # the same module object, so every name (and monkeypatching) is shared
