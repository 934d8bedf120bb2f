"""What the machine offers: which precisions and compilers run here, the device's name and peak FLOP/s.

The variant list is chosen from these probes, so a variant that cannot run here is left out (or
refused in one sentence when named) instead of failing in the middle of a run.
"""

import platform
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError
from ..precision import AUTOCAST_DTYPES, autocast
from .configs import VARIANTS

# Dense peak FLOP/s per dtype ("bf16" also stands for fp16, equal on these GPUs; "fp32" without
# tensor cores), matched against torch.cuda.get_device_name in order; NVL parts differ, so unknown.
PEAK_FLOPS = (
    (("H100", "PCIe"), {"bf16": 756e12, "fp32": 51e12}),
    (("H100",), {"bf16": 989e12, "fp32": 67e12}),  # SXM
    (("H200",), {"bf16": 989e12, "fp32": 67e12}),  # SXM
    (("A100",), {"bf16": 312e12, "fp32": 19.5e12}),
)


def autocast_works(precision, device):
    """Whether autocast runs a convolution in `precision` on `device` (it silently falls back where unsupported)."""
    if precision == "fp32":
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with autocast(precision, device):
                out = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, device=device),
                                                 torch.ones(1, 1, 1, 1, device=device))
    except (RuntimeError, UserWarning):
        return False
    return out.dtype == AUTOCAST_DTYPES[precision]


def compiler_available(device):
    """Whether torch.compile can generate code here: inductor needs a C++ compiler on CPU, triton a C one on CUDA."""
    names = ("cc", "gcc", "clang") if device.type == "cuda" else ("c++", "g++", "clang++")
    return any(shutil.which(n) for n in names)


def variant_problem(name, device):
    """Why variant `name` cannot run on `device` (a sentence), or None."""
    v = VARIANTS[name]
    if not autocast_works(v.precision, device):
        return f"autocast does not run {v.precision} on {device.type} with this torch"
    if v.compile and not compiler_available(device):
        return "torch.compile needs a C/C++ compiler, and none is on PATH"
    return None


def choose_variants(text, device, quick):
    """The variant names to run, fp32 first: the comma list `text`, or every one that applies.

    On CPU the default list leaves out compile-bf16, and with `quick` also compile (inductor takes
    minutes to compile on a small CPU) and fp16 (CPUs without native fp16 kernels run fp16 autocast
    some 20x slower than fp32: minutes for the demo's model). Naming them in `text` runs them anyway.
    """
    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for n in names:
            if n not in VARIANTS:
                raise ConfigError(f"unknown variant {n!r}; valid names are {', '.join(VARIANTS)}.")
            problem = variant_problem(n, device)
            if problem:
                raise ConfigError(f"variant {n} cannot run here: {problem}.")
    else:
        names = []
        for n, v in VARIANTS.items():
            if device.type == "cpu" and ((v.compile and v.precision != "fp32") or
                                         (quick and (v.compile or v.precision == "fp16"))):
                continue
            if variant_problem(n, device) is None:
                names.append(n)
    return ["fp32"] + [n for n in dict.fromkeys(names) if n != "fp32"]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device, precision):
    """The device's dense peak FLOP/s for `precision`, or None when unknown (any CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "NVL" in name:
        return None
    for words, peaks in PEAK_FLOPS:
        if all(w in name for w in words):
            return peaks["fp32" if precision == "fp32" else "bf16"]
    return None
