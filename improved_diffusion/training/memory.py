"""The peak memory of this process, which every log line reports (peak_mem_mb)."""

import resource
import sys

import torch


def peak_memory_mb(device):
    """The most memory this process has held so far, in MiB: CUDA memory allocated on a GPU, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
