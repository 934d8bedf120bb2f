"""DMLab and Minecraft loaders on tiny files in the exact layouts of TECO's releases (episodes.py)."""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from improved_diffusion.data.batches import train_batches
from improved_diffusion.data.datasets import default_T, get_dataset
from improved_diffusion.data.episodes import NUM_ACTIONS
from improved_diffusion.data.test_datasets import write_mp4
from improved_diffusion.errors import DatasetError
from improved_diffusion.evaluation.ground_truth import GroundTruth

REPO = Path(__file__).resolve().parents[2]
SIZE = 16
MP4_LEVEL = 16  # Minecraft frame t is grey level 8 + 16 t (lossy codec: read back to the nearest level)


# ---------------------------------------------------------------------------
# Tiny episodes: the frame index is written into the pixels, the actions are random, so a
# clip's frames say which stored actions they must come with.
# ---------------------------------------------------------------------------


def dmlab_episode(length, seed, episode=0):
    """(video uint8 [L x H x W x 3] whose frame t is red level t, green level `episode`;
    actions int [L] in 0..2), as in TECO's npz files."""
    video = np.zeros((length, SIZE, SIZE, 3), np.uint8)
    video[..., 0] = np.arange(length, dtype=np.uint8)[:, None, None]
    video[..., 1] = episode
    actions = np.random.default_rng(seed).integers(0, NUM_ACTIONS["dmlab"], length)
    return video, actions


def make_dmlab(root, counts, length=20, split_names=("train", "test")):
    """<root>/dmlab/data/<split>/<dir>/<i>.npz (TECO's tar layout); returns {(split, file): actions}."""
    stored = {}
    for (split, count), folder_name in zip(counts.items(), split_names):
        for i in range(count):
            path = root / "dmlab" / "data" / folder_name / str(i % 2) / f"{i}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            video, actions = dmlab_episode(length, seed=100 * (split == "test") + i, episode=i)
            np.savez(path, video=video, actions=actions)
            stored[(split, path.relative_to(root / "dmlab" / "data" / folder_name).as_posix())] = actions
    return stored


def minecraft_episode(folder, name, frames, seed):
    """<name>.mp4 with `frames` frames (frame t at grey level 8 + 16 t) and <name>.npz with one action
    per frame, as collect-minecraft writes them: actions[0] = 0, then 1 + one of 3 actions."""
    folder.mkdir(parents=True, exist_ok=True)
    video = np.broadcast_to((8 + MP4_LEVEL * np.arange(frames, dtype=np.uint8))[:, None, None, None],
                            (frames, SIZE, SIZE, 3)).copy()
    write_mp4(folder / f"{name}.mp4", video)
    actions = np.concatenate([[0], 1 + np.random.default_rng(seed).integers(0, 3, frames - 1)]).astype(np.int32)
    np.savez_compressed(folder / f"{name}.npz", actions=actions)
    return actions


def raw_indices(frames, level=1, offset=0):
    """The raw frame index written into the red channel of each uint8 frame [T x H x W x 3]."""
    return [int(round((float(f[..., 0].mean()) - offset) / level)) for f in frames]


# ---------------------------------------------------------------------------
# DMLab
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("frame_skip", [1, 2, 3])
def test_dmlab_frames_and_actions_aligned(tmp_path, frame_skip):
    stored = make_dmlab(tmp_path, {"train": 3, "test": 1}, length=20)
    train = get_dataset("dmlab", T=4, image_size=SIZE, data_root=tmp_path, frame_skip=frame_skip)
    assert (train.action_dim, train.num_actions, len(train)) == (3, 3, 3)
    episode = stored[("train", train.paths[1].relative_to(tmp_path / "dmlab" / "data" / "train").as_posix())]
    starts = set()
    for seed in range(200):
        frames, actions = train.frames_and_actions(1, np.random.default_rng(seed))
        raw = raw_indices(frames)
        assert raw == [raw[0] + frame_skip * j for j in range(4)]  # every k-th frame
        assert actions.dtype == np.float32 and actions.shape == (4, 3)
        np.testing.assert_array_equal(actions, np.eye(3)[episode[raw]])  # the action of each kept frame
        starts.add(raw[0])
    assert starts == set(range(20 - 4 * frame_skip + 1))  # DF: any start with room for T * k frames
    # The test split: the first T * k frames, every time.
    test = get_dataset("dmlab", split="test", T=4, image_size=SIZE, data_root=tmp_path, frame_skip=frame_skip)
    frames, actions = test.frames_and_actions(0)
    assert raw_indices(frames) == [0, frame_skip, 2 * frame_skip, 3 * frame_skip]


