"""Numeric precision and compilation of model calls, shared by training, sampling and the benchmark.

Weights, optimizer state, EMAs and checkpoints always stay float32; `--precision bf16|fp16` only
runs the network's matmuls and convolutions in 16 bits through `torch.autocast`, and every
model output is handed back as float32 so the diffusion arithmetic (posterior means, variances,
losses) never sees 16-bit numbers. fp16 has a narrow exponent range, so training in fp16 also
scales the loss (`torch.amp.GradScaler`, see training/gradients.py); bf16 does not need it.
"""

import contextlib

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision):
    """The precision name, or a ConfigError naming the valid ones."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    return precision


def autocast(precision, device):
    """The context in which the network runs at `precision` on `device` (fp32: no autocast)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


class PrecisionModel:
    """Calls `model` under autocast and returns float32, so the sampler's arithmetic stays float32."""

    def __init__(self, model, precision, device):
        self.model = model
        self.precision = check_precision(precision)
        self.device = torch.device(device)

    def __call__(self, *args, **kwargs):
        with autocast(self.precision, self.device):
            out = self.model(*args, **kwargs)
        return out.float() if torch.is_tensor(out) else out


def compile_model(model, dynamic=True):
    """`torch.compile(model)`, by default with the frame axis dynamic.

    Sampling: stages hold different numbers of frames (and the causal cache calls the network on
    the new frames only), so a static compile would recompile for every new frame count;
    `dynamic=True` compiles one graph with symbolic sizes instead, which bounds recompilation.
    Training passes dynamic=False: inductor (torch 2.13) fails on this network's backward graphs
    with symbolic sizes ("cannot determine truth value of Relational"), and a training batch
    always has max_frames frames, so each shape compiles once.
    """
    return torch.compile(model, dynamic=dynamic)
