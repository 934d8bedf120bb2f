import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.errors import CheckpointError, ConfigError, DatasetError
from improved_diffusion.evaluation import carla_coords as cc
from improved_diffusion.evaluation import carla_regressor as cr
from improved_diffusion.evaluation import carla_training as ct
from improved_diffusion.evaluation import evaluate

TINY = cr.CoordinateModelConfig(layers=(1, 1, 1, 1), width=4)
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "carla_regressor_train.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_models(seed=0):
    torch.manual_seed(seed)
    return cr.build_model("classifier", TINY).eval(), cr.build_model("regressor", TINY).eval()


def fdm_get_cell(coord):
    """FDM's get_cell, verbatim in behaviour: a 10 x 10 histogram over [-10, 400]^2."""
    count, _, _ = np.histogram2d([coord[0]], [coord[1]], bins=10, range=[[-10, 400], [-10, 400]])
    return count.flatten().nonzero()[0][0]


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def test_cells_match_fdm_histogram():
    rng = np.random.default_rng(0)
    coords = rng.uniform(-10, 400, size=(300, 3))
    coords[:3, :2] = [[-10, -10], [400, 400], [31, 390.5]]  # edges of the range
    expected = [fdm_get_cell(c) for c in coords]
    np.testing.assert_array_equal(cr.coords_to_cells(coords), expected)
    # Outside Town01's range (FDM would fail) we clip to the nearest edge cell.
    np.testing.assert_array_equal(cr.coords_to_cells([[-50, 500], [1000, 0]]), [9, 90])


def test_resnet152_matches_torchvision_layout():
    model = cr.build_model("classifier")
    # torchvision's resnet152 has 60,192,808 parameters with its 1000-way fc.
    assert sum(p.numel() for p in cr.ResNet().parameters()) == 60_192_808
    keys = model.state_dict().keys()
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer3.35.bn3.bias",
                "layer4.2.conv3.weight", "fc.weight"]:
        assert key in keys
    assert model.fc.weight.shape == (100, 2048)
    regressor_keys = cr.build_model("regressor", TINY).state_dict().keys()
    assert "resnet.layer2.0.downsample.1.running_mean" in regressor_keys
    assert "regressors.99.bias" in regressor_keys and "resnet.fc.weight" not in regressor_keys


