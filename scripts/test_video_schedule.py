"""Tests for scripts/video_schedule.py: output formats, presets, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import load_script

from improved_diffusion import cli
from improved_diffusion.sampling.plan_picture import COLOURS, plan_image
from improved_diffusion.sampling.scheme import Scheme

SCRIPT = Path(__file__).resolve().parent / "video_schedule.py"
video_schedule = load_script("video_schedule")


def run(capsys, *argv):
    code = cli.run(video_schedule.main, video_schedule.create_argparser(), list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_hierarchy(capsys):
    code, out, err = run(capsys, "--sampling_scheme", "hierarchy-2", "--T", "10", "--n_obs", "1",
                         "--max_frames", "6", "--max_latent_frames", "3", "--sampling_steps", "4", "--format", "json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert [(s["obs"], s["latent"]) for s in doc["stages"]] == [
        ([0, 0, 0], [1, 5, 9]), ([0, 1, 5], [2, 3, 4]), ([4, 5, 9], [6, 7, 8])]
    assert doc["stages"][0]["noise_levels"] == [[4, 4, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1], [0, 0, 0]]
    assert (doc["stabilization_level"], doc["chunk_size"], doc["scheduling_matrix"]) == (0, 0, "full_sequence")
    # The JSON is the scheme as video_sample.py saves it.
    assert Scheme.from_dict(doc) == Scheme.from_preset("hierarchy-2", T=10, n_obs=1, max_frames=6,
                                                       max_latent_frames=3, sampling_steps=4)


def test_json_df_pyramid_preset_and_overrides(capsys):
    code, out, _ = run(capsys, "--sampling_scheme", "df-pyramid", "--T", "10", "--n_obs", "2",
                       "--max_frames", "6", "--sampling_steps", "2", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["plan"] == "sliding-window" and doc["stabilization_level"] == 15
    assert doc["chunk_size"] == 3
    assert doc["stages"][0] == {"obs": [0, 1], "latent": [2, 3, 4],
                                "noise_levels": [[2, 2, 2], [1, 2, 2], [0, 1, 2], [0, 0, 1], [0, 0, 0]]}
    code, out, _ = run(capsys, "--sampling_scheme", "autoreg", "--T", "6", "--n_obs", "2", "--max_frames", "4",
                       "--chunk_size", "1", "--stabilization_level", "5", "--scheduling_matrix", "trapezoid",
                       "--format", "json")
    doc = json.loads(out)
    assert doc["plan"] == "sliding-window" and doc["stabilization_level"] == 5 and doc["chunk_size"] == 1
    assert [s["latent"] for s in doc["stages"]] == [[2], [3], [4], [5]]


def test_text_and_out_file(capsys, tmp_path):
    out_file = tmp_path / "plan.txt"
    code, out, _ = run(capsys, "--sampling_scheme", "autoreg", "--T", "6", "--n_obs", "2", "--max_frames", "4",
                       "--format", "text", "--out", str(out_file))
    text = out_file.read_text()
    assert code == 0 and out == ""
    assert "stage   0: observe [0, 1] -> generate [2, 3] (10 model calls)" in text


def test_png(capsys, tmp_path):
    path = tmp_path / "plan.png"
    code, _, _ = run(capsys, "--sampling_scheme", "hierarchy-3", "--T", "40", "--n_obs", "5",
                     "--max_frames", "10", "--format", "png", "--out", str(path))
    assert code == 0
    image = Image.open(path)
    assert image.format == "PNG" and image.width >= 40


def test_plan_image_colours():
    stages = [([0], [1, 2]), ([2], [3])]
    image = plan_image(stages, 4)
    expected = [["observed", "generated", "generated", "not yet"], ["done", "done", "observed", "generated"]]
    assert np.array_equal(image, np.array([[COLOURS[k] for k in row] for row in expected], dtype=np.uint8))


def test_bad_input_one_line_exit_2(capsys):
    cases = [
        (["--sampling_scheme", "nope", "--T", "10", "--n_obs", "1", "--max_frames", "4"], "invalid choice"),
        (["--sampling_scheme", "hierarchy-2", "--T", "10", "--n_obs", "1", "--max_frames", "6",
          "--max_latent_frames", "1"], "max_latent_frames >= 2"),
        (["--sampling_scheme", "autoreg", "--T", "10", "--n_obs", "10", "--max_frames", "4"], "n_obs"),
        (["--sampling_scheme", "hierarchy-5", "--T", "37", "--n_obs", "0", "--max_frames", "20",
          "--max_latent_frames", "5"], "no frame to generate"),
        (["--sampling_scheme", "adaptive-hierarchy-2", "--T", "10", "--n_obs", "1", "--max_frames", "6"], "videos"),
        (["--sampling_scheme", "optimal", "--T", "10", "--n_obs", "1", "--max_frames", "6"], "optimal schedule"),
        (["--sampling_scheme", "autoreg", "--T", "10", "--n_obs", "1", "--max_frames", "6", "--format", "png"],
         "needs --out"),
    ]
    for argv, message in cases:
        try:
            code = cli.run(video_schedule.main, video_schedule.create_argparser(), argv)
        except SystemExit as e:  # argparse errors
            code = e.code
        _, err = capsys.readouterr()
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, argv


def test_runs_as_a_script_from_another_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--sampling_scheme", "long-range", "--T", "8", "--n_obs", "2",
         "--max_frames", "4", "--format", "json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stages"][0]["latent"] == [2, 3]
