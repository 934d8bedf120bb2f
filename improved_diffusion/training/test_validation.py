"""Measurements during training: the validation loss, evaluation by sampling, their flags, and what
every log line reports. None of them may change what is trained (--keep_best: test_keep_best.py)."""

import csv
import json
import math
import os
import time

import numpy as np
import pytest
import torch

from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.data.pixels import to_uint8
from improved_diffusion.errors import ConfigError
from improved_diffusion.evaluation.metrics import psnr
from improved_diffusion.evaluation.test_evaluate import TinyI3D
from improved_diffusion.data.cue_recall import BACKGROUND, CUE_RETURN, cue_box, cue_recall
from improved_diffusion.script_util import DiffusionConfig, ModelConfig
from improved_diffusion.training.test_train_loop import RUN, flat, straight_and_resumed, tiny_loop
from improved_diffusion.training.batches import training_batch
from improved_diffusion.training.config import TrainConfig
from improved_diffusion.training.keep_best import read_best
from improved_diffusion.training.validation import (SampleEvaluation, ValidationSet, check_measurements,
                                                    make_validation, summarize)

MODEL = ModelConfig(image_size=16)  # what the measurements read of the tiny model: its image size, no conditions
DIFFUSION = DiffusionConfig(diffusion_steps=50)


def rows(run_dir):
    with open(os.path.join(run_dir, "progress.csv")) as f:
        return list(csv.DictReader(f))


def measured_loop(tmp_path, monkeypatch, dataset="bouncing_balls", **overrides):
    """tiny_loop with its validation set and evaluation built as launch.train builds them."""
    loop = tiny_loop(tmp_path, monkeypatch, dataset=dataset, **overrides)
    loop.validation = make_validation(loop.cfg, MODEL, loop.diffusion.num_timesteps)
    loop.evaluation = SampleEvaluation.from_config(loop.cfg, MODEL, DIFFUSION, loop.run_dir)
    return loop


def validation_set(count=5, noise_mode="fdm", rank=0, world_size=1):
    dataset = get_dataset("bouncing_balls", split="test", T=10, image_size=16)
    return ValidationSet.from_dataset(dataset, count, max_frames=4, noise_mode=noise_mode, num_timesteps=50,
                                      rank=rank, world_size=world_size)


# ----------------------------------------------------------------------------- the validation set


@pytest.mark.parametrize("noise_mode", ["fdm", "mixed"])
def test_the_validation_set_is_fixed_test_clips_whatever_the_rank_split(noise_mode):
    whole = validation_set(noise_mode=noise_mode)
    again = validation_set(noise_mode=noise_mode)
    assert all(torch.equal(whole.batch[k], again.batch[k]) for k in whole.batch)
    # Split over 2 ranks (2 + 3 clips), the examples are those of one rank.
    halves = [validation_set(noise_mode=noise_mode, rank=r, world_size=2) for r in range(2)]
    assert [h.indices for h in halves] == [[0, 1], [2, 3, 4]]
    for key, value in whole.batch.items():
        assert torch.equal(value, torch.cat([h.batch[key] for h in halves])), key
    # Each example shows test clip i's own frames (observed and latent) at its frame indices.
    test = get_dataset("bouncing_balls", split="test", T=10, image_size=16)
    in_clip = (whole.batch["obs_mask"] + whole.batch["latent_mask"]).view(5, -1) > 0
    for i in range(5):
        frames = test.video(i)[whole.batch["frame_indices"][i]]
        assert torch.equal(whole.batch["x"][i][in_clip[i]], frames[in_clip[i]])
    # Masks, timesteps and noise are not those any training step draws for the same videos.
    videos = torch.stack([test.video(i) for i in range(5)])
    pads = torch.stack([test.video(i + 5) for i in range(5)])
    trained = training_batch(videos, pads, first_index=0, seed=0, step=0, max_frames=4, noise_mode=noise_mode,
                             num_timesteps=50)
    assert not torch.equal(trained["noise"], whole.batch["noise"])