def test_dmlab_video_and_actions_match_video(tmp_path):
    make_dmlab(tmp_path, {"train": 2, "test": 1})
    dataset = get_dataset("dmlab", T=5, image_size=8, data_root=tmp_path, frame_skip=2)
    video, actions = dataset.video_and_actions(1, np.random.default_rng(3))
    torch.testing.assert_close(video, dataset.video(1, np.random.default_rng(3)))
    assert video.shape == (5, 3, 8, 8) and actions.shape == (5, 3) and actions.dtype == torch.float32
    videos, batch_actions = next(train_batches(dataset, batch_size=4, seed=0, with_actions=True))
    torch.testing.assert_close(videos, next(train_batches(dataset, batch_size=4, seed=0)))
    assert batch_actions.shape == (4, 5, 3)
    torch.testing.assert_close(batch_actions.sum(-1), torch.ones(4, 5))


def test_dmlab_sharded_across_ranks(tmp_path):
    stored = make_dmlab(tmp_path, {"train": 6, "test": 1})
    dataset = get_dataset("dmlab", T=2, image_size=SIZE, data_root=tmp_path)
    # Natural path order: 0/0, 0/2, 0/4, 1/1, 1/3, 1/5.
    order = [int(p.stem) for p in dataset.paths]
    assert order == [0, 2, 4, 1, 3, 5]
    for rank in range(2):
        batches = train_batches(dataset, batch_size=3, seed=0, rank=rank, world_size=2, with_actions=True)
        for _ in range(2):
            videos, actions = next(batches)
            for video, clip_actions in zip(videos, actions):
                frames = ((video.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                episode, raw = int(frames[0, 0, 0, 1]), raw_indices(frames)
                assert episode in order[rank::2]  # this rank's shard only
                expected = stored[("train", f"{episode % 2}/{episode}.npz")][raw]
                np.testing.assert_array_equal(clip_actions.numpy(), np.eye(3)[expected])


@pytest.mark.parametrize("names", [("train", "test"), ("training", "validation")], ids=["teco", "df"])
def test_split_folders(tmp_path, names):
    """TECO's tar has train/ and test/; DF renames them training/ and validation/ (its test split)."""
    make_dmlab(tmp_path, {"train": 3, "test": 2}, split_names=names)
    assert len(get_dataset("dmlab", T=2, data_root=tmp_path)) == 3
    assert len(get_dataset("dmlab", split="test", T=2, data_root=tmp_path)) == 2


def test_defaults_and_frame_skip_option(tmp_path):
    assert (default_T("dmlab"), default_T("dmlab", frame_skip=2)) == (300, 150)
    assert default_T("minecraft", frame_skip=2) == 150
    make_dmlab(tmp_path, {"train": 1, "test": 1}, length=21)
    assert get_dataset("dmlab", data_root=tmp_path, frame_skip=2).image_size == 64
    with pytest.raises(DatasetError, match="frame_skip 2 is not supported for dataset 'minerl', only for dmlab, minecraft"):
        get_dataset("minerl", frame_skip=2)
    with pytest.raises(DatasetError, match="positive integer"):
        get_dataset("dmlab", frame_skip=0, data_root=tmp_path)


def test_lengths_for_evaluation(tmp_path):
    """lengths[i]: frames episode i gives at this frame_skip (ground_truth.py reads whole test videos through it)."""
    make_dmlab(tmp_path, {"train": 1, "test": 2}, length=21)
    test = get_dataset("dmlab", split="test", T=3, data_root=tmp_path, frame_skip=2)
    assert len(test.lengths) == 2 and test.lengths[1] == 10


def one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_dmlab_errors(tmp_path):
    with pytest.raises(DatasetError, match="bash datasets/dmlab/download.sh") as error:
        get_dataset("dmlab", data_root=tmp_path)
    one_sentence(error)
    make_dmlab(tmp_path, {"train": 2, "test": 1}, length=10)
    (tmp_path / "dmlab" / "data" / "test" / "0" / "0.npz").unlink()
    with pytest.raises(DatasetError, match="no test episodes"):
        get_dataset("dmlab", split="test", data_root=tmp_path)
    bad = tmp_path / "dmlab" / "data" / "train" / "1" / "1.npz"
    video, actions = dmlab_episode(10, 0)
    np.savez(bad, video=video, actions=actions[:9])  # one action short
    dataset = get_dataset("dmlab", T=4, data_root=tmp_path)
    with pytest.raises(DatasetError, match="has 10 frames but 9 actions") as error:
        dataset.video_and_actions(1)
    assert str(bad) in one_sentence(error)
    np.savez(bad, video=video, actions=actions + 1)  # DF's np.eye(3) has no action 3
    with pytest.raises(DatasetError, match=r"must lie in \[0, 3\), but it holds action 3") as error:
        dataset.video(1)
    assert str(bad) in one_sentence(error)
    np.savez(bad, video=video)
    with pytest.raises(DatasetError, match="no 'actions' array"):
        dataset.video(1)
    with pytest.raises(DatasetError, match="fewer than the 12 that T=4 at frame_skip 3 spans"):
        get_dataset("dmlab", T=4, data_root=tmp_path, frame_skip=3).video(0)


# ---------------------------------------------------------------------------
# Minecraft: <i>.mp4 + <i>.npz
# ---------------------------------------------------------------------------


def make_minecraft(root, frames=13):
    stored = {}
    for split, count in (("train", 2), ("test", 1)):
        for i in range(count):
            name = f"{i:06d}"
            stored[(split, i)] = minecraft_episode(root / "minecraft" / "data" / split / "0", name, frames, seed=i)
    return stored


@pytest.mark.parametrize("frame_skip", [1, 2])
def test_minecraft_frames_and_actions_aligned(tmp_path, frame_skip):
    stored = make_minecraft(tmp_path, frames=13)
    train = get_dataset("minecraft", T=3, image_size=SIZE, data_root=tmp_path, frame_skip=frame_skip)
    assert (train.action_dim, train.num_actions, len(train)) == (4, 4, 2)
    starts = set()
    for seed in range(30):
        frames, actions = train.frames_and_actions(1, np.random.default_rng(seed))
        raw = raw_indices(frames, level=MP4_LEVEL, offset=8)
        assert raw == [raw[0] + frame_skip * j for j in range(3)]
        # DF: actions[1:], so frame t comes with stored action t + 1, the one taken at frame t.
        np.testing.assert_array_equal(actions, np.eye(4)[stored[("train", 1)][[r + 1 for r in raw]]])
        starts.add(raw[0])
    assert len(starts) > 1 and starts <= set(range(12 - 3 * frame_skip + 1))  # 12 frames have an action after them
    assert train.lengths[0] == 12 // frame_skip
    test = get_dataset("minecraft", split="test", T=3, image_size=SIZE, data_root=tmp_path, frame_skip=frame_skip)
    assert raw_indices(test.frames_and_actions(0)[0], level=MP4_LEVEL, offset=8) == [0, frame_skip, 2 * frame_skip]


def test_minecraft_errors(tmp_path):
    make_minecraft(tmp_path, frames=8)
    folder = tmp_path / "minecraft" / "data" / "train" / "0"
    np.savez_compressed(folder / "000001.npz", actions=np.zeros(12, np.int32))  # more actions than frames
    dataset = get_dataset("minecraft", T=11, image_size=SIZE, data_root=tmp_path)
    with pytest.raises(DatasetError, match="ended after 8 frames, but its actions file 000001.npz has actions for 11") as error:
        dataset.video(1)
    one_sentence(error)
    (folder / "000001.mp4").unlink()
    with pytest.raises(DatasetError, match="has no video 000001.mp4 beside it") as error:
        dataset.video(1)
    one_sentence(error)


def test_minecraft_data_root_copies_both_files(tmp_path, monkeypatch):
    make_minecraft(tmp_path / "src", frames=6)
    cache = tmp_path / "fast"
    monkeypatch.setenv("DATA_ROOT", str(cache))
    dataset = get_dataset("minecraft", split="test", T=4, image_size=SIZE, data_root=tmp_path / "src")
    video, actions = dataset.video_and_actions(0)
    assert sorted(p.name for p in cache.rglob("000000.*")) == ["000000.mp4", "000000.npz"]
    monkeypatch.delenv("DATA_ROOT")
    expected = get_dataset("minecraft", split="test", T=4, image_size=SIZE, data_root=tmp_path / "src").video_and_actions(0)
    torch.testing.assert_close(video, expected[0])
    torch.testing.assert_close(actions, expected[1])


# ---------------------------------------------------------------------------
# Download scripts, fed local parts laid out like the Internet Archive items
# ---------------------------------------------------------------------------


def release_parts(tmp_path, name, item_prefix, file_prefix, parts, members):
    """One tar of `members` ({path in tar: bytes}) split into len(parts) files at <ia>/<item><part>/<file><part>."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buffer.getvalue()
    ia = tmp_path / "ia"
    cuts = np.linspace(0, len(blob), len(parts) + 1).astype(int)
    for part, a, b in zip(parts, cuts[:-1], cuts[1:]):
        (ia / f"{item_prefix}{part}").mkdir(parents=True)
        (ia / f"{item_prefix}{part}" / f"{file_prefix}{part}").write_bytes(blob[a:b])
    return ia


def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def run_script(script, env_extra):
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True, timeout=120)


def test_dmlab_download_script_with_local_parts(tmp_path):
    members = {}
    for split, count in (("train", 3), ("test", 1)):
        for i in range(count):
            video, actions = dmlab_episode(6, i)
            members[f"dmlab/{split}/{i % 2}/{i}.npz"] = npz_bytes(video=video, actions=actions)
    ia = release_parts(tmp_path, "dmlab", "dmlab_dataset_", "dmlab.tar.part", ["aa", "ab", "ac"], members)
    data = tmp_path / "data"
    env = {"DMLAB_URL_BASE": f"file://{ia}", "DATASETS_DIR": str(data)}
    for _ in range(2):  # the second run finds everything done
        result = run_script("datasets/dmlab/download.sh", env)
        assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert not (data / "dmlab-download").exists()  # parts removed by default
    assert (data / "dmlab" / "data" / "train" / "1" / "1.npz").is_file()
    train = get_dataset("dmlab", T=3, image_size=SIZE, data_root=data, frame_skip=2)
    assert len(train) == 3 and train.video_and_actions(0)[1].shape == (3, 3)
    assert len(get_dataset("dmlab", split="test", T=6, image_size=SIZE, data_root=data)) == 1


def test_minecraft_download_script_with_local_parts(tmp_path):
    source = tmp_path / "episodes"
    minecraft_episode(source, "000000", 5, seed=0)
    members = {}
    for split in ("train", "test"):
        for suffix in (".mp4", ".npz"):
            members[f"minecraft/{split}/0/000000{suffix}"] = (source / f"000000{suffix}").read_bytes()
    parts = "aa ab ac ad ae af ag ah ai aj ak".split()
    ia = release_parts(tmp_path, "minecraft", "minecraft_marsh_dataset_", "minecraft.tar.part", parts, members)
    data = tmp_path / "data"
    result = run_script("datasets/minecraft/download.sh", {"MINECRAFT_URL_BASE": f"file://{ia}", "DATASETS_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    assert "11 parts" in result.stdout
    test = get_dataset("minecraft", split="test", T=2, image_size=SIZE, data_root=data, frame_skip=2)
    assert test.video_and_actions(0)[1].shape == (2, 4)


def test_download_script_names_a_missing_part(tmp_path):
    ia = release_parts(tmp_path, "dmlab", "dmlab_dataset_", "dmlab.tar.part", ["aa", "ab"], {"dmlab/train/0.npz": b"x"})
    result = run_script("datasets/dmlab/download.sh", {"DMLAB_URL_BASE": f"file://{ia}", "DATASETS_DIR": str(tmp_path / "d")})
    assert result.returncode != 0
    assert "dmlab_dataset_ac/dmlab.tar.partac" in result.stderr


@pytest.mark.parametrize("script", ["datasets/dmlab/download.sh", "datasets/common.sh",
                                    "datasets/minecraft/download.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_download_script_resumes(tmp_path):
    """A half-downloaded part resumes, and a re-run after an interruption between the two moves finishes."""
    members = {f"dmlab/{split}/0/0.npz": npz_bytes(video=dmlab_episode(4, 0)[0], actions=dmlab_episode(4, 0)[1])
               for split in ("train", "test")}
    ia = release_parts(tmp_path, "dmlab", "dmlab_dataset_", "dmlab.tar.part", ["aa", "ab", "ac"], members)
    data = tmp_path / "data"
    work = data / "dmlab-download"
    work.mkdir(parents=True)
    part_ab = (ia / "dmlab_dataset_ab" / "dmlab.tar.partab").read_bytes()
    (work / "dmlab.tar.partab.part").write_bytes(part_ab[: len(part_ab) // 2])
    env = {"DMLAB_URL_BASE": f"file://{ia}", "DATASETS_DIR": str(data), "KEEP_SOURCES": "1"}
    assert run_script("datasets/dmlab/download.sh", env).returncode == 0
    assert (work / "dmlab.tar.partab").read_bytes() == part_ab
    out = data / "dmlab" / "data"
    (out / ".complete").unlink()
    (out / "test").rename(work / "extracted" / "dmlab" / "test")  # as if stopped between the two moves
    result = run_script("datasets/dmlab/download.sh", env)
    assert result.returncode == 0, result.stderr
    assert (out / "test" / "0" / "0.npz").is_file() and (out / ".complete").is_file()


@pytest.mark.parametrize("frame_skip", [1, 2])
def test_ground_truth_reads_the_runs_frame_skip(tmp_path, frame_skip):
    """Evaluation compares samples with the frames the model saw: every frame_skip-th, actions alike."""
    stored = make_dmlab(tmp_path, {"train": 1, "test": 2}, length=21)
    config = {"dataset": "dmlab", "image_size": SIZE, "n_obs": 2, "frame_skip": frame_skip}
    truth = GroundTruth(config, data_root=tmp_path)
    video = truth.video(1, 100)  # the whole episode
    assert len(video) == 21 // frame_skip
    assert video[:, 0, 0, 0].tolist() == list(range(0, frame_skip * len(video), frame_skip))
    actions = truth.actions(1, 5)
    assert np.array_equal(actions.argmax(axis=1), stored[("test", "1/1.npz")][:5 * frame_skip:frame_skip])
