"""Tests for scripts/compare_schemes.py end to end on a tiny random checkpoint: the report, its
images, the recorded cost, resuming, one-line errors, and sharing the work between MPI ranks."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script

from improved_diffusion import cli
from improved_diffusion.evaluation import compare
from improved_diffusion.sampling.noise_schedules import noise_levels
from improved_diffusion.sampling.scheme import Scheme
from improved_diffusion.script_util import DiffusionConfig, ModelConfig, create_model

SCRIPTS = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
SCHEMES = ["autoreg", "df-pyramid"]
ARGS = ["--schemes", ",".join(SCHEMES), "--n_videos", "2", "--T", "8", "--timestep_respacing", "4"]


compare_schemes = load_script("compare_schemes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny UNet with random weights, saved as script_util.load_checkpoint reads it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_cfg = ModelConfig(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8", num_heads=2)
    model = create_model(model_cfg)
    config = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(DiffusionConfig(diffusion_steps=100)),
              "dataset": "bouncing_balls", "T": 16, "max_frames": 4}
    path = tmp_path_factory.mktemp("run") / "ema_0.9999_000000.pt"
    torch.save({"config": config, "state_dict": model.state_dict(), "step": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def compared(checkpoint, tmp_path_factory):
    """One comparison of two schemes on two videos, shared by the tests that only read it."""
    out_dir = tmp_path_factory.mktemp("compare")
    code = cli.run(compare_schemes.main, compare_schemes.create_argparser(), [checkpoint, *ARGS, "--out_dir", str(out_dir)])
    assert code == 0
    return out_dir


def run(capsys, *argv):
    code = cli.run(compare_schemes.main, compare_schemes.create_argparser(), [str(a) for a in argv])
    return code, *capsys.readouterr()


def plan_nfe(eval_dir):
    """Network evaluations per video from the plan: the sum over stages of noise-level rows - 1."""
    scheme = Scheme.from_json((eval_dir / "sampling_config.json").read_text())
    S = 4  # --timestep_respacing 4, no --sampling_steps
    return sum(len(noise_levels(scheme.stage.scheduling_matrix, len(latent), S, scheme.stage.uncertainty_scale)) - 1
               for _, latent in scheme.stages())


def test_report_has_a_row_and_pictures_per_scheme(compared):
    md = (compared / "report.md").read_text()
    html = (compared / "report.html").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| scheme |"))
    for scheme in SCHEMES:
        row = next(line for line in md.splitlines() if line.startswith(f"| {scheme} |"))
        assert row.count(" | ") == header.count(" | ")
        assert f"<td>{scheme}</td>" in html
        assert f"## Scheme {scheme}" in md and f"<h2>Scheme {scheme}</h2>" in html
    for column in ("psnr", "ssim", "on_manifold_last_quarter", "time_to_drift", "sampling s", "NFE / video"):
        assert f" {column} |" in header
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(images) == sorted(re.findall(r'<img src="([^"]+)"', html))
    expected = {"plots/psnr.png", "plots/ssim.png", "plots/on_manifold.png"} | {
        f"{s}/{f}.png" for s in SCHEMES for f in ("plan", "strip")}
    assert expected <= set(images)
    for image in images:
        with Image.open(compared / image) as png:
            png.verify()
    assert "LPIPS skipped" in md or "lpips |" in header


def test_costs_are_recorded_and_nfe_matches_the_plan(compared):
    runs = json.loads((compared / "runs.json").read_text())
    for scheme in SCHEMES:
        assert runs[scheme]["videos_sampled"] == 2 and runs[scheme]["sampling_seconds"] > 0
        assert runs[scheme]["nfe_per_video"] == plan_nfe(compared / scheme)
        metrics = json.loads((compared / scheme / "metrics.json").read_text())
        assert metrics["n_videos"] == 2 and metrics["frames_compared"] == 8
        assert metrics["per_frame"]["psnr"][:2] == [float("inf")] * 2  # the observed frames are copies
    assert runs["autoreg"]["nfe_per_video"] == 12  # 3 stages x 4 steps
    assert runs["df-pyramid"]["nfe_per_video"] == 15  # 3 stages x (4 steps + 1 lagging frame)


def test_a_rerun_resumes_without_sampling_again(checkpoint, compared, capsys):
    samples = sorted((compared / "autoreg" / "samples").iterdir())
    stamps = [p.stat().st_mtime_ns for p in samples]
    runs = (compared / "runs.json").read_text()
    code, out, err = run(capsys, checkpoint, *ARGS, "--out_dir", compared)
    assert code == 0, err
    assert "0 of 2 videos" in err
    assert [p.stat().st_mtime_ns for p in samples] == stamps
    assert (compared / "runs.json").read_text() == runs
    assert out.splitlines()[-2:] == [str(compared / "report.md"), str(compared / "report.html")]


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "autoreg,nope"], "Unknown sampling scheme 'nope'"),
    (["--schemes", "autoreg,hierarchy-2", "--max_frames", "3", "--max_latent_frames", "2"],
     "Scheme hierarchy-2: hierarchy-2 needs max_frames >= 4"),
    (["--metrics", "psnr,fvd"], "FVD needs the I3D network"),
    (["--metrics", "fvd", "--i3d_path", "i3d.pt", "--n_videos", "1"], "FVD needs at least 2 videos"),
    (["--n_videos", "0"], "n_videos must be at least 1"),
    (["--n_videos", "101"], "--n_videos 101 exceeds the 100 test videos"),
    (["--metrics", "fvd", "--i3d_path", "no/i3d.pt"], "--i3d_path no/i3d.pt is not a file"),
    (["--T", "-3"], "--T must be at least 1"),
    (["--schemes", "autoreg:stabilization_level=x"], "stabilization_level must be int, got 'x'"),
    (["--schemes", "autoreg,stabilized-autoreg:stabilization_level=2000"],
     "Scheme stabilized-autoreg:stabilization_level=2000: "),
    (["--guidance_scale", "3"], "Scheme autoreg: --guidance_scale 3 needs a conditional model"),
    (["--uncond", "True"], "Scheme autoreg: --uncond True"),
])
def test_impossible_settings_fail_before_sampling(checkpoint, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, checkpoint, "--T", "8", *argv, "--out_dir", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_other_settings_in_the_same_out_dir_are_refused(checkpoint, compared, capsys):
    code, _, err = run(capsys, checkpoint, *ARGS, "--T", "10", "--out_dir", compared)
    assert code == 2 and "made with T=8, not 10" in err and err.count("\n") == 1, err
    code, _, err = run(capsys, checkpoint, *ARGS, "--precision", "bf16", "--out_dir", compared)
    assert code == 2 and "made with precision='fp32', not 'bf16'" in err and err.count("\n") == 1, err


def test_one_scheme_at_several_settings(checkpoint, tmp_path, capsys):
    """Each spec samples with its own settings into its own folder, and the report has a row per spec."""
    specs = ["stabilized-autoreg:stabilization_level=3", "stabilized-autoreg:stabilization_level=40"]
    code, out, err = run(capsys, checkpoint, "--schemes", ",".join(specs), "--n_videos", "1", "--T", "8",
                         "--timestep_respacing", "4", "--metrics", "psnr", "--out_dir", tmp_path)
    assert code == 0, err
    levels = [json.loads((tmp_path / f"stabilized-autoreg_stabilization_level={k}" / "sampling_config.json")
                         .read_text())["stabilization_level"] for k in (3, 40)]
    assert levels == [3, 40]
    report_md = (tmp_path / "report.md").read_text()
    assert all(f"| {spec} |" in report_md for spec in specs), report_md


class StopSampling(BaseException):
    """Ends a comparison at its first sample_dataset call (a BaseException: cli.run lets it through)."""


def test_model_call_flags_reach_sample_dataset(checkpoint, tmp_path, capsys, monkeypatch):
    seen = []

    def spy(checkpoint_path, request, options):
        seen.append(vars(options))
        raise StopSampling

    monkeypatch.setattr(compare, "sample_dataset", spy)
    with pytest.raises(StopSampling):
        run(capsys, checkpoint, *ARGS, "--precision", "bf16", "--compile", "True", "--batch_invariant", "True",
            "--kv_cache", "False", "--out_dir", tmp_path)
    assert {k: seen[0][k] for k in ("precision", "compile", "batch_invariant", "kv_cache")} == dict(
        precision="bf16", compile=True, batch_invariant=True, kv_cache=False)
    assert json.loads((tmp_path / "compare_config.json").read_text())["precision"] == "bf16"


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the Python executable")
def test_mpi_ranks_share_the_videos_and_give_the_same_samples(checkpoint, tmp_path, capsys):
    """With --batch_invariant True, two ranks sample two videos (one each) into the single-process files."""
    argv = [*ARGS[:1], "autoreg", *ARGS[2:], "--batch_invariant", "True"]
    code, _, err = run(capsys, checkpoint, *argv, "--out_dir", tmp_path / "one")
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPTS / "compare_schemes.py"), checkpoint,
                             *argv, "--out_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 1: 1 of 1 videos" in result.stderr
    for name in ("sample_0000-0.npy", "sample_0001-0.npy"):
        assert np.array_equal(np.load(tmp_path / "autoreg" / "samples" / name),
                              np.load(tmp_path / "one" / "autoreg" / "samples" / name))
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert runs["autoreg"]["world_size"] == 2 and runs["autoreg"]["nfe_per_video"] == 12
    assert "| autoreg |" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------
# Several runs (training seeds x sampling seeds): mean ± standard error
# ---------------------------------------------------------------------------

SPREAD_ARGS = ["--schemes", "autoreg", "--n_videos", "2", "--T", "8", "--timestep_respacing", "4",
               "--metrics", "psnr,ssim"]


def test_two_sampling_seeds_give_two_runs_and_mean_and_se(checkpoint, tmp_path, capsys):
    code, out, err = run(capsys, checkpoint, *SPREAD_ARGS, "--seeds", "0,1", "--out_dir", tmp_path)
    assert code == 0, err
    assert out.splitlines()[-2:] == [str(tmp_path / "report.md"), str(tmp_path / "report.html")]
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["folder"], r["checkpoint"], r["seed"]) for r in saved["runs"]] == [
        ("run0", checkpoint, 0), ("run1", checkpoint, 1)]
    for r in range(2):
        config = json.loads((tmp_path / f"run{r}" / "compare_config.json").read_text())
        assert config["seed"] == r and (tmp_path / f"run{r}" / "report.md").is_file()
        assert len(list((tmp_path / f"run{r}" / "autoreg" / "samples").iterdir())) == 2
        assert saved["runs"][r]["costs"]["autoreg"]["nfe_per_video"] == 12
    psnr = [r["metrics"]["autoreg"]["psnr"] for r in saved["runs"]]
    assert psnr[0] != psnr[1]  # other sampling seeds, other samples
    md = (tmp_path / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| autoreg |"))
    assert row.count(" ± ") == 4 and row.split(" | ")[3] == "2", row  # psnr, ssim, NFE, s / video; 2 runs
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["n_runs"] == 2 and summary["schemes"]["autoreg"]["psnr"]["values"] == psnr
    # a single-run comparison cannot go into a folder of several runs
    code, _, err = run(capsys, checkpoint, *SPREAD_ARGS, "--out_dir", tmp_path)
    assert code == 2 and "holds a comparison over several runs" in err and err.count("\n") == 1, err


def test_runs_are_every_checkpoint_with_every_seed_and_all_are_checked_first(checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "compare_schemes", lambda path, **kw: calls.append(
        (path, kw["options"].seed, os.path.basename(kw["out_dir"]), kw.get("check_only", False))))
    monkeypatch.setattr(compare, "write_aggregate_report", lambda out_dir, runs, schemes, n: ("md", "html"))
    other = str(tmp_path / "other.pt")
    code, _, err = run(capsys, checkpoint, other, *SPREAD_ARGS, "--seeds", "3,5", "--out_dir", tmp_path / "out")
    assert code == 0, err
    runs = [(checkpoint, 3, "run0"), (checkpoint, 5, "run1"), (other, 3, "run2"), (other, 5, "run3")]
    assert calls == [(*r, True) for r in runs] + [(*r, False) for r in runs]


@pytest.mark.parametrize("argv, message", [
    (["--seed", "1", "--seeds", "0,1"], "Give --seed or --seeds, not both."),
    (["--seeds", "0,x"], "--seeds must be comma-separated integers, got '0,x'"),
    (["--seeds", "1,1"], "--seeds names a seed twice"),
    (["--seeds", "0,-1"], "--seeds must be at least 0"),
    (["--seeds", "0,1", "--T", "-3"], "--T must be at least 1"),
])
def test_impossible_run_settings_fail_before_sampling(checkpoint, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, checkpoint, *SPREAD_ARGS, *argv, "--out_dir", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_several_runs_need_an_out_dir(checkpoint, capsys):
    code, _, err = run(capsys, checkpoint, *SPREAD_ARGS, "--seeds", "0,1")
    assert code == 2 and "Comparing several runs needs --out_dir" in err and err.count("\n") == 1, err


def test_several_runs_cannot_go_into_a_single_run_folder(checkpoint, compared, capsys):
    code, _, err = run(capsys, checkpoint, *ARGS, "--seeds", "0,1", "--out_dir", compared)
    assert code == 2 and "holds a single-run comparison" in err and err.count("\n") == 1, err
