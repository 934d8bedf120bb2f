"""A scheme shown without a model: its stages and noise-level matrices as JSON, text or FDM's picture.

What scripts/video_schedule.py runs. The JSON is `Scheme.describe()`: the scheme's own fields (as
saved in sampling_config.json) plus one entry per stage with its observed and generated frames and
its noise-level matrix.
"""

import json
from pathlib import Path

from ..errors import ConfigError
from .plan_picture import draw_plan
from .request import DEFAULT
from .scheme import Scheme

FORMATS = ("json", "text", "png")


def as_text(doc):
    """One summary line, then one line per stage."""
    lines = [
        f"{doc['sampling_scheme']} (plan {doc['plan']}): T={doc['T']}, n_obs={doc['n_obs']}, "
        f"max_frames={doc['max_frames']}, max_latent_frames={doc['max_latent_frames']}, "
        f"scheduling matrix {doc['scheduling_matrix']} ({doc['sampling_steps']} steps, "
        f"uncertainty scale {doc['uncertainty_scale']}), stabilization level {doc['stabilization_level']}, "
        f"chunk size {doc['chunk_size']}, {len(doc['stages'])} stages"
    ]
    for i, stage in enumerate(doc["stages"]):
        calls = len(stage["noise_levels"]) - 1
        lines.append(f"stage {i:3d}: observe {stage['obs']} -> generate {stage['latent']} ({calls} model calls)")
    return "\n".join(lines) + "\n"


def show_scheme(request, *, format="text", out=None):
    """Describe the scheme a SchemeRequest asks for in `format`; returns the text, or None once written to `out`.

    Sizes of -1 are refused (there is no checkpoint to take them from), except max_latent_frames
    (max_frames // 2); sampling_steps defaults to 10. png needs `out`. Stabilization is recorded
    only: it changes what the model sees, not the plan.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}.")
    if format == "png" and out is None:
        raise ConfigError("--format png needs --out FILE.")
    scheme = Scheme.from_preset(
        request.sampling_scheme, T=request.T, n_obs=request.n_obs, max_frames=request.max_frames,
        max_latent_frames=None if request.max_latent_frames == DEFAULT else request.max_latent_frames,
        chunk_size=request.chunk_size, optimality=request.optimality, **{"sampling_steps": 10, **request.settings})
    doc = scheme.describe()
    try:
        if format == "png":
            draw_plan([(s["obs"], s["latent"]) for s in doc["stages"]], scheme.T, out)
            return None
        text = json.dumps(doc) + "\n" if format == "json" else as_text(doc)
        if out is None:
            return text
        Path(out).write_text(text)
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be written ({e.strerror or e}).") from None
    return None
