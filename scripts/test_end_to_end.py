"""A tiny model trained, sampled past its frame window and turned into mp4, through the
real command-line scripts, as a new user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from improved_diffusion.checkpoints import load_checkpoint
from improved_diffusion.data.datasets import get_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--dataset", "bouncing_balls", "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "8",
              "--num_heads", "2", "--max_frames", "4", "--batch_size", "2", "--diffusion_steps", "100"]


def run_script(name, *args, cwd, check=True):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    run_script("video_train.py", *TINY_MODEL, "--max_steps", 4, "--save_interval", 2, "--log_interval", 2,
               "--sample_interval", 4, "--checkpoint_dir", work / "ckpt", "--wandb_id", "tiny", cwd=work)
    return work, work / "ckpt" / "tiny"


def test_training_writes_every_checkpoint_file(trained_run):
    _, run_dir = trained_run
    names = set(os.listdir(run_dir))
    for step in (2, 4):
        assert {f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt"} <= names
    data = torch.load(run_dir / "ema_0.9999_000004.pt", weights_only=True)
    assert data["step"] == 4 and data["config"]["image_size"] == 16 and data["config"]["wandb_id"] == "tiny"
    # --sample_interval 4: a preview rollout of 2 x max_frames frames from the EMA model at step 4 only.
    assert sorted(os.listdir(run_dir / "previews")) == ["step000004.npy"]
    preview = np.load(run_dir / "previews" / "step000004.npy")
    assert preview.shape == (8, 3, 16, 16) and preview.dtype == np.uint8


def test_sample_longer_than_the_window_and_make_mp4(trained_run):
    work, run_dir = trained_run
    eval_dir = work / "eval"
    run_script("video_sample.py", run_dir / "ema_0.9999_000004.pt", "--sampling_scheme", "autoreg", "--n_obs", 2,
               "--T", 16, "--max_latent_frames", 2, "--stop_index", 2, "--timestep_respacing", 5,
               "--eval_dir", eval_dir, cwd=work)
    samples = sorted((eval_dir / "samples").glob("*.npy"))
    assert [p.name for p in samples] == ["sample_0000-0.npy", "sample_0001-0.npy"]
    video = np.load(samples[0])
    assert video.shape == (16, 3, 16, 16) and video.dtype == np.uint8  # 4x the 4-frame window


    given = get_dataset("bouncing_balls", split="test", T=2, image_size=16).video(0)
    expected = ((given + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(video[:2], expected)  # observed frames are the dataset's, unchanged

    run_script("video_make_mp4.py", "--eval_dir", eval_dir, cwd=work)
    mp4 = eval_dir / "videos" / "sample_0000-0.mp4"
    assert mp4.stat().st_size > 1000 and (eval_dir / "videos" / "sample_0000-0.gif").exists()
    frames = iio.imread(mp4)
    assert frames.shape[0] == 16


@pytest.mark.parametrize("args,message", [
    (["--dataset", "no_such_dataset"], "no_such_dataset"),
    (["--noise_mode", "sideways"], "noise_mode"),
])
def test_training_errors_are_one_sentence(tmp_path, args, message):
    proc = run_script("video_train.py", *TINY_MODEL, "--max_steps", 1, "--checkpoint_dir", tmp_path, *args,
                      cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--n_obs", 16, "--T", 16], "n_obs"),
    (["--max_latent_frames", 4, "--max_frames", 4], "max_latent_frames"),
])
def test_sampling_errors_are_one_sentence(trained_run, args, message):
    work, run_dir = trained_run
    proc = run_script("video_sample.py", run_dir / "ema_0.9999_000004.pt", *args, cwd=work, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_sampling_a_missing_or_wrong_checkpoint_is_one_sentence(trained_run):
    work, run_dir = trained_run
    for path, message in ((work / "nope.pt", "does not exist"), (run_dir / "opt000004.pt", "not a model")):
        proc = run_script("video_sample.py", path, cwd=work, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_training_on_a_folder_with_a_corrupt_video_stops_or_skips(tmp_path):
    data = tmp_path / "videos"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for i in range(n):
            np.save(data / split / f"v{i}.npy", rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8))
    (data / "train" / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    args = [*TINY_MODEL, "--dataset", data, "--T", 8, "--max_steps", 1, "--checkpoint_dir", tmp_path / "ck"]
    stop = run_script("video_train.py", *args, cwd=tmp_path, check=False)
    assert stop.returncode == 2 and "broken.npy" in stop.stderr and "Traceback" not in stop.stderr
    skip = run_script("video_train.py", *args, "--on_bad_video", "skip", cwd=tmp_path, check=False)
    assert skip.returncode == 0, skip.stderr[-2000:]
    assert "Skipped 1 of 4 train videos" in skip.stderr  # a counted warning


def test_diffusion_forcing_recipe_trains_a_df_unet3d_that_loads(tmp_path):
    """DF's video recipe (df_video.yaml) at tiny size: per-frame noise levels, fused-SNR v-loss,
    clamped noise, warm-up, AdamW betas, gradient clipping, DF's 3D-UNet."""
    run_script("video_train.py", "--dataset", "bouncing_balls", "--T", 4, "--max_frames", 4, "--batch_size", 2,
               "--noise_mode", "diffusion_forcing", "--architecture", "df_unet3d", "--causal", "True",
               "--image_size", 16, "--network_size", 16, "--dim_mults", "1,2", "--attn_resolutions", "8,16",
               "--attn_heads", 2, "--attn_dim_head", 8, "--noise_schedule", "sigmoid", "--predict_v", "True",
               "--loss_weighting", "fused_snr", "--clip_noise", 6, "--warmup_steps", 100, "--adam_betas", "0.9,0.99",
               "--grad_clip", 1.0, "--weight_decay", 2e-3, "--lr", 8e-5, "--max_steps", 2, "--sample_interval", 0,
               "--num_workers", 0, "--checkpoint_dir", tmp_path / "ckpt", "--wandb_id", "df", cwd=tmp_path)
    model, diffusion, config = load_checkpoint(str(tmp_path / "ckpt" / "df" / "ema_0.9999_000002.pt"))
    assert type(model).__name__ == "DFUNet3D" and config["step"] == 2
    assert (diffusion.loss_weighting, diffusion.clip_noise, config["grad_clip"]) == ("fused_snr", 6.0, 1.0)
    x = torch.zeros(1, 4, 3, 16, 16)
    out = model(x, torch.tensor([[0, 10, 500, 999]]), frame_indices=torch.arange(4)[None])
    assert out.shape == x.shape and torch.isfinite(out).all()
    # ... and samples a video 3x its window with Diffusion Forcing's stabilized pyramid rollout.
    run_script("video_sample.py", tmp_path / "ckpt" / "df" / "ema_0.9999_000002.pt", "--sampling_scheme", "df-pyramid",
               "--T", 12, "--n_obs", 2, "--sampling_steps", 4, "--use_ddim", "True", "--stop_index", 1,
               "--eval_dir", tmp_path / "df-pyramid", cwd=tmp_path)
    config = json.loads((tmp_path / "df-pyramid" / "sampling_config.json").read_text())
    assert (config["plan"], config["scheduling_matrix"], config["stabilization"]) == ("sliding-window", "pyramid", "df")
    assert config["clip_noise"] == 6.0  # the run's clip_noise reaches the sampler
    sample = np.load(tmp_path / "df-pyramid" / "samples" / "sample_0000-0.npy")
    given = get_dataset("bouncing_balls", split="test", T=2, image_size=16).frames(0)
    assert sample.shape == (12, 3, 16, 16) and np.array_equal(sample[:2], given.transpose(0, 3, 1, 2))
