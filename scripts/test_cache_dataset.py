"""scripts/cache_dataset.py end to end: a tiny folder cached by the real script, then trained on through get_dataset."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.data.batches import train_batches
from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.data.test_datasets import write_mp4

SCRIPT = Path(__file__).resolve().parent / "cache_dataset.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def tiny_folder(folder):
    """train/ with three 16 x 16 mp4 files of 5..7 frames, test/ with one."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            write_mp4(folder / split / f"{i}.mp4", rng.integers(0, 256, (5 + i, 16, 16, 3), dtype=np.uint8))
    return folder


def test_script_caches_a_folder_and_resumes(tmp_path):
    folder, out = tiny_folder(tmp_path / "videos"), tmp_path / "cache"
    command = [sys.executable, str(SCRIPT), "--dataset", str(folder), "--out", str(out), "--image_size", "16",
               "--T", "4", "--shard_size", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "train: 3 videos, 18 frames" in result.stdout and "shards written 2, kept 0" in result.stdout
    assert "test: 1 videos, 5 frames" in result.stdout
    (out / "train" / "shard_00001.npy").unlink()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "train: 3 videos, 18 frames" in result.stdout and "shards written 1, kept 1" in result.stdout

    source, cache = get_dataset(str(folder), T=4, image_size=16), get_dataset(str(out))
    for a, b, _ in zip(train_batches(source, 2, seed=3), train_batches(cache, 2, seed=3), range(3)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the Python executable")
def test_two_mpi_ranks_write_the_cache_one_process_writes(tmp_path):
    folder = tiny_folder(tmp_path / "videos")
    args = ["--dataset", str(folder), "--image_size", "16", "--T", "4", "--shard_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".npy"]) == 4  # 3 train + 1 test videos, one per shard
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for name in files:  # shards r, r + 2, ... came from rank r; the index from rank 0
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_script_errors_are_one_sentence(tmp_path, run_script):
    code, _, err = run_script("cache_dataset", "--dataset", tmp_path / "missing", "--out", tmp_path / "cache")
    assert code == 2 and "neither a registered name" in err and err.count("\n") == 1
    folder = tiny_folder(tmp_path / "videos")
    code, out, err = run_script("cache_dataset", "--dataset", folder, "--out", tmp_path / "cache", "--split", "test",
                                "--T", "4", "--image_size", "8")
    assert code == 0, err
    assert "test: 1 videos" in out and not (tmp_path / "cache" / "train").exists()
    code, _, err = run_script("cache_dataset", "--dataset", folder, "--out", tmp_path / "cache", "--T", "5",
                              "--image_size", "8")
    assert code == 2 and "other settings: T 4 (now 5)" in err and err.count("\n") == 1
