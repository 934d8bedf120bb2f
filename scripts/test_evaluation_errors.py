"""Bad inputs to the evaluation scripts, each run as a user would run the script (in a subprocess
with a timeout, so a hang fails): every one must end with exit code 2 and one line on stderr,
`<script>.py: error: ...`, that names the flag or path at fault."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent
TIMEOUT_S = 60
SIZE, T = 16, 6


class TinyI3D(torch.nn.Module):
    """The call signature of StyleGAN-V's i3d_torchscript.pt, with trivial features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return x.float().mean(dim=(2, 3, 4))


def make_eval_dir(path, n_videos=2, dataset="bouncing_balls"):
    (path / "samples").mkdir(parents=True)
    config = dict(dataset=dataset, n_obs=2, T=T, image_size=SIZE, data_seed=0)
    (path / "sampling_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    for i in range(n_videos):
        np.save(path / "samples" / f"sample_{i:04d}-0.npy", rng.integers(0, 256, (T, 3, SIZE, SIZE), dtype=np.uint8))
    return path


def build_files(root):
    """Every path a case below refers to, by name."""
    f = {"missing": root / "missing", "text": root / "notes.txt", "corrupt": root / "corrupt.pt",
         "i3d": root / "i3d.pt", "list_pt": root / "list.pt"}
    f["text"].write_text("not a folder, not weights")
    f["corrupt"].write_bytes(b"\x00garbage")
    torch.jit.script(TinyI3D()).save(str(f["i3d"]))
    torch.save([1, 2, 3], f["list_pt"])
    f["ok"] = make_eval_dir(root / "ok")
    f["one"] = make_eval_dir(root / "one", n_videos=1)
    f["no_data"] = make_eval_dir(root / "no_data", dataset=str(root / "no-such-dataset"))
    f["no_samples"] = root / "no_samples"
    f["no_samples"].mkdir()
    (f["no_samples"] / "sampling_config.json").write_text("{}")
    f["empty"] = make_eval_dir(root / "empty", n_videos=0)
    f["bad_sample"] = make_eval_dir(root / "bad_sample", n_videos=0)
    (f["bad_sample"] / "samples" / "sample_0000-0.npy").write_bytes(b"not an array")
    f["float_sample"] = make_eval_dir(root / "float_sample", n_videos=0)
    np.save(f["float_sample"] / "samples" / "sample_0000-0.npy", np.zeros((T, 3, SIZE, SIZE), np.float32))
    f["bad_config"] = make_eval_dir(root / "bad_config")
    (f["bad_config"] / "sampling_config.json").write_text("{not json")
    f["carla_empty"] = root / "carla_empty"
    f["carla_empty"].mkdir()
    return f


# (script, arguments with {name} for a path above, text stderr must contain)
CASES = [
    ("video_eval", "--eval_dir {missing}", "{missing} does not exist"),
    ("video_eval", "--eval_dir {text}", "{text} is not a folder"),
    ("video_eval", "--eval_dir {no_samples}", "{no_samples} has no samples/ folder"),
    ("video_eval", "--eval_dir {empty}", "holds no sample_"),
    ("video_eval", "--eval_dir {bad_config}", "sampling_config.json is not readable JSON"),
    ("video_eval", "--eval_dir {bad_sample}", "sample_0000-0.npy could not be read"),
    ("video_eval", "--eval_dir {float_sample}", "sample_0000-0.npy is float32"),
    ("video_eval", "--eval_dir {no_data}", "no-such-dataset"),
    ("video_eval", "--eval_dir {ok} --metrics psnr,fid", "--metrics"),
    ("video_eval", "--eval_dir {ok} --metrics fvd", "--i3d_path"),
    ("video_eval", "--eval_dir {ok} --metrics fvd --i3d_path {corrupt}", "--i3d_path: Could not load"),
    ("video_eval", "--eval_dir {ok} --metrics fvd --i3d_path {missing}", "{missing}"),
    ("video_eval", "--eval_dir {one} --metrics fvd --i3d_path {i3d}", "FVD needs at least 2 videos"),
    ("video_eval", "--eval_dir {ok} --metrics wd", "--carla_classifier"),
    ("video_eval", "--eval_dir {ok} --carla_classifier {corrupt}", "--carla_regressor"),
    ("video_eval", "--eval_dir {ok} --carla_classifier {corrupt} --carla_regressor {i3d}", "{corrupt}"),
    ("video_eval", "--eval_dir {ok} --carla_classifier {missing} --carla_regressor {i3d}", "{missing}' does not exist"),
    ("video_eval", "--eval_dir {ok} --carla_classifier {list_pt} --carla_regressor {i3d}", "{list_pt}' holds a list"),
    ("video_eval", "--eval_dir {ok} --max_videos 0", "--max_videos"),
    ("video_eval", "--eval_dir {ok} --max_videos two", "--max_videos"),
    ("video_eval", "--metrics psnr", "--eval_dir"),
    ("video_make_mp4", "--eval_dir {missing}", "{missing} does not exist"),
    ("video_make_mp4", "--eval_dir {empty}", "holds no sample_"),
    ("video_make_mp4", "--eval_dir {bad_sample} --no_ground_truth", "sample_0000-0.npy could not be read"),
    ("video_make_mp4", "--eval_dir {no_data}", "no-such-dataset"),
    ("video_make_mp4", "--eval_dir {ok} --fps 0", "--fps"),
    ("video_make_mp4", "--eval_dir {ok} --fps -3", "--fps"),
    ("video_make_mp4", "--eval_dir {ok} --scale 0", "--scale"),
    ("video_make_mp4", "--eval_dir {ok} --scale 1.5", "--scale"),
    ("video_make_mp4", "--eval_dir {ok} --max_videos 0", "--max_videos"),
    ("video_make_mp4", "--eval_dir {ok} --n_seeds 0", "--n_seeds"),
    ("video_make_mp4", "--eval_dir {ok} --obs_length -1", "--obs_length"),
    ("video_make_mp4", "--eval_dir {ok} --format avi", "--format"),
    ("video_make_mp4", "--eval_dir {ok} --out_dir {text}", "--out_dir {text}"),
    ("video_fvd", "--eval_dir {ok}", "--i3d_path"),
    ("video_fvd", "--eval_dir {ok} --i3d_path {missing}", "{missing}"),
    ("video_fvd", "--eval_dir {one} --i3d_path {i3d}", "FVD needs at least 2 videos"),
    ("video_fvd", "--eval_dir {ok} --i3d_path {i3d} --sample_idx 3", "with sample_idx 3"),
    ("video_fvd", "--eval_dir {ok} --i3d_path {i3d} --batch_size 0", "--batch_size"),
    ("video_fvd", "--eval_dir {missing} --i3d_path {i3d}", "{missing} does not exist"),
    ("video_to_world_coords", "--eval_dir {ok} --classifier_path {missing} --regressor_path {corrupt}",
     "{missing}' does not exist"),
    ("video_to_world_coords", "--eval_dir {ok} --classifier_path {list_pt} --regressor_path {corrupt}",
     "{list_pt}' holds a list"),
    ("video_to_world_coords", "--eval_dir {empty} --classifier_path {corrupt} --regressor_path {corrupt}",
     "holds no sample_"),
    ("video_to_world_coords", "--eval_dir {ok} --classifier_path {corrupt} --regressor_path {corrupt} --batch_size 0",
     "--batch_size"),
    ("video_to_world_coords", "--eval_dir {ok} --classifier_path {corrupt} --regressor_path {corrupt} "
     "--device warp-drive", "--device"),
    ("video_to_world_coords", "--eval_dir {ok} --regressor_path {corrupt}", "--classifier_path"),
    ("video_to_world_coords", "--classifier_path {corrupt} --regressor_path {corrupt}", "--dataset_dir"),
    ("video_to_world_coords", "--eval_dir {ok} --dataset_dir {ok} --classifier_path {corrupt} "
     "--regressor_path {corrupt}", "--dataset_dir"),
    ("video_to_world_coords", "--dataset_dir {missing} --classifier_path {corrupt} --regressor_path {corrupt}",
     "--dataset_dir"),
    ("carla_regressor_train", "--data_dir {carla_empty} --kind regressor --is_classifier True --out {missing}/r.pt",
     "--is_classifier"),
    ("carla_regressor_train", "--data_dir {missing} --kind classifier --out {missing}/c.pt", "{missing} does not exist"),
    ("carla_regressor_train", "--data_dir {carla_empty} --kind regressor --out {missing}/r.pt", "video_train.csv"),
    ("carla_regressor_train", "--data_dir {carla_empty} --kind detector --out {missing}/r.pt", "--kind"),
    ("carla_regressor_train", "--data_dir {carla_empty} --kind regressor --out {missing}/r.pt --epochs 0",
     "--epochs"),
    ("carla_regressor_train", "--data_dir {carla_empty} --kind regressor --out {missing}/r.pt --init_from {corrupt}",
     "--init_from: Checkpoint '{corrupt}' is corrupt or not a checkpoint"),
    ("carla_regressor_train", "--data_dir {carla_empty} --kind regressor --out {carla_empty}", "--out {carla_empty}"),
    ("train_carla_regressor", "--data_dir {missing} --kind classifier --out {missing}/c.pt", "{missing} does not exist"),
]


# Runs one script's cases in one interpreter, as `python <script>.py ...` would run each (its
# `__main__`, sys.argv, exit code, stderr), so that start-up is paid once per script, not per case.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
script, cases = sys.argv[1], json.loads(sys.argv[2])
results = []
for argv in cases:
    sys.argv = [script, *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_script_cases(files, script):
    """[(exit code, stderr)] of every case of `script`, or Nones if they did not finish in time."""
    numbers = [i for i, case in enumerate(CASES) if case[0] == script]
    argvs = [[a.format(**files) for a in CASES[i][1].split()] for i in numbers]
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, str(SCRIPTS / f"{script}.py"), json.dumps(argvs)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        results = json.loads(done.stdout.splitlines()[-1])
    except subprocess.TimeoutExpired:
        results = [None] * len(numbers)
    return dict(zip(numbers, results))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's (exit code, stderr), each script in its own interpreter, two at a time."""
    files = build_files(tmp_path_factory.mktemp("bad_inputs"))
    scripts = sorted({case[0] for case in CASES})
    with ThreadPoolExecutor(2) as pool:
        per_script = list(pool.map(lambda script: run_script_cases(files, script), scripts))
    return files, {number: result for results in per_script for number, result in results.items()}


@pytest.mark.parametrize("number", range(len(CASES)), ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_bad_input_ends_with_one_sentence_and_exit_2(outcomes, number):
    files, results = outcomes
    script, _, expected = CASES[number]
    assert results[number] is not None, f"{script}.py's cases did not finish within {TIMEOUT_S} s"
    code, stderr = results[number]
    prog = "carla_regressor_train" if script == "train_carla_regressor" else script
    assert code == 2, stderr
    assert stderr.startswith(f"{prog}.py: error: ") and stderr.count("\n") == 1, stderr
    assert expected.format(**files) in stderr, stderr