def test_val_loss_is_the_ema_models_diffusion_loss_on_the_clips(tmp_path, monkeypatch, one_thread):
    loop = measured_loop(tmp_path, monkeypatch, val_interval=1, val_videos=5, max_steps=3, lr=3e-3)
    loop.run()
    figures = loop.validate()
    # By hand: the EMA weights in a fresh model, diffusion.training_losses on the fixed examples, the
    # loss on every frame that is not observed (latent and padding frames), averaged over the clips.
    model = loop.ema_model()
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), loop.ema_params[0]))
    batch = loop.validation.batch

    def losses_of(network):
        with torch.no_grad():
            kwargs = {"x0": batch["x"], "frame_indices": batch["frame_indices"], "obs_mask": batch["obs_mask"],
                      "latent_mask": batch["latent_mask"]}
            return loop.diffusion.training_losses(network, batch["x"], batch["t"], kwargs, noise=batch["noise"],
                                                  latent_mask=1 - batch["obs_mask"])["loss"].double()

    losses = losses_of(model)
    assert figures["val_loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    # ... which is not the loss of the weights being trained: the EMA lags behind them.
    trained = float(losses_of(loop.model.eval()).mean())
    assert abs(trained - figures["val_loss"]) > 1e-3 * figures["val_loss"]
    quarters = (4 * batch["t"] // 50).clamp(max=3)  # fdm: one t per video
    for q in range(4):
        chosen = losses[quarters == q]
        assert (f"val_loss_q{q}" in figures) == bool(len(chosen))
        if len(chosen):
            assert figures[f"val_loss_q{q}"] == pytest.approx(float(chosen.mean()), rel=1e-5)
    # The same numbers when each of 2 ranks computes its share: the per-clip losses are gathered.
    shares = [validation_set(rank=r, world_size=2) for r in range(2)]
    clips = sorted(c for s in shares for c in s.clip_losses(model, loop.diffusion, batch_size=1, device="cpu"))
    alone = loop.validation.clip_losses(model, loop.diffusion, batch_size=1, device="cpu")
    assert clips == alone
    assert summarize(clips) == loop.validation.figures(model, loop.diffusion, batch_size=1)
    # The EMA model learns nothing from validation: a second evaluation gives the same numbers.
    assert loop.validate() == figures


def test_measurements_leave_the_training_run_and_the_global_random_state_unchanged(tmp_path, monkeypatch,
                                                                                    one_thread):
    runs = []
    for on in (False, True):
        measures = dict(val_interval=1, val_videos=3, eval_interval=2, eval_videos=2, eval_T=6,
                        eval_respacing="ddim2", keep_best="val_loss") if on else {}
        loop = measured_loop(tmp_path / str(on), monkeypatch, max_steps=4, dropout=0.1, noise_mode="mixed",
                             **measures)
        loop.run()
        assert (loop.validation is not None) == on and (loop.evaluation is not None) == on
        runs.append(loop)
    off, on = runs
    for name in ("params", "ema_params"):
        assert all(torch.equal(a, b) for a, b in zip(flat(getattr(off, name)).values(),
                                                     flat(getattr(on, name)).values())), name
    assert all(torch.equal(a, b) for a, b in zip(flat(off.opt.state_dict()).values(),
                                                 flat(on.opt.state_dict()).values()))
    assert "val_loss" in rows(on.run_dir)[0] and "val_loss" not in rows(off.run_dir)[0]
    # Measuring draws no number from any global generator (the training run's dropout comes from torch's).
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    on.validate(), on.evaluate()
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])


# ----------------------------------------------------------------------------- evaluation by sampling


