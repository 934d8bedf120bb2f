"""Crash-safe checkpoint files in `<checkpoint_dir>/<run id>/`.

Each save writes `ema_<rate>_<step>.pt` for every EMA rate, then `model<step>.pt`, then
`opt<step>.pt`, each atomically (temporary name in the same directory, flush, fsync,
rename; object stores such as gs:// make a blob visible only when its upload completes).
A step is *complete* when all of its files exist, so `kill -9` at any moment leaves the
newest complete step loadable and a half-written file is never picked.
"""

import io
import os
import re
import tempfile

import blobfile as bf
import torch

MODEL_RE = re.compile(r"^model(\d+)\.pt$")


def is_local(path):
    return "://" not in str(path)


def atomic_save(obj, path):
    """torch.save to `path` so that readers see the old file, or the whole new one."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    if not is_local(path):
        with bf.BlobFile(path, "wb") as f:
            f.write(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path):
    with bf.BlobFile(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def step_files(run_dir, step, ema_rates):
    names = [f"ema_{rate}_{step:06d}.pt" for rate in ema_rates] + [f"model{step:06d}.pt", f"opt{step:06d}.pt"]
    return [bf.join(run_dir, n) for n in names]


def complete_steps(run_dir, ema_rates):
    """Steps whose model, EMA and optimizer files all exist, ascending."""
    if not bf.exists(run_dir):
        return []
    names = set(bf.listdir(run_dir))
    steps = sorted(int(m.group(1)) for m in map(MODEL_RE.match, names) if m)
    return [s for s in steps if all(bf.basename(p) in names for p in step_files(run_dir, s, ema_rates))]


def remove_old_steps(run_dir, ema_rates, keep_last):
    """Delete all but the newest `keep_last` complete steps (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return
    for step in complete_steps(run_dir, ema_rates)[:-keep_last]:
        for path in step_files(run_dir, step, ema_rates):
            if bf.exists(path):
                bf.remove(path)
