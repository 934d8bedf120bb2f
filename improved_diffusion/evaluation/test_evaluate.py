"""Tests for evaluation.py and scripts/video_eval.py on small eval dirs made by hand: known metric
values, the metrics.json layout, plots, ground truth shorter than the samples, and one-line errors."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.evaluation import evaluate as evaluation
from improved_diffusion.data.cue_recall import BACKGROUND, CUE_RETURN, PALETTE, cue_box, cue_colour_index
from improved_diffusion.evaluation.metrics import MetricUnavailable
from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.data.pixels import to_uint8
from improved_diffusion import cli
from improved_diffusion.errors import EvalError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "video_eval.py"
T, N_OBS, SIZE, SEED = 6, 2, 16, 3


def load_script():
    spec = importlib.util.spec_from_file_location("video_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


video_eval = load_script()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_lpips(monkeypatch):
    """LPIPS needs a package and downloaded weights; make it unavailable the same way everywhere."""

    def unavailable(*args, **kwargs):
        raise MetricUnavailable("LPIPS skipped: the optional `lpips` package is not installed.")

    monkeypatch.setattr(evaluation, "load_lpips", unavailable)


def ground_truth(index, dataset="bouncing_balls", length=T, seed=SEED):
    video = get_dataset(dataset, split="test", T=length, image_size=SIZE, seed=seed).video(index)
    return to_uint8(video).numpy()


def make_eval_dir(path, samples, dataset="bouncing_balls", n_obs=N_OBS, data_seed=SEED, **config):
    """An eval dir as video_sample.py writes it; the checkpoint holds only the config the evaluation reads."""
    path = Path(path)
    (path / "samples").mkdir(parents=True)
    checkpoint = path / "model.pt"
    torch.save({"config": {}, "state_dict": {}, "step": 0}, checkpoint)
    config = {"checkpoint": str(checkpoint), "dataset": dataset, "T": len(samples[0]), "n_obs": n_obs,
              "data_seed": data_seed,
              "max_frames": 4, "image_size": SIZE, "sampling_scheme": "autoreg", **config}
    (path / "sampling_config.json").write_text(json.dumps(config))
    for i, sample in enumerate(samples):
        np.save(path / "samples" / f"sample_{i:04d}-0.npy", sample)
    return path


def run_cli(capsys, *argv):
    code = cli.run(video_eval.main, video_eval.create_argparser(), [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_samples_equal_to_ground_truth_score_perfectly(tmp_path):
    eval_dir = make_eval_dir(tmp_path / "e", [ground_truth(0), ground_truth(1)])
    result = evaluation.evaluate_eval_dir(eval_dir)
    assert result["n_videos"] == 2 and result["frames_compared"] == T and not result["notes"]
    assert result["per_frame"]["psnr"] == [math.inf] * T
    assert np.allclose(result["per_frame"]["ssim"], 1.0)
    assert result["overall"]["psnr"] == math.inf and result["overall"]["ssim"] == pytest.approx(1.0)


def test_constant_offset_gives_known_psnr_on_generated_frames(tmp_path):
    samples = []
    for i in range(2):
        truth = ground_truth(i)
        sample = truth.astype(int)
        # Every generated pixel off by exactly 10 grey levels (down where possible, else up): MSE = 100.
        sample[N_OBS:] += np.where(sample[N_OBS:] >= 10, -10, 10)
        samples.append(sample.astype(np.uint8))
    eval_dir = make_eval_dir(tmp_path / "e", samples)
    result = evaluation.evaluate_eval_dir(eval_dir)
    expected = 10 * math.log10(255**2 / 100)
    assert result["per_frame"]["psnr"][:N_OBS] == [math.inf] * N_OBS  # observed frames are copies
    assert np.allclose(result["per_frame"]["psnr"][N_OBS:], expected)
    assert result["overall"]["psnr"] == pytest.approx(expected)
    assert result["overall_frames"] == f"generated frames {N_OBS}..{T - 1}"
    assert all(s < 1 for s in result["per_frame"]["ssim"][N_OBS:])


def test_metrics_json_layout_and_plots(tmp_path):
    eval_dir = make_eval_dir(tmp_path / "e", [ground_truth(0), ground_truth(1)[::-1].copy()])
    evaluation.evaluate_eval_dir(eval_dir)
    saved = json.loads((eval_dir / "metrics.json").read_text())  # Infinity reads back as float("inf")
    assert saved["n_videos"] == 2 and saved["samples"] == ["sample_0000-0.npy", "sample_0001-0.npy"]
    assert saved["metrics"] == ["psnr", "ssim", "lpips", "on_manifold"]
    assert set(saved["per_frame"]) == {"psnr", "ssim", "on_manifold"}
    assert all(len(v) == T for v in saved["per_frame"].values())
    assert set(saved["overall"]) == {"psnr", "ssim", "on_manifold_last_quarter", "time_to_drift"}
    assert "lpips" in saved["skipped"] and "not installed" in saved["skipped"]["lpips"]
    assert saved["n_obs"] == N_OBS and saved["T"] == T and saved["dataset"] == "bouncing_balls"
    for name in ("psnr", "ssim", "on_manifold"):
        png = eval_dir / saved["plots"][name]
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_dataset_seed_comes_from_the_sampling_config(tmp_path, capsys):
    """The samples continue seed-3 videos: with data_seed 3 recorded they match; with seed 0, a note."""
    samples = [ground_truth(0)]
    assert evaluation.evaluate(make_eval_dir(tmp_path / "a", samples))["overall"]["psnr"] == math.inf
    result = evaluation.evaluate(make_eval_dir(tmp_path / "b", samples, data_seed=0))
    assert result["overall"]["psnr"] < math.inf
    assert any("observed frames of 1 of 1 samples" in n for n in result["notes"])


def test_ground_truth_shorter_than_the_samples_compares_the_overlap(tmp_path):
    """A folder dataset of 5-frame videos; 8-frame samples are compared on frames 0..4."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        for i in range(2):
            np.save(data / split / f"{i}.npy", rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8))
    truth = np.load(data / "test" / "0.npy").transpose(0, 3, 1, 2)
    sample = np.concatenate([truth, np.zeros((3, 3, SIZE, SIZE), np.uint8)])
    eval_dir = make_eval_dir(tmp_path / "e", [sample], dataset=str(data))
    result = evaluation.evaluate(eval_dir)
    assert result["T"] == 8 and result["frames_compared"] == 5
    assert result["per_frame"]["psnr"] == [math.inf] * 5
    assert any("only 5 frames" in n for n in result["notes"])