def test_predict_coords_uses_classifier_cell_heads():
    classifier, regressor = tiny_models()
    frames = np.random.default_rng(1).integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    coords = cc.predict_coords(frames, classifier, regressor, batch_size=3)
    assert coords.shape == (7, 2)
    x = cr.preprocess_frames(frames)
    with torch.no_grad():
        cells = classifier(x).argmax(dim=1)
        emb = regressor.resnet(x)
        expected = torch.stack([regressor.regressors[c](emb[i]) for i, c in enumerate(cells)])
    np.testing.assert_allclose(coords, expected.double().numpy(), rtol=1e-5, atol=1e-5)
    # ToTensor + ImageNet Normalize, as FDM's base_data_transform; [-1, 1] floats agree with uint8.
    mean, std = np.array(cr.IMAGENET_MEAN), np.array(cr.IMAGENET_STD)
    np.testing.assert_allclose(x.numpy(), (frames / 255.0 - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    as_float = torch.from_numpy(frames).float() / 127.5 - 1
    np.testing.assert_allclose(cc.predict_coords(as_float, classifier, regressor), coords, rtol=1e-4, atol=1e-4)
    videos = frames[:6].reshape(2, 3, 3, 32, 32)
    np.testing.assert_allclose(cc.video_coords(videos, classifier, regressor), coords[:6].reshape(2, 3, 2))


def test_checkpoints_round_trip_and_errors(tmp_path):
    classifier, regressor = tiny_models()
    frames = np.random.default_rng(2).integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    expected = cc.predict_coords(frames, classifier, regressor)

    cr.save_model(tmp_path / "c.pt", classifier, "classifier", TINY)
    cr.save_model(tmp_path / "r.pt", regressor, "regressor", TINY)
    loaded = cr.load_models(tmp_path / "c.pt", tmp_path / "r.pt")
    np.testing.assert_array_equal(cc.predict_coords(frames, *loaded), expected)

    # Bare state dicts, as FDM released, load given their architecture.
    torch.save(regressor.state_dict(), tmp_path / "bare.pth")
    bare = cr.load_model(tmp_path / "bare.pth", "regressor", config=TINY)
    np.testing.assert_array_equal(cc.predict_coords(frames, loaded[0], bare), expected)

    with pytest.raises(CheckpointError, match="holds a classifier, not a regressor"):
        cr.load_model(tmp_path / "c.pt", "regressor")
    with pytest.raises(CheckpointError, match="does not hold weights for a regressor"):
        cr.load_model(tmp_path / "bare.pth", "regressor", config=cr.CoordinateModelConfig(layers=(1, 1, 1, 1)))
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is corrupt or not a checkpoint"):
        cr.load_model(tmp_path / "corrupt.pt", "classifier")
    with pytest.raises(CheckpointError, match="does not exist"):
        cr.load_model(tmp_path / "missing.pt", "classifier")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        cr.load_model(tmp_path / "list.pt", "classifier")


# ---------------------------------------------------------------------------
# Dataset files and training
# ---------------------------------------------------------------------------


def make_carla_dir(root, n_videos=5, T=6, size=32, n_test=1):
    """A tiny directory in FDM's CARLA layout: video_<i>.pt, coords_<i>.npy, split csvs."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_videos):
        video = torch.from_numpy(rng.integers(0, 256, size=(T, size, size, 3), dtype=np.uint8))
        torch.save(video, root / f"video_{i}.pt")
        coords = np.cumsum(rng.normal(0, 2, size=(T, 3)), axis=0) + rng.uniform(0, 390, size=3)
        np.save(root / f"coords_{i}.npy", coords)
    # As FDM's make_train_test_split.py writes them: a header, then "<row>,<path>".
    for split, ids in (("train", range(n_videos - n_test)), ("test", range(n_videos - n_test, n_videos))):
        rows = "".join(f"{i},{root / f'video_{i}.pt'}\n" for i in ids)
        (root / f"video_{split}.csv").write_text(",path\n" + rows)
    return root


def test_read_split_and_batches(tmp_path):
    make_carla_dir(tmp_path)
    pairs = cc.read_split(tmp_path, "train")
    assert [p[0].name for p in pairs] == [f"video_{i}.pt" for i in range(4)]
    assert pairs[2][1].name == "coords_2.npy"
    assert cc.load_video(pairs[0][0]).shape == (6, 3, 32, 32)
    assert cc.load_coords(pairs[0][1]).shape == (6, 2)
    batches = list(ct.frame_batches(pairs, 4, np.random.default_rng(0), videos_per_chunk=3))
    assert sum(len(f) for f, _ in batches) == 24  # every frame exactly once
    all_coords = np.concatenate([c for _, c in batches])
    expected = np.concatenate([cc.load_coords(p[1]) for p in pairs])
    np.testing.assert_allclose(np.sort(all_coords, axis=0), np.sort(expected, axis=0))
    few = list(ct.frame_batches(pairs, 4, np.random.default_rng(0), frames_per_video=2))
    assert sum(len(f) for f, _ in few) == 8

    with pytest.raises(DatasetError, match="No split file"):
        cc.read_split(tmp_path, "valid")
    with pytest.raises(DatasetError, match="does not exist"):
        cc.read_split(tmp_path / "missing", "train")
    (tmp_path / "coords_1.npy").unlink()
    with pytest.raises(DatasetError, match="coords_1.npy does not exist"):
        cc.read_split(tmp_path, "train")


def test_training_is_reproducible_and_saves(tmp_path):
    make_carla_dir(tmp_path)
    kwargs = dict(config=TINY, epochs=2, batch_size=4, seed=3, progress=False, log=lambda msg: None)
    model, history = ct.train_coordinate_model(tmp_path, "regressor", **kwargs)
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["test_loss"]) for h in history)
    _, again = ct.train_coordinate_model(tmp_path, "regressor", **kwargs)
    assert again == history
    with pytest.raises(ConfigError, match="Unknown model kind"):
        ct.train_coordinate_model(tmp_path, "detector", **kwargs)


def test_the_classifier_comes_back_with_its_best_test_weights(tmp_path):
    """The returned classifier is the epoch with the lowest test loss, in eval mode, not the last epoch."""
    make_carla_dir(tmp_path)
    kwargs = dict(config=TINY, epochs=3, batch_size=4, seed=3, lr=1e-3, progress=False, log=lambda msg: None)
    classifier, history = ct.train_coordinate_model(tmp_path, "classifier", **kwargs)
    test_losses = [h["test_loss"] for h in history]
    assert int(np.argmin(test_losses)) != len(history) - 1  # else the check below could not tell best from last
    assert not classifier.training and not isinstance(classifier, cr.MultiHeadRegressor)
    rng = np.random.default_rng([3, 2**31])  # the loop's fixed test-split order
    total = count = 0
    with torch.no_grad():
        for frames, coords in ct.frame_batches(cc.read_split(tmp_path, "test"), 4, rng):
            total += ct._loss(classifier, "classifier", frames, coords, "cpu").item() * len(frames)
            count += len(frames)
    assert total / count == pytest.approx(min(test_losses), rel=1e-5)
    with pytest.raises(ConfigError, match="Unknown model kind"):
        ct.train_coordinate_model(tmp_path, "detector", **kwargs)


def test_script_trains_and_writes_checkpoint(tmp_path):
    make_carla_dir(tmp_path)
    spec = importlib.util.spec_from_file_location("carla_regressor_train", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "ckpt" / "regressor.pt"
    args = script.create_argparser().parse_args(["--data_dir", str(tmp_path), "--kind", "regressor", "--out", str(out),
                              "--epochs", "1", "--layers", "1", "1", "1", "1", "--width", "4", "--device", "cpu"])
    script.main(args)
    model = cr.load_model(out, "regressor")
    assert isinstance(model, cr.MultiHeadRegressor)
    assert out.with_suffix(".history.json").exists()


def test_script_takes_fdms_command_line(tmp_path, monkeypatch):
    """FDM's `carla_regressor_train.py --data_dir D --is_classifier True --num_epochs N` trains a classifier
    into FDM's released file name."""
    make_carla_dir(tmp_path / "carla")
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("carla_regressor_train", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.create_argparser().parse_args(["--data_dir", "carla", "--is_classifier", "True", "--num_epochs",
                                                 "1", "--layers", "1", "1", "1", "1", "--width", "4", "--device",
                                                 "cpu"])
    script.main(args)
    model = cr.load_model(tmp_path / "checkpoints" / "carla-regressor" / "classifier_checkpoint.pth", "classifier")
    assert not isinstance(model, cr.MultiHeadRegressor)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def brute_force_wasserstein(a, b, p=1):
    """W_p of two equal-size point sets, by trying every matching (Birkhoff: one of them is optimal)."""
    return min(np.mean([np.linalg.norm(a[i] - b[j]) ** p for i, j in enumerate(perm)])
               for perm in itertools.permutations(range(len(a)))) ** (1.0 / p)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_wasserstein_distance_vs_brute_force(n):
    rng = np.random.default_rng(n)
    for trial in range(4):
        a, b = rng.uniform(0, 50, size=(2, n, 2))
        if trial == 0:
            a, b = np.round(a / 10), np.round(b / 10)  # ties between matchings
        for p in (1, 2):
            assert cc.wasserstein_distance(a, b, p=p) == pytest.approx(brute_force_wasserstein(a, b, p))


def test_wasserstein_distance_hand_examples():
    a = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]])
    # A translation by (3, 4) moves every point 5 m: W_p = 5 for every p.
    for p in (1, 2):
        assert cc.wasserstein_distance(a, a + [3.0, 4.0], p=p) == pytest.approx(5.0)
    # Matching each point to its nearest partner (not the listed order) costs 1 m each.
    b = np.array([[10.0, 1.0], [0.0, 21.0], [0.0, 1.0]])
    assert cc.wasserstein_distance(a, b) == pytest.approx(1.0)
    assert cc.wasserstein_distance(a, a[::-1]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same size"):
        cc.wasserstein_distance(a, a[:2])


def test_outliers_against_brute_force():
    road = np.stack([np.linspace(0, 100, 201), np.zeros(201)], axis=1)  # every 0.5 m along y = 0
    points = np.array([[50.0, 4.9], [50.0, 5.1], [-3.0, 4.0], [-4.0, 4.0], [100.2, -2.0]])
    np.testing.assert_array_equal(cc.outliers(points, road, threshold=5.0), [False, True, False, True, False])
    assert cc.percentage_outliers(points, road, threshold=5.0) == pytest.approx(40.0)

    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 60, size=(300, 2))
    queries = rng.uniform(-10, 70, size=(400, 2))
    nearest = np.sqrt(((queries[:, None] - reference[None]) ** 2).sum(-1)).min(axis=1)
    for threshold in (0.7, 2.0, 5.0):
        np.testing.assert_array_equal(cc.outliers(queries, reference, threshold), nearest > threshold)


