"""Checkpoint files: atomic writes, complete steps, keep_last, weights-only loading."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from improved_diffusion.checkpoints import read_checkpoint_file
from improved_diffusion.errors import CheckpointError
from improved_diffusion.training import checkpoint_io

REPO = Path(__file__).resolve().parents[2]


def write_step(run_dir, step, rates=(0.9999,), skip=()):
    for path in checkpoint_io.step_files(str(run_dir), step, rates):
        if os.path.basename(path) not in skip:
            checkpoint_io.atomic_save({"step": step, "w": torch.full((3,), float(step))}, path)


def test_atomic_save_round_trip_with_shared_permissions(tmp_path):
    path = tmp_path / "run" / "model000001.pt"  # the directory is created
    checkpoint_io.atomic_save({"state_dict": {"w": torch.arange(4.0)}, "config": {"lr": 1e-4}}, str(path))
    data = read_checkpoint_file(str(path))
    assert torch.equal(data["state_dict"]["w"], torch.arange(4.0)) and data["config"] == {"lr": 1e-4}
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(path.parent) == ["model000001.pt"]  # no temporary left behind


class Payload:
    def __reduce__(self):
        return (print, ("a checkpoint must not run code",))


def test_load_refuses_files_that_would_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="loading would have to run"):
        read_checkpoint_file(str(path))


def test_only_steps_with_every_file_are_complete(tmp_path):
    rates = (0.9, 0.99)
    write_step(tmp_path, 1, rates)
    write_step(tmp_path, 2, rates, skip={"opt000002.pt"})  # killed before the optimizer file
    write_step(tmp_path, 3, rates, skip={"ema_0.99_000003.pt"})
    (tmp_path / (checkpoint_io.TMP_PREFIX + "x")).write_bytes(b"half a file")
    (tmp_path / "progress.csv").write_text("step\n1\n")
    assert checkpoint_io.complete_steps(str(tmp_path), rates) == [1]
    assert checkpoint_io.complete_steps(str(tmp_path), (0.9,)) == [1, 3]  # step 3 has its 0.9 EMA
    assert checkpoint_io.complete_steps(str(tmp_path / "missing"), rates) == []
    assert checkpoint_io.model_files_newest_first(str(tmp_path))[0].endswith("model000003.pt")


def test_keep_last_deletes_only_older_complete_steps(tmp_path):
    for step in (1, 2, 3):
        write_step(tmp_path, step)
    write_step(tmp_path, 4, skip={"opt000004.pt"})
    checkpoint_io.remove_old_steps(str(tmp_path), [0.9999], keep_last=0)
    assert checkpoint_io.complete_steps(str(tmp_path), [0.9999]) == [1, 2, 3]
    checkpoint_io.remove_old_steps(str(tmp_path), [0.9999], keep_last=2)
    assert checkpoint_io.complete_steps(str(tmp_path), [0.9999]) == [2, 3]
    assert (tmp_path / "model000004.pt").exists()  # an incomplete step is not counted, nor deleted
    assert not (tmp_path / "ema_0.9999_000001.pt").exists()


def test_run_config_round_trip(tmp_path):
    assert checkpoint_io.read_run_config(str(tmp_path)) is None
    checkpoint_io.write_run_config(str(tmp_path / "run"), {"lr": 0.001, "ema_rate": "0.9,0.99"})
    assert checkpoint_io.read_run_config(str(tmp_path / "run")) == {"lr": 0.001, "ema_rate": "0.9,0.99"}


def test_kill_9_in_the_middle_of_a_save_leaves_the_old_file(tmp_path):
    """SIGKILL after the new bytes are written but before the rename: readers still see the old file."""
    path = tmp_path / "model000001.pt"
    checkpoint_io.atomic_save({"w": torch.zeros(3)}, str(path))
    script = (
        "import os, signal, torch\n"
        "from improved_diffusion.training import checkpoint_io\n"
        "os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"checkpoint_io.atomic_save({{'w': torch.ones(1000)}}, {str(path)!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.equal(read_checkpoint_file(str(path))["w"], torch.zeros(3))
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(checkpoint_io.TMP_PREFIX)]
    assert len(leftovers) == 1
    checkpoint_io.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["model000001.pt"]


def test_paths_with_a_scheme_are_remote():
    assert checkpoint_io.is_local("checkpoints/abc") and checkpoint_io.is_local("/tmp/x")
    assert not checkpoint_io.is_local("gs://bucket/checkpoints") and not checkpoint_io.is_local("az://a/b/c")