def test_cue_recall_applies_to_its_dataset_only(tmp_path):
    length = 40  # longer than CUE_RETURN, and than the generator's default 20 frames
    assert length > CUE_RETURN
    samples = [ground_truth(i, "cue_recall", length, seed=0) for i in range(2)]
    result = evaluation.evaluate(make_eval_dir(tmp_path / "cue", samples, "cue_recall", data_seed=0))
    assert result["metrics"] == ["psnr", "ssim", "lpips", "cue_recall", "on_manifold"]
    assert result["overall"]["cue_recall"] == 1.0 and result["details"]["cue_recall"]["chance"] == 0.25
    result = evaluation.evaluate(make_eval_dir(tmp_path / "bb", [ground_truth(0)]), metrics="psnr,cue_recall")
    assert "cue_recall" not in result["overall"] and "cue_recall dataset" in result["skipped"]["cue_recall"]


def test_cue_shown_and_recall_when_shown_separate_timing_from_memory(tmp_path):
    """Four videos: two true ones, one whose cue never returns, one whose cue returns in another colour:
    recall 2/4, shown 3/4 (a cue colour at the return), recall when shown 2/3."""
    length = CUE_RETURN + 4
    samples = [ground_truth(i, "cue_recall", length, seed=0) for i in range(4)]
    top, bottom, left, right = cue_box(SIZE)
    samples[2][CUE_RETURN:, :, top:bottom, left:right] = BACKGROUND[:, None, None]
    other = PALETTE[(cue_colour_index("test", 3, seed=0) + 1) % len(PALETTE)]
    samples[3][CUE_RETURN:, :, top:bottom, left:right] = other[:, None, None]
    overall = evaluation.evaluate(make_eval_dir(tmp_path / "four", samples, "cue_recall", data_seed=0),
                                  metrics="cue_recall")["overall"]
    assert overall == dict(cue_recall=2 / 4, cue_shown=3 / 4, cue_recall_when_shown=2 / 3)

    hidden = [samples[2]]  # no video shows the cue: recall when shown has no value, not 0
    overall = evaluation.evaluate(make_eval_dir(tmp_path / "none", hidden, "cue_recall", data_seed=0),
                                  metrics="cue_recall")["overall"]
    assert overall == dict(cue_recall=0.0, cue_shown=0.0, cue_recall_when_shown=None)