def test_mean_distance_per_frame():
    a = np.zeros((2, 3, 2))
    b = np.zeros((2, 3, 2))
    b[0, 1] = [3, 4]
    b[1, 2] = [0, 2]
    np.testing.assert_allclose(cc.mean_distance_per_frame(a, b), [0.0, 2.5, 1.0])


def test_carla_metrics_hand_computed():
    train = np.stack([np.linspace(0, 100, 1001), np.zeros(1001)], axis=1)  # a straight road
    samples = np.array([
        [[0, 0], [10, 1], [20, 0]],
        [[0, 0], [30, 9], [40, 0]],   # leaves the road mid-video
        [[0, 0], [50, 1], [60, 8]],   # ends off the road
    ], dtype=float)
    real = np.array([
        [[0, 0], [0, 0], [40, 0]],
        [[0, 0], [0, 0], [60, 0]],
        [[0, 0], [0, 0], [20, 3]],
    ], dtype=float)
    m = cc.carla_metrics(samples, real, train, threshold=5.0)
    assert m["po"] == pytest.approx(100 * 2 / 9)
    assert m["po_final"] == pytest.approx(100 / 3)
    # Final positions: optimal matching 20->(20,3), 40->40, (60,8)->60 costs 3 + 0 + 8.
    assert m["wd"] == pytest.approx(11 / 3)
    assert m["n_videos"] == 3


