"""Crash-safe checkpoint files in `<checkpoint_dir>/<run id>/`.

Each save writes `ema_<rate>_<step>.pt` for every EMA rate, then `model<step>.pt`, then
`opt<step>.pt`, each atomically (temporary name in the same directory, flush, fsync,
rename; object stores such as gs:// make a blob visible only when its upload completes).
A step is *complete* when all of its files exist, so `kill -9` at any moment leaves the
newest complete step loadable and a half-written file is never picked. `config.json`
holds the run's configuration from its start, so a run can be resumed even before its
first checkpoint. `read_step` reads a complete step back for a resume (our files or FDM's).
Paths may be local or blobfile URLs (gs://, az://).
"""

import io
import json
import os
import re
import tempfile

import blobfile as bf
import torch

from ..checkpoints import read_checkpoint_file, read_model_checkpoint
from ..errors import CheckpointError

MODEL_RE = re.compile(r"^model(\d+)\.pt$")
TMP_PREFIX = ".tmp-"
CONFIG_NAME = "config.json"


def is_local(path):
    return "://" not in str(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(data, path):
    """Write `data` to `path` so that readers see the old file, or the whole new one."""
    if not is_local(path):
        with bf.BlobFile(path, "wb") as f:
            f.write(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; checkpoints are shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself survive a power cut
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    """torch.save to `path` atomically (see atomic_write_bytes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def to_cpu(obj):
    """A copy of a nested dict/list of tensors with every tensor on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def step_files(run_dir, step, ema_rates):
    """Every file of one checkpoint step, in the order they are written."""
    names = [f"ema_{rate}_{step:06d}.pt" for rate in ema_rates] + [f"model{step:06d}.pt", f"opt{step:06d}.pt"]
    return [bf.join(run_dir, n) for n in names]


def complete_steps(run_dir, ema_rates):
    """Steps whose model, EMA and optimizer files all exist, ascending."""
    if not bf.exists(run_dir):
        return []
    names = set(bf.listdir(run_dir))
    steps = sorted(int(m.group(1)) for m in map(MODEL_RE.match, names) if m)
    return [s for s in steps if all(bf.basename(p) in names for p in step_files(run_dir, s, ema_rates))]


def read_step(run_dir, step, ema_rates):
    """(model state, EMA states, optimizer state, schedule sampler state, fp16 loss scaler state or
    None, non-finite steps skipped before it) of a complete step.

    Optimizer files are ours ({"optimizer", "step", ...}) or FDM's (the optimizer's bare
    state_dict, written by FDM's train_util.TrainLoop.save); model and EMA files have the
    same {"config", "state_dict", "step"} layout in both. Raises CheckpointError.
    """
    *ema_files, model_file, opt_file = step_files(run_dir, step, ema_rates)
    states = [read_model_checkpoint(path)["state_dict"] for path in [model_file, *ema_files]]
    opt = read_checkpoint_file(opt_file)
    if isinstance(opt, dict) and "optimizer" in opt:
        return (states[0], states[1:], opt["optimizer"], opt.get("schedule_sampler"), opt.get("grad_scaler"),
                int(opt.get("nonfinite_skipped", 0)))
    if isinstance(opt, dict) and {"state", "param_groups"} <= set(opt):
        return states[0], states[1:], opt, None, None, 0
    raise CheckpointError(f"'{opt_file}' is not an optimizer checkpoint: it has neither 'optimizer' "
                          f"nor 'state' and 'param_groups'.")


def model_files_newest_first(run_dir):
    """Paths of the run's model files, largest step first (FDM's runs keep their config only there)."""
    if not bf.exists(run_dir):
        return []
    steps = sorted((int(m.group(1)) for m in map(MODEL_RE.match, bf.listdir(run_dir)) if m), reverse=True)
    return [bf.join(run_dir, f"model{step:06d}.pt") for step in steps]


def remove_old_steps(run_dir, ema_rates, keep_last):
    """Delete all but the newest `keep_last` complete steps (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return
    for step in complete_steps(run_dir, ema_rates)[:-keep_last]:
        for path in step_files(run_dir, step, ema_rates):
            if bf.exists(path):
                bf.remove(path)


def remove_stale_temporaries(run_dir):
    """Delete temporary files left by a process killed while saving (call when no one is saving)."""
    if not is_local(run_dir) or not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith(TMP_PREFIX):
            os.unlink(os.path.join(run_dir, name))


def write_run_config(run_dir, config):
    atomic_write_bytes(json.dumps(config, indent=2, sort_keys=True).encode(), bf.join(run_dir, CONFIG_NAME))


def read_run_config(run_dir):
    """The run's config.json as a dict, or None when the run has none."""
    path = bf.join(run_dir, CONFIG_NAME)
    if not bf.exists(path):
        return None
    with bf.BlobFile(path, "rb") as f:
        return json.loads(f.read())
