"""FDM's import path for frame plans (`sampling_schemes[name](video_length=, num_obs=, ...)`).

The code lives in `sampling/plans.py`.
"""

import sys

from .sampling import plans as _module

sys.modules[__name__] = _module  # the same module object, so every name is shared
