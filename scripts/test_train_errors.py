"""Every bad video_train.py input ends in one sentence naming the flag or path, and exit code 2.

The table runs in-process through `cli.run` (as the script does), with tiny sizes, under an
alarm so a hang fails instead of blocking the suite. Then: a truncated newest checkpoint
does not block a resume.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.models import ModelConfig, create_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "bouncing_balls", "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
        "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "2", "--T", "10",
        "--max_frames", "4", "--diffusion_steps", "50", "--num_workers", "0", "--sample_interval", "0"]


def files(tmp_path, extra):
    """Paths the table refers to (missing, corrupt, not-a-model and wrong-shape checkpoints, a folder
    of 6-frame videos), each written only when `extra` uses it."""
    paths = {"missing": tmp_path / "missing.pt", "corrupt": tmp_path / "corrupt.pt", "opt": tmp_path / "opt000001.pt",
             "wide": tmp_path / "wide.pt", "a_file": tmp_path / "a_file", "videos": tmp_path / "videos"}
    used = " ".join(extra)
    if "{corrupt}" in used:
        paths["corrupt"].write_bytes(b"not a checkpoint")
    if "{opt}" in used:
        torch.save({"state": {}, "param_groups": []}, paths["opt"])
    if "{wide}" in used:
        wide = create_model(ModelConfig(image_size=16, num_channels=64, num_res_blocks=1, channel_mult="1,2",
                                        attention_resolutions="8", num_heads=2))
        torch.save({"config": {}, "state_dict": wide.state_dict(), "step": 0}, paths["wide"])
    if "{a_file}" in used:
        paths["a_file"].write_text("")
    if "{videos}" in used:
        paths["videos"].mkdir()
        for i in range(2):
            np.save(paths["videos"] / f"v{i}.npy", np.zeros((6, 16, 16, 3), dtype=np.uint8))
    return {k: str(v) for k, v in paths.items()}


# (extra flags, text the one line must contain); {name} refers to files().
BAD = [
    (["--dataset", ""], "--dataset"),
    (["--dataset", "no_such_dataset"], "no_such_dataset"),
    (["--num_channels", "16"], "--num_channels"),
    (["--num_channels", "0"], "--num_channels"),
    (["--num_res_blocks", "0"], "--num_res_blocks"),
    (["--num_heads", "3"], "--num_heads 3"),
    (["--num_heads", "0"], "--num_heads"),
    (["--num_heads_upsample", "0"], "--num_heads_upsample"),
    (["--num_heads_upsample", "5"], "--num_heads_upsample 5"),
    (["--attention_resolutions", "5"], "--attention_resolutions"),
    (["--attention_resolutions", "a"], "--attention_resolutions"),
    (["--image_size", "0"], "--image_size"),
    (["--image_size", "12", "--channel_mult", "1,2,2,2"], "--image_size 12"),
    (["--image_size", "24", "--channel_mult", ""], "--image_size 24"),
    (["--channel_mult", "1,0"], "--channel_mult"),
    (["--channel_mult", "x"], "--channel_mult"),
    (["--dropout", "1.0"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"),
    (["--class_cond", "True"], "--class_cond"),  # the datasets have no class labels
    (["--num_classes", "4"], "--num_classes 4"),
    (["--num_classes", "-1"], "--num_classes"),
    (["--cond_dim", "-2"], "--cond_dim"),
    (["--cond_dim", "-1"], "--cond_dim -1"),  # bouncing_balls has no actions
    (["--cond_dim", "5"], "--cond_dim 5"),
    (["--dataset", "bouncing_balls_actions", "--cond_dim", "3"], "--cond_dim 3"),  # its actions are 5 wide
    (["--dataset", "bouncing_balls_actions", "--cond_dim", "-1", "--cond_drop_prob", "1"], "--cond_drop_prob"),
    (["--cond_drop_prob", "0.1"], "--cond_drop_prob"),  # nothing to drop
    (["--frame_skip", "0"], "--frame_skip"),
    (["--frame_skip", "2"], "frame_skip 2"),  # only dmlab and minecraft are subsampled
    (["--use_rpe_net", "False"], "--use_rpe_net"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-4"], "--lr"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--lr_anneal_steps", "-1"], "--lr_anneal_steps"),
    (["--ema_rate", "1.0"], "--ema_rate"),
    (["--ema_rate", "0.9,0"], "--ema_rate"),
    (["--ema_rate", "abc"], "--ema_rate"),
    (["--batch_size", "0"], "--batch_size"),
    (["--log_interval", "0"], "--log_interval"),
    (["--save_interval", "-1"], "--save_interval"),
    (["--max_frames", "0"], "--max_frames"),
    (["--max_frames", "12"], "--max_frames 12"),
    (["--T", "0"], "--T"),
    (["--dataset", "{videos}", "--T", "8"], "T=8"),
    (["--dataset", "minerl", "--T", "501"], "--T 501"),
    (["--num_workers", "-2"], "--num_workers"),
    (["--max_steps", "-1"], "--max_steps"),
    (["--keep_last", "-1"], "--keep_last"),
    (["--seed", "-1"], "--seed"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps"),
    (["--precision", "fp8"], "--precision"),
    (["--use_fp16", "True", "--precision", "bf16"], "--use_fp16 True means --precision fp16"),
    (["--fp16_scale_growth", "-1"], "--fp16_scale_growth"),
    (["--schedule_sampler", "importance"], "--schedule_sampler"),
    (["--noise_mode", "x"], "--noise_mode"),
    (["--on_bad_video", "x"], "--on_bad_video"),
    (["--noise_schedule", "x"], "--noise_schedule"),
    (["--diffusion_steps", "0"], "--diffusion_steps"),
    (["--predict_xstart", "True", "--predict_v", "True"], "--predict_v"),
    (["--batch_size", "two"], "--batch_size"),
    (["--loss_weighting", "p2"], "--loss_weighting"),
    (["--snr_clip", "0"], "--snr_clip"),
    (["--cum_snr_decay", "1.5"], "--cum_snr_decay"),
    (["--cum_snr_decay", "-0.1"], "--cum_snr_decay"),
    (["--clip_noise", "-1"], "--clip_noise"),
    (["--loss_weighting", "min_snr", "--use_kl", "True"], "--use_kl"),
    (["--warmup_steps", "-1"], "--warmup_steps"),
    (["--adam_betas", "0.9"], "--adam_betas"),
    (["--adam_betas", "0.9,1.0"], "--adam_betas"),
    (["--adam_betas", "a,b"], "--adam_betas"),
    (["--grad_clip", "-1"], "--grad_clip"),
    (["--val_interval", "-1"], "--val_interval"),
    (["--eval_interval", "-1"], "--eval_interval"),
    (["--val_videos", "0"], "--val_videos"),
    (["--eval_videos", "0"], "--eval_videos"),
    (["--val_interval", "2", "--val_videos", "101"], "--val_videos 101"),  # bouncing_balls has 100 test videos
    (["--eval_interval", "2", "--eval_videos", "101"], "--eval_videos 101"),
    (["--eval_scheme", "zigzag"], "--eval_scheme zigzag"),
    (["--eval_T", "0"], "--eval_T"),
    (["--eval_interval", "2", "--eval_T", "2"], "--eval_T 2"),  # autoreg observes 2 of K=4 frames: none to generate
    (["--eval_interval", "2", "--eval_respacing", "ddim30"], "--eval_respacing 'ddim30'"),
    (["--keep_best", "val_loss"], "--keep_best val_loss needs validation"),
    (["--keep_best", "eval_psnr", "--val_interval", "2"], "--keep_best eval_psnr needs evaluation"),
    (["--keep_best", "eval_cue_recall", "--eval_interval", "2"], "--keep_best eval_cue_recall"),
    (["--keep_best", "psnr", "--eval_interval", "2"], "--keep_best psnr is not a figure"),
    (["--eval_interval", "2", "--eval_i3d_path", "{missing}"], "--eval_i3d_path {missing} does not exist"),
    (["--keep_best", "eval_fvd", "--eval_interval", "2"], "--keep_best eval_fvd needs the I3D network"),
    (["--preview_mcmc_steps", "2"], "--preview_mcmc_steps 2 refines previews"),
    (["--preview_mcmc_steps", "-1"], "--preview_mcmc_steps must be 0 (off) or positive, got -1"),
    (["--checkpoint_dir", "{a_file}/ck"], "--checkpoint_dir"),
    (["--resume_checkpoint", "{missing}"], "{missing}"),
    (["--resume_checkpoint", "{corrupt}"], "{corrupt}"),
    (["--resume_checkpoint", "{opt}"], "not a model"),
    (["--resume_checkpoint", "{wide}"], "--resume_checkpoint"),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_bad_input_is_one_sentence_and_exit_2(extra, expected, tmp_path, monkeypatch, run_script):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    paths = files(tmp_path, extra)
    argv = TINY + ["--max_steps", "1"] + [a.format(**paths) for a in extra]
    code, _, err = run_script("video_train", *argv, seconds=30)
    err = err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("video_train.py: error: "), err
    assert expected.format(**paths) in err[0]
    assert not (tmp_path / "checkpoints").exists()  # failed before any run was started


def test_a_truncated_newest_checkpoint_is_skipped_on_resume(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = [sys.executable, str(ROOT / "scripts" / "video_train.py"), *TINY, "--checkpoint_dir", str(tmp_path),
              "--wandb_id", "run", "--save_interval", "1", "--log_interval", "1"]
    first = subprocess.run(script + ["--max_steps", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "run" / "model000002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resumed = subprocess.run(script + ["--max_steps", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [line for line in resumed.stderr.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "step 2" in skipped[0] and str(newest) in skipped[0]
    assert "resuming run run from step 1" in resumed.stderr
    assert (tmp_path / "run" / "model000003.pt").exists()