def test_evaluations_sample_test_videos_at_their_steps_and_log_their_metrics(tmp_path, monkeypatch, one_thread):
    loop = measured_loop(tmp_path, monkeypatch, eval_interval=2, eval_videos=2, eval_T=6, eval_respacing="ddim2",
                         max_steps=4, log_interval=3)
    loop.run()
    logged = {int(row["step"]): row for row in rows(loop.run_dir)}
    assert [s for s in sorted(logged) if logged[s].get("eval_psnr")] == [2, 4]
    assert not logged[3].get("eval_psnr")  # a log line that is no evaluation step
    assert sorted(os.listdir(os.path.join(loop.run_dir, "evals"))) == ["step000002", "step000004"]
    folder = os.path.join(loop.run_dir, "evals", "step000004")
    samples = np.stack([np.load(os.path.join(folder, f"sample_{i:04d}.npy")) for i in range(2)])
    assert samples.dtype == np.uint8 and samples.shape == (2, 6, 3, 16, 16)
    # Samples continue test videos 0 and 1 from their first n_obs = 2 frames (autoreg, K = 4).
    truth = to_uint8(torch.stack([get_dataset("bouncing_balls", split="test", T=6, image_size=16).video(i)
                                  for i in range(2)])).numpy()
    assert np.array_equal(samples[:, :2], truth[:, :2]) and not np.array_equal(samples, truth)
    # eval_psnr is the PSNR of the generated frames, as evaluation.metrics computes it.
    expected = float(np.mean(psnr(samples[:, 2:], truth[:, 2:])))
    assert float(logged[4]["eval_psnr"]) == pytest.approx(expected, rel=1e-6)
    with open(os.path.join(folder, "metrics.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 4 and summary["figures"]["eval_psnr"] == pytest.approx(expected, rel=1e-6)
    assert {"eval_ssim", "eval_on_manifold_last_quarter", "eval_time_to_drift"} <= set(summary["figures"])
    # Fixed seeds: the same weights sample the same videos.
    again = loop.evaluation.sample(loop.ema_model())
    assert np.array_equal(again, samples)


def test_cue_recall_evaluations_log_shown_and_leave_out_a_recall_when_shown_without_value(tmp_path, monkeypatch,
                                                                                          one_thread):
    """Samples = the test videos with the returning cue erased: recall 0, shown 0, and recall when shown has
    no value (no video shows the cue), so it is left out of the log rather than written as a number."""
    loop = measured_loop(tmp_path, monkeypatch, dataset="cue_recall", eval_interval=2, eval_videos=2,
                         eval_T=CUE_RETURN + 2, eval_respacing="ddim2", max_steps=2, log_interval=2)
    erased = to_uint8(loop.evaluation.truth).numpy()
    top, bottom, left, right = cue_box(MODEL.image_size)
    erased[:, CUE_RETURN:, :, top:bottom, left:right] = BACKGROUND[:, None, None]
    assert cue_recall(erased)["shown"] == 0.0 and cue_recall(to_uint8(loop.evaluation.truth).numpy())["shown"] == 1.0
    monkeypatch.setattr(loop.evaluation, "sample", lambda model: erased)
    loop.run()
    (row,) = [row for row in rows(loop.run_dir) if row.get("eval_cue_recall")]
    assert float(row["eval_cue_recall"]) == 0.0 and float(row["eval_cue_shown"]) == 0.0
    assert not row.get("eval_cue_recall_when_shown")
    with open(os.path.join(loop.run_dir, "evals", "step000002", "metrics.json")) as f:
        figures = json.load(f)["figures"]
    cue_figures = {k: v for k, v in figures.items() if k.startswith("eval_cue")}
    assert cue_figures == dict(eval_cue_recall=0.0, eval_cue_shown=0.0)


def frechet_by_hand(a, b):
    """||mu_a - mu_b||^2 + tr(Ca + Cb - 2 (Ca Cb)^1/2), with scipy's matrix square root."""
    from scipy import linalg

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root))


def test_evaluations_log_fvd_with_an_i3d_file(tmp_path, monkeypatch, one_thread):
    i3d = tmp_path / "i3d.pt"
    torch.jit.script(TinyI3D()).save(str(i3d))  # features: per-channel means and spreads
    loop = measured_loop(tmp_path, monkeypatch, eval_interval=2, eval_videos=4, eval_T=6, eval_respacing="ddim2",
                         max_steps=2, log_interval=2, eval_i3d_path=str(i3d), keep_best="eval_fvd")
    loop.run()
    logged = {int(row["step"]): row for row in rows(loop.run_dir)}
    folder = os.path.join(loop.run_dir, "evals", "step000002")
    samples = np.stack([np.load(os.path.join(folder, f"sample_{i:04d}.npy")) for i in range(4)])
    truth = to_uint8(torch.stack([get_dataset("bouncing_balls", split="test", T=6, image_size=16).video(i)
                                  for i in range(4)])).numpy()

    def features(videos):  # per-channel mean and spread of each whole video in [-1, 1]
        x = videos.astype(np.float64) / 127.5 - 1
        return np.concatenate([x.mean(axis=(1, 3, 4)), x.std(axis=(1, 3, 4), ddof=1)], axis=1)

    expected = frechet_by_hand(features(samples), features(truth))
    assert expected > 0.01  # generated frames differ from the truth, so the distance is not ~0
    assert float(logged[2]["eval_fvd"]) == pytest.approx(expected, rel=1e-3)
    assert os.path.isfile(os.path.join(loop.run_dir, "best_eval_fvd.pt"))


def test_fvd_flags_are_checked_in_one_sentence(tmp_path):
    cfg = TrainConfig(dataset="bouncing_balls", T=10, max_frames=4, eval_interval=1, eval_T=6, eval_respacing="ddim5",
                      eval_i3d_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="^--eval_i3d_path .*missing.pt does not exist or is not a file.$"):
        SampleEvaluation.from_config(cfg, MODEL, DIFFUSION)
    cfg.eval_videos = 1
    with pytest.raises(ConfigError, match="needs --eval_videos 2 or more, got 1"):
        SampleEvaluation.from_config(cfg, MODEL, DIFFUSION)
    cfg.eval_i3d_path, cfg.keep_best = "", "eval_fvd"
    with pytest.raises(ConfigError, match="--keep_best eval_fvd needs the I3D network"):
        check_measurements(cfg)


