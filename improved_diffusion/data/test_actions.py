"""Actions: their encoding, the dataset interface that delivers them, and users' `<name>.actions.npy` files."""

import numpy as np
import pytest
import torch

from improved_diffusion.data.actions import ActionEncoding, actions_path
from improved_diffusion.data.batches import train_batches
from improved_diffusion.data.datasets import default_T, get_dataset, test_actions, test_video
from improved_diffusion.data.test_datasets import numbered_video, write_mp4
from improved_diffusion.errors import DatasetError


def one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
    return message


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def test_discrete_actions_are_one_hot():
    encoding = ActionEncoding.discrete(3)
    assert (encoding.action_dim, encoding.num_actions, encoding.is_discrete) == (3, 3, True)
    encoded = encoding.encode(np.array([2, 0, 1, 2]), "x.npz")
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(DatasetError, match=r"x.npz must lie in \[0, 3\), but it holds action 3"):
        encoding.encode(np.array([0, 3]), "x.npz")
    with pytest.raises(DatasetError, match="vector of integers"):
        encoding.encode(np.zeros((4, 3)), "x.npz")


def test_continuous_actions_are_float_vectors():
    encoding = ActionEncoding.continuous(2)
    assert (encoding.action_dim, encoding.num_actions, encoding.is_discrete) == (2, None, False)
    stored = np.array([[0.5, -1], [2, 3]], dtype=np.float64)
    np.testing.assert_array_equal(encoding.encode(stored, "a"), stored.astype(np.float32))
    with pytest.raises(DatasetError, match=r"shape \[T x 2\]"):
        encoding.encode(np.zeros((2, 3)), "a")


def test_actions_path():
    assert actions_path("/v/clip.mp4").name == "clip.actions.npy"
    assert actions_path("a/b.c.npy").as_posix() == "a/b.c.actions.npy"


# ---------------------------------------------------------------------------
# The interface on datasets without actions
# ---------------------------------------------------------------------------


def test_datasets_without_actions(tmp_path):
    dataset = get_dataset("bouncing_balls", T=4, image_size=8)
    assert (dataset.action_dim, dataset.num_actions) == (None, None)
    video, actions = dataset.video_and_actions(2, np.random.default_rng(1))
    assert actions is None
    torch.testing.assert_close(video, dataset.video(2, np.random.default_rng(1)))
    videos, batch_actions = next(train_batches(dataset, batch_size=2, seed=0, with_actions=True))
    assert batch_actions is None
    torch.testing.assert_close(videos, next(train_batches(dataset, batch_size=2, seed=0)))
    assert test_actions("bouncing_balls", 0, T=4, image_size=8) is None


def test_procedural_actions_share_the_window():
    dataset = get_dataset("bouncing_balls_actions", T=6, image_size=16)
    assert (dataset.action_dim, dataset.num_actions) == (5, 5)
    for seed in range(5):
        frames, actions = dataset.frames_and_actions(7, np.random.default_rng(seed))
        np.testing.assert_array_equal(frames, dataset.frames(7, np.random.default_rng(seed)))
        assert actions.shape == (6, 5) and actions.dtype == np.float32
        np.testing.assert_array_equal(actions.sum(1), np.ones(6))
    torch.testing.assert_close(dataset.video_and_actions(3)[0], dataset.video(3))
    test = get_dataset("bouncing_balls_actions", split="test", T=6, image_size=16)
    video, actions = test.video_and_actions(1)
    torch.testing.assert_close(test_video("bouncing_balls_actions", 1, T=6, image_size=16), video)
    torch.testing.assert_close(test_actions("bouncing_balls_actions", 1, T=6, image_size=16), actions)
    batches = train_batches(dataset, batch_size=3, seed=4, with_actions=True)
    videos, batch_actions = next(batches)
    assert videos.shape == (3, 6, 3, 16, 16) and batch_actions.shape == (3, 6, 5)


# ---------------------------------------------------------------------------
# User folders: <name>.actions.npy beside each video
# ---------------------------------------------------------------------------