def test_carla_metrics_from_tiny_regressor():
    """End to end on random frames: regress, then compare with a hand computation."""
    classifier, regressor = tiny_models(seed=1)
    rng = np.random.default_rng(4)
    sampled = rng.integers(0, 256, size=(4, 3, 3, 32, 32), dtype=np.uint8)
    real = rng.integers(0, 256, size=(4, 3, 3, 32, 32), dtype=np.uint8)
    sample_coords = cc.video_coords(sampled, classifier, regressor)
    real_coords = cc.video_coords(real, classifier, regressor)
    train_coords = real_coords.reshape(-1, 2)[:6]
    threshold = float(np.median(np.abs(sample_coords))) + 1e-3
    m = cc.carla_metrics(sample_coords, real_coords, train_coords, threshold=threshold)

    final_a, final_b = sample_coords[:, -1], real_coords[:, -1]
    wd = min(np.mean([np.linalg.norm(final_a[i] - final_b[j]) for i, j in enumerate(perm)])
             for perm in itertools.permutations(range(4)))
    assert m["wd"] == pytest.approx(wd)
    flat = sample_coords.reshape(-1, 2)
    nearest = np.array([min(np.linalg.norm(q - r) for r in train_coords) for q in flat])
    assert m["po"] == pytest.approx(100 * np.mean(nearest > threshold))
    assert m["po_final"] == pytest.approx(100 * np.mean(nearest.reshape(4, 3)[:, -1] > threshold))


# ---------------------------------------------------------------------------
# Results folders: world coordinates and WD/PO in video_eval
# ---------------------------------------------------------------------------


def save_tiny_models(folder, seed=1, metres=1.0):
    """Tiny networks on disk; `metres` scales the regressor's heads (random ones spread positions over ~1 m)."""
    classifier, regressor = tiny_models(seed)
    with torch.no_grad():
        for head in regressor.regressors:
            head.weight.mul_(metres)
            head.bias.mul_(metres)
    cr.save_model(folder / "classifier.pt", classifier, "classifier", TINY)
    cr.save_model(folder / "regressor.pt", regressor, "regressor", TINY)
    return folder / "classifier.pt", folder / "regressor.pt", classifier, regressor