def test_evaluation_flags_are_checked_before_anything_is_sampled():
    cfg = TrainConfig(dataset="bouncing_balls", T=10, max_frames=4, eval_interval=1, eval_T=2)
    with pytest.raises(ConfigError, match="--eval_T 2"):  # autoreg observes 2 frames: none left to generate
        SampleEvaluation.from_config(cfg, MODEL, DIFFUSION)
    cfg.eval_T, cfg.eval_respacing = 6, "ddim30"  # 30 evenly spaced steps do not fit 50
    with pytest.raises(ConfigError, match="--eval_respacing 'ddim30'"):
        SampleEvaluation.from_config(cfg, MODEL, DIFFUSION)
    cfg.eval_respacing, cfg.eval_videos = "ddim5", 1000
    with pytest.raises(ConfigError, match="--eval_videos 1000"):
        SampleEvaluation.from_config(cfg, MODEL, DIFFUSION)
    cfg.eval_interval = 0
    assert SampleEvaluation.from_config(cfg, MODEL, DIFFUSION) is None


# ----------------------------------------------------------------------------- measurement flags


@pytest.mark.parametrize("flags, message", [
    (dict(keep_best="val_loss"), "--keep_best val_loss needs validation: pass --val_interval"),
    (dict(keep_best="eval_ssim", val_interval=5), "--keep_best eval_ssim needs evaluation: pass --eval_interval"),
    (dict(keep_best="eval_cue_recall", eval_interval=5), "only, not on 'bouncing_balls'"),
    (dict(keep_best="loss", val_interval=5), "--keep_best loss is not a figure"),
    (dict(val_interval=-1), "--val_interval"),
    (dict(eval_interval=-2), "--eval_interval"),
    (dict(val_videos=0), "--val_videos"),
    (dict(eval_videos=0), "--eval_videos"),
    (dict(eval_T=1), "--eval_T"),
    (dict(eval_scheme="zigzag"), "--eval_scheme zigzag"),
])
def test_measurement_flags_that_cannot_work_are_refused_in_one_sentence(flags, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(dataset="bouncing_balls", **flags).validate()
    assert message in str(info.value) and str(info.value).count(". ") == 0


# ----------------------------------------------------------------------------- what every log line reports


def test_every_log_line_reports_data_wait_grad_norm_peak_memory_and_skipped_steps(tmp_path, monkeypatch,
                                                                                  one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, max_steps=2)
    data = loop.data

    def slow_data(step):
        time.sleep(0.05)
        return data(step)

    loop.data = slow_data
    loop.run()
    logged = rows(loop.run_dir)
    assert [int(r["step"]) for r in logged] == [1, 2]
    for row in logged:
        assert 0.05 <= float(row["data_wait"]) < 1.0
        assert float(row["grad_norm"]) > 0 and row["nonfinite_skipped"] == "0"
        assert 10 < float(row["peak_mem_mb"]) < 1e6  # this process's peak resident memory, in MiB
    # The logged norm is the global 2-norm of the step's gradients (still in .grad after the last step).
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in loop.params))
    assert float(logged[-1]["grad_norm"]) == pytest.approx(expected, rel=1e-5)


def test_the_count_of_skipped_steps_survives_a_resume(tmp_path, monkeypatch, one_thread):
    loop = tiny_loop(tmp_path, monkeypatch, save_interval=2, max_steps=2)
    loop.model.register_forward_hook(lambda module, inputs, output: output * float("nan") if loop.step == 1 else None)
    loop.run()
    assert loop.nonfinite_skipped == 1
    resumed = tiny_loop(tmp_path, monkeypatch, max_steps=3)
    resumed.load_newest_readable([2])
    resumed.run()
    assert rows(resumed.run_dir)[-1]["nonfinite_skipped"] == "1"


# ----------------------------------------------------------------------------- the script: resume


def test_val_loss_and_the_best_checkpoint_are_the_same_across_a_resume(tmp_path):
    """4 steps in one go, or 2 then 2 more after a resume: the same val_loss values, and bitwise the same run."""
    measured = RUN + ["--val_interval", "2", "--val_videos", "3", "--keep_best", "val_loss"]
    straight_dir, run_dir = straight_and_resumed(tmp_path, measured)
    figures = [[{k: v for k, v in r.items() if k == "step" or k.startswith("val_loss")} for r in rows(d)
                if r["val_loss"]] for d in (straight_dir, run_dir)]
    assert [r["step"] for r in figures[0]] == ["2", "4"] and figures[0] == figures[1]
    best = [read_best(str(d / "best_val_loss.pt")) for d in (straight_dir, run_dir)]
    assert best[0] == best[1] and best[0][1] in (2, 4)