def make_folder_with_actions(folder, kind="discrete", lengths=(8, 9, 10, 7)):
    """Videos 0..3 (numbered_video: frame index in pixel [0, 0, red]) with actions files; returns the actions."""
    folder.mkdir(parents=True)
    stored = {}
    rng = np.random.default_rng(0)
    for i, length in enumerate(lengths):
        path = folder / f"v{i}.npy"
        np.save(path, numbered_video(i, T=length, size=6))
        stored[path.name] = rng.integers(0, 4, length) if kind == "discrete" else rng.normal(size=(length, 2)).astype(np.float32)
        np.save(actions_path(path), stored[path.name])
    return stored


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_user_folder_actions_aligned(tmp_path, kind):
    folder = tmp_path / "videos"
    stored = make_folder_with_actions(folder, kind)
    assert default_T(str(folder)) == 7  # actions files are not videos
    train = get_dataset(str(folder), T=5, image_size=6)
    test = get_dataset(str(folder), split="test", T=5, image_size=6)
    assert len(train) + len(test) == 4
    width = 1 + max(int(a.max()) for a in stored.values()) if kind == "discrete" else 2
    assert train.action_dim == test.action_dim == width
    assert train.num_actions == (width if kind == "discrete" else None)
    for dataset in (train, test):
        for index in range(len(dataset)):
            for seed in range(6):
                frames, actions = dataset.frames_and_actions(index, np.random.default_rng(seed))
                raw = frames[:, 0, 0, 0].astype(int)  # frame numbers
                np.testing.assert_array_equal(frames, dataset.frames(index, np.random.default_rng(seed)))
                expected = stored[dataset.paths[index].name][raw]
                if kind == "discrete":
                    expected = np.eye(width)[expected]
                np.testing.assert_array_equal(actions, expected.astype(np.float32))


def test_user_folder_mp4_with_actions(tmp_path):
    folder = tmp_path / "mp4s"
    for split in ("train", "test"):
        (folder / split).mkdir(parents=True)
        write_mp4(folder / split / "clip.mp4", np.full((6, 8, 8, 3), 100, np.uint8))
        np.save(folder / split / "clip.actions.npy", np.arange(6) % 2)
    dataset = get_dataset(str(folder), T=4, image_size=8)
    video, actions = dataset.video_and_actions(0)
    assert video.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(actions.numpy(), np.eye(2)[[0, 1, 0, 1]])


def test_user_folder_missing_actions_file(tmp_path):
    folder = tmp_path / "videos"
    make_folder_with_actions(folder)
    actions_path(folder / "v2.npy").unlink()
    with pytest.raises(DatasetError, match=r"actions files for 3 of its 4 videos \(v2.npy has no v2.actions.npy\)") as error:
        get_dataset(str(folder), T=5)
    one_sentence(error)


def test_user_folder_actions_of_the_wrong_length(tmp_path):
    folder = tmp_path / "videos"
    make_folder_with_actions(folder, lengths=(8, 8, 8, 8))
    for name in ("v0", "v1", "v2", "v3"):
        np.save(folder / f"{name}.actions.npy", np.zeros(8, np.int64))
    np.save(folder / "v1.actions.npy", np.zeros(7, np.int64))
    messages = []
    for split in ("train", "test"):
        try:
            get_dataset(str(folder), split=split, T=5)
        except DatasetError as e:
            messages.append(str(e))
    assert len(messages) == 1  # v1 is in one split
    assert str(folder / "v1.actions.npy") in messages[0] and "has 7 actions but v1.npy has 8 frames" in messages[0]
    assert "\n" not in messages[0]


@pytest.mark.parametrize(
    "content,problem",
    [
        (np.zeros((8, 2, 2)), "must hold T integers or a"),
        (np.array([0, -1, 2, 0, 0, 0, 0, 0]), "negative action -1"),
        (np.full((8, 2), np.nan), "not finite"),
        (np.zeros((8, 3)), "holds 3-dimensional real actions but"),
    ],
    ids=["shape", "negative", "nan", "mixed"],
)
def test_user_folder_bad_actions_files(tmp_path, content, problem):
    folder = tmp_path / "videos"
    make_folder_with_actions(folder, kind="continuous", lengths=(8, 8, 8, 8))
    np.save(folder / "v3.actions.npy", content)
    with pytest.raises(DatasetError, match=problem) as error:
        get_dataset(str(folder), T=5)
    assert "v3.actions.npy" in one_sentence(error)


def test_user_folder_without_actions_is_unchanged(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", numbered_video(i, T=4, size=6))
    dataset = get_dataset(str(folder), T=4)
    assert dataset.action_dim is None and dataset.video_and_actions(0)[1] is None