def noise_frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("dataset", ["bouncing_balls", "cue_recall"])
def test_on_manifold_of_ground_truth_and_of_noise(tmp_path, capsys, dataset):
    """Ground truth as samples never drifts; noise from frame 2 (video 0) and 4 (video 1) drifts there."""
    length = 16 if dataset == "cue_recall" else T  # cue_recall videos are longer than CUE_RETURN
    truth = [ground_truth(i, dataset, length, seed=0) for i in range(2)]
    gt_dir = make_eval_dir(tmp_path / "gt", truth, dataset, data_seed=0)
    code, out, err = run_cli(capsys, "--eval_dir", gt_dir, "--metrics", "on_manifold")
    assert code == 0 and "on_manifold_last_quarter: 1\n" in out and f"time_to_drift: {length}\n" in out, err
    result = evaluation.evaluate(gt_dir, metrics="on_manifold")
    assert result["per_frame"]["on_manifold"] == [1.0] * length
    assert result["overall"] == {"on_manifold_last_quarter": 1.0, "time_to_drift": length}
    details = result["details"]["on_manifold"]
    assert details["time_to_drift"] == [length, length] and details["censored"] == [True, True]
    assert details["last_quarter_frames"] == [length - max(1, length // 4), length - 1]

    noisy = [t.copy() for t in truth]
    noisy[0][2:] = noise_frames(noisy[0][2:].shape)
    noisy[1][4:] = noise_frames(noisy[1][4:].shape, 1)
    eval_dir = make_eval_dir(tmp_path / "noise", noisy, dataset, data_seed=0)
    result = evaluation.evaluate_eval_dir(eval_dir, metrics="on_manifold,psnr")
    assert result["per_frame"]["on_manifold"] == [1.0, 1.0, 0.5, 0.5] + [0.0] * (length - 4)
    assert result["overall"]["on_manifold_last_quarter"] == 0.0 and result["overall"]["time_to_drift"] == 3.0
    details = result["details"]["on_manifold"]
    assert details["time_to_drift"] == [2, 4] and details["censored"] == [False, False]
    assert details["off_reasons"] == {"background": 2 * length - 6}  # noise leaves no black background
    assert len(details["blob_count"]) == len(details["background_error"]) == length
    assert details["background_error"][0] == 0 and details["background_error"][-1] > 50
    saved = json.loads((eval_dir / "metrics.json").read_text())
    assert saved["details"]["on_manifold"]["time_to_drift"] == [2, 4]
    with Image.open(eval_dir / saved["plots"]["on_manifold"]) as image:
        assert image.format == "PNG"


def test_on_manifold_on_another_dataset_is_refused_before_reading_samples(tmp_path):
    assert "on_manifold" not in evaluation.parse_metrics("", "carla_no_traffic")
    with pytest.raises(EvalError, match="on_manifold applies to the bouncing_balls and cue_recall datasets"):
        evaluation.parse_metrics("psnr,on_manifold", "minerl")


class TinyI3D(torch.nn.Module):
    """The call signature of i3d_torchscript.pt; features are per-channel means and spreads."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float() / 127.5 - 1
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


def test_fvd_with_a_stand_in_detector(tmp_path, capsys):
    i3d = tmp_path / "i3d.pt"
    torch.jit.script(TinyI3D()).save(str(i3d))
    videos = [ground_truth(i) for i in range(3)]
    eval_dir = make_eval_dir(tmp_path / "e", videos)
    result = evaluation.evaluate(eval_dir, metrics="fvd", i3d_path=i3d)
    assert result["overall"]["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert result["details"]["fvd"]["n_videos"] == 3

    code, _, err = run_cli(capsys, "--eval_dir", eval_dir, "--metrics", "fvd", "--i3d_path", i3d, "--max_videos", 1)
    assert code == 2 and "at least 2 videos" in err and err.count("\n") == 1


@pytest.mark.parametrize("case, message", [
    ("no_samples_dir", "has no samples/ folder"),
    ("empty_samples_dir", "holds no sample_"),
    ("no_config", "has no sampling_config.json"),
    ("mismatched_shapes", "has frames of shape"),
    ("mixed_sample_shapes", "but sample_0000-0.npy has"),
    ("missing_ground_truth", "does not exist: the test split"),
    ("missing_dataset", "The ground truth is unavailable"),
    ("fvd_without_i3d", "FVD needs the I3D network"),
    ("unreadable_i3d", "Could not load an I3D TorchScript model"),
    ("unknown_metric", "Unknown metric 'fid'"),
    ("on_manifold_elsewhere", "on_manifold applies to the bouncing_balls and cue_recall datasets"),
])
def test_errors_exit_2_with_one_sentence(tmp_path, capsys, case, message):
    argv = []
    if case == "no_samples_dir":
        eval_dir = tmp_path / "e"
        eval_dir.mkdir()
        (eval_dir / "sampling_config.json").write_text("{}")
    else:
        samples = [ground_truth(0), ground_truth(1)]
        if case == "mismatched_shapes":
            samples = [s[:, :, :8, :8].copy() for s in samples]
        if case == "mixed_sample_shapes":
            samples[1] = samples[1][:4].copy()
        eval_dir = make_eval_dir(tmp_path / "e", samples, dataset="no/such/folder" if case in (
            "missing_dataset", "on_manifold_elsewhere") else "bouncing_balls")
        if case == "empty_samples_dir":
            for f in (eval_dir / "samples").iterdir():
                f.unlink()
        if case == "no_config":
            (eval_dir / "sampling_config.json").unlink()
        if case == "missing_ground_truth":
            np.save(eval_dir / "samples" / "sample_0500-0.npy", samples[0])
        if case == "fvd_without_i3d":
            argv = ["--metrics", "psnr,fvd"]
        if case == "unreadable_i3d":
            (tmp_path / "i3d.pt").write_text("not a model")
            argv = ["--metrics", "fvd", "--i3d_path", tmp_path / "i3d.pt"]
        if case == "unknown_metric":
            argv = ["--metrics", "psnr,fid"]
        if case == "on_manifold_elsewhere":
            argv = ["--metrics", "psnr,on_manifold"]
    code, _, err = run_cli(capsys, "--eval_dir", eval_dir, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("video_eval.py: error: ")


def test_script_prints_overall_values_and_exits_2_without_traceback(tmp_path):
    eval_dir = make_eval_dir(tmp_path / "e", [ground_truth(0)])
    ok = subprocess.run([sys.executable, str(SCRIPT), "--eval_dir", str(eval_dir), "--metrics", "psnr,ssim"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "psnr: inf" in ok.stdout and "ssim: 1" in ok.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--eval_dir", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr == f"video_eval.py: error: {tmp_path / 'missing'} does not exist; " \
                         "pass a video_sample.py output folder.\n"


def test_action_following_scores_ground_truth_by_its_own_actions_and_files_by_theirs(tmp_path):
    """Ground truth with its own actions scores 1; the same videos judged against an --actions file that
    does not drive them score near that file's chance, and the file's first T rows are what is read."""
    dataset, length = "bouncing_balls_actions", 12
    truth = [ground_truth(i, dataset, length, seed=0) for i in range(4)]
    own = make_eval_dir(tmp_path / "own", truth, dataset, data_seed=0, actions_source="dataset")
    result = evaluation.evaluate_eval_dir(own)
    assert "action_following" in result["metrics"]  # on by default for this dataset
    details = result["details"]["action_following"]
    assert result["overall"]["action_following"] == 1.0 and details["ground_truth"] == 1.0
    assert details["first_transition"] == N_OBS - 1 and details["n_transitions"] == 4 * (length - N_OBS)
    # The same videos, said to be driven by one fixed action sequence (up, then right, ...).
    fixed = np.resize(np.array([4, 1, 4, 1, 3, 2], dtype=np.int64), 20)
    np.save(tmp_path / "fixed.npy", fixed)
    moves = evaluation.following.observed_moves
    locate = evaluation.following.locate_ball
    expected = np.mean([np.mean(moves(locate(v), SIZE)[N_OBS - 1:] == fixed[N_OBS - 1:length - 1]) for v in truth])
    driven = make_eval_dir(tmp_path / "file", truth, dataset, data_seed=0, actions_source="file",
                           actions_file=str(tmp_path / "fixed.npy"))
    result = evaluation.evaluate_eval_dir(driven, metrics="action_following", max_videos=3)
    assert result["n_videos"] == 3
    assert result["overall"]["action_following"] < 0.6
    full = evaluation.evaluate_eval_dir(driven, metrics="action_following")
    assert full["overall"]["action_following"] == pytest.approx(expected)


def test_action_following_applies_to_its_dataset_only(tmp_path):
    eval_dir = make_eval_dir(tmp_path / "e", [ground_truth(0)])
    with pytest.raises(EvalError, match="action_following applies to the bouncing_balls_actions dataset"):
        evaluation.evaluate_eval_dir(eval_dir, metrics="action_following")
    assert "action_following" not in evaluation.evaluate_eval_dir(eval_dir)["metrics"]