def make_eval_dir(path, samples, dataset="carla_no_traffic", n_obs=1):
    (path / "samples").mkdir(parents=True)
    config = dict(dataset=dataset, n_obs=n_obs, T=len(samples[0]), image_size=samples[0].shape[-1], data_seed=0)
    (path / "sampling_config.json").write_text(json.dumps(config))
    for i, sample in enumerate(samples):
        np.save(path / "samples" / f"sample_{i:04d}-0.npy", sample)
    return path


def test_write_world_coords_saves_beside_samples_and_resumes(tmp_path):
    c_path, r_path, classifier, regressor = save_tiny_models(tmp_path)
    rng = np.random.default_rng(5)
    samples = [rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8) for _ in range(2)]
    eval_dir = make_eval_dir(tmp_path / "e", samples)
    written = cc.write_world_coords(eval_dir, c_path, r_path, batch_size=3, log=lambda msg: None)
    assert [p.relative_to(eval_dir).as_posix() for p in written] == ["coords/sample_0000-0.npy",
                                                                     "coords/sample_0001-0.npy"]
    for sample, path in zip(samples, written):
        np.testing.assert_allclose(np.load(path), cc.predict_coords(sample, classifier, regressor), atol=1e-5)
    np.save(written[0], np.zeros((4, 2)))  # an existing file is kept: a stopped run resumes
    cc.write_world_coords(eval_dir, c_path, r_path, log=lambda msg: None)
    assert not np.load(written[0]).any()


def test_dataset_mode_writes_each_videos_coords_under_results(tmp_path, monkeypatch):
    """FDM's --dataset_dir mode: results/<dataset_dir>/coords/video_<i>.npy, from the video's own frames."""
    c_path, r_path, classifier, regressor = save_tiny_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    make_carla_dir(tmp_path / "carla", n_videos=2, T=3)
    written = cc.write_dataset_world_coords("carla", c_path, r_path, log=lambda msg: None)
    assert [p.as_posix() for p in written] == ["results/carla/coords/video_0.npy", "results/carla/coords/video_1.npy"]
    for i, path in enumerate(written):
        frames = torch.load(tmp_path / "carla" / f"video_{i}.pt").numpy().transpose(0, 3, 1, 2)
        np.testing.assert_allclose(np.load(path), cc.predict_coords(frames, classifier, regressor), atol=1e-5)
    with pytest.raises(ConfigError, match="no '..'"):
        cc.write_dataset_world_coords("../carla", c_path, r_path)


def test_video_eval_wd_and_po_match_a_brute_force_computation(tmp_path):
    """WD and PO of a results folder, against positions regressed from the dataset's own files."""
    data_root = tmp_path / "data"
    carla = make_carla_dir(data_root / "carla" / "no-traffic", n_videos=7, T=4, n_test=4)
    c_path, r_path, classifier, regressor = save_tiny_models(tmp_path, metres=100.0)
    rng = np.random.default_rng(6)
    samples = [rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8) for _ in range(4)]
    sample_xy = cc.video_coords(np.stack(samples), classifier, regressor)
    # A road through half of the sampled positions, so that PO is neither 0 nor 100.
    road = sample_xy[:2].reshape(-1, 2) + 1.0
    for i in range(3):
        np.save(carla / f"coords_{i}.npy", road if i == 0 else road[:1])
    eval_dir = make_eval_dir(tmp_path / "e", samples)
    result = evaluate.evaluate(eval_dir, "wd,po", data_root=data_root, carla_classifier=c_path,
                               carla_regressor=r_path)

    truth = np.stack([cc.load_video(carla / f"video_{i}.pt") for i in range(3, 7)])
    truth_final = cc.video_coords(truth, classifier, regressor)[:, -1]
    assert result["overall"]["wd"] == pytest.approx(brute_force_wasserstein(sample_xy[:, -1], truth_final), rel=1e-4)
    flat = sample_xy.reshape(-1, 2)
    nearest = np.sqrt(((flat[:, None] - road[None]) ** 2).sum(-1)).min(axis=1)
    assert 0 < result["overall"]["po"] < 100
    assert result["overall"]["po"] == pytest.approx(100 * np.mean(nearest > cc.OUTLIER_THRESHOLD))

    other = make_eval_dir(tmp_path / "bb", samples, dataset="bouncing_balls")
    skipped = evaluate.evaluate(other, "wd", carla_classifier=c_path, carla_regressor=r_path)["skipped"]
    assert "carla_no_traffic" in skipped["wd"]
