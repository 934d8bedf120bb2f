"""Peak memory of one call above what was held before it, and the device synchronization timing needs.

CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated`
before. CPU (Linux): the kernel's high-water mark of the resident set (VmHWM, reset by writing 5
to /proc/self/clear_refs; exact, no sampling) minus the resident set before, after returning
freed heap pages to the system (`malloc_trim`, glibc) so that the call's allocations show up as
growth. Where the mark cannot be reset, a background thread polls the resident set every ~1 ms.
"""

import ctypes
import ctypes.util
import gc
import threading

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_kib(field_name):
    """A `VmRSS:`-style field of /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (VmHWM; Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def return_freed_memory():
    """Hand freed heap pages back to the system (glibc's malloc_trim), so that new allocations grow the RSS."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def peak_memory_growth(fn, device):
    """(bytes, method): the most memory held while fn() runs above what was held before it.

    bytes is None where this machine cannot tell. CPU: the kernel's exact high-water mark of the
    resident set where it can be reset, else the resident set polled every ~1 ms by a thread (which
    can miss a shorter peak, and slows the step; this call is not timed).
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    if device.type != "cpu" or status_kib("VmRSS") is None:
        fn()
        return None, "none available"
    return_freed_memory()
    before = status_kib("VmRSS")
    if reset_peak_rss():
        fn()
        return status_kib("VmHWM") - before, "resident set high-water mark (VmHWM, reset through clear_refs)"
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.wait(0.001):
            peak[0] = max(peak[0], status_kib("VmRSS"))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], status_kib("VmRSS")) - before, "resident set polled every ~1 ms"
