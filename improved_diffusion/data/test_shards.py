"""Shard caches (shard_writer.py writes, shard_cache.py reads): bit-exact round trips against decoding, resuming, corruption, MPI ranks."""

import json
import threading

import numpy as np
import pytest
import torch

from improved_diffusion.data import shard_writer
from improved_diffusion.data.batches import train_batches
from improved_diffusion.data.datasets import default_image_size, default_T, get_dataset
from improved_diffusion.data.pixels import to_uint8
from improved_diffusion.data.sources import DatasetWarning
from improved_diffusion.data.test_datasets import write_mp4
from improved_diffusion.data.test_episodes import make_dmlab
from improved_diffusion.data.video_reader import to_model_range
from improved_diffusion.errors import DatasetError

SEEDS = range(5)  # generators per video: several windows each


def assert_same_clips(source, cache, seeds=SEEDS):
    """Every video of `cache` gives exactly the frames (and actions) of `source` for the same generator."""
    assert len(cache) == len(source) and (cache.T, cache.image_size) == (source.T, source.image_size)
    assert cache.action_dim == source.action_dim and cache.num_actions == source.num_actions
    for i in range(len(source)):
        for seed in seeds:
            rng_a, rng_b, rng_c = (np.random.default_rng(seed) for _ in range(3))
            frames_a, actions_a = source.frames_and_actions(i, rng_a)
            frames_b, actions_b = cache.frames_and_actions(i, rng_b)
            assert frames_b.dtype == np.uint8 and np.array_equal(frames_a, frames_b)
            assert np.array_equal(cache.frames(i, rng_c), frames_b)  # frames alone: the same window
            if actions_a is None:
                assert actions_b is None
            else:
                assert actions_b.dtype == actions_a.dtype and np.array_equal(actions_a, actions_b)
            assert rng_a.integers(1 << 30) == rng_b.integers(1 << 30) == rng_c.integers(1 << 30)  # drawn as much
        assert torch.equal(source.video(i), cache.video(i))  # without a generator: the first T frames


def snapshot(folder):
    """Every file below `folder` and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_mp4_folder(folder, with_actions):
    """train/ and test/ mp4 files of 16 x 16 pixels and 6..9 frames (+ integer actions files)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("test", 2)):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            length = 6 + (i % 4)
            frames = np.repeat(rng.integers(0, 256, (length, 4, 4, 3), dtype=np.uint8), 4, axis=1).repeat(4, axis=2)
            write_mp4(folder / split / f"{i}.mp4", frames)
            if with_actions:
                np.save(folder / split / f"{i}.actions.npy", rng.integers(0, 3, length))
    return folder


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_actions", [False, True], ids=["frames", "actions"])
def test_mp4_folder_round_trip_is_bit_exact(tmp_path, with_actions):
    folder = make_mp4_folder(tmp_path / "videos", with_actions)
    summary = shard_writer.write_cache(folder, tmp_path / "cache", T=4, image_size=16, shard_size=2)
    assert summary["train"] == {"videos": 5, "frames": 6 + 7 + 8 + 9 + 6, "written": 3, "kept": 0}
    for split in ("train", "test"):
        source = get_dataset(str(folder), split=split, T=4, image_size=16)
        cache = get_dataset(str(tmp_path / "cache"), split=split)
        assert cache.lengths == source.lengths  # whole videos, not one window
        assert_same_clips(source, cache, seeds=range(3))  # each read decodes an mp4: few windows
    source, cache = get_dataset(str(folder), T=4, image_size=16), get_dataset(str(tmp_path / "cache"))
    for a, b in zip(train_batches(source, 3, seed=1, with_actions=True), train_batches(cache, 3, seed=1, with_actions=True)):
        assert torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None)
        assert a[1] is None or torch.equal(a[1], b[1])
        break


@pytest.mark.parametrize("name", ["bouncing_balls", "bouncing_balls_actions", "cue_recall"])
def test_procedural_round_trip_is_bit_exact(tmp_path, name):
    size = 8 if name != "cue_recall" else default_image_size(name)
    shard_writer.write_cache(name, tmp_path / "cache", T=5, image_size=size, shard_size=3, max_videos=4)
    for split in ("train", "test"):
        source = get_dataset(name, split=split, T=5, image_size=size)
        source.num_videos = 4  # the cache holds the first 4
        cache = get_dataset(str(tmp_path / "cache"), split=split)
        assert cache.lengths == [source.full_length] * 4
        assert_same_clips(source, cache)
    source.num_videos = 4
    cache = get_dataset(str(tmp_path / "cache"), split="test")
    for step, (a, b) in enumerate(zip(train_batches(source, 3, seed=2, with_actions=True),
                                      train_batches(cache, 3, seed=2, with_actions=True, num_workers=2))):
        assert torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))
        if step == 2:
            break


@pytest.mark.parametrize("frame_skip", [1, 2, 3])
def test_episode_cache_keeps_raw_frames_for_any_frame_skip(tmp_path, frame_skip):
    make_dmlab(tmp_path / "data", {"train": 3, "test": 1}, length=20)
    shard_writer.write_cache("dmlab", tmp_path / "cache", T=4, image_size=16, frame_skip=2, data_root=tmp_path / "data")
    cache_dir = str(tmp_path / "cache")
    assert default_T(cache_dir, 2) == 4 and default_T(cache_dir, 1) == 8 and default_image_size(cache_dir) == 16
    source = get_dataset("dmlab", T=4, image_size=16, data_root=tmp_path / "data", frame_skip=frame_skip)
    cache = get_dataset(cache_dir, T=4, frame_skip=frame_skip)
    assert cache.lengths == [20 // frame_skip] * 3
    assert_same_clips(source, cache)


def test_resized_frames_are_the_decoded_ones_rounded(tmp_path):
    """Stored at another size, a clip is the source's, resized as training resizes it and rounded to uint8."""
    (tmp_path / "videos").mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        np.save(tmp_path / "videos" / f"{i}.npy", rng.integers(0, 256, (7 + i, 12, 20, 3), dtype=np.uint8))
    shard_writer.write_cache(tmp_path / "videos", tmp_path / "cache", splits=("train",), T=5, image_size=8)
    source = get_dataset(str(tmp_path / "videos"), T=5, image_size=8)
    cache = get_dataset(str(tmp_path / "cache"))
    for i in range(len(source)):
        for seed in SEEDS:
            decoded = source.frames(i, np.random.default_rng(seed))
            expected = to_uint8(to_model_range(decoded, 8)).permute(0, 2, 3, 1).numpy()
            assert np.array_equal(cache.frames(i, np.random.default_rng(seed)), expected)
            difference = (cache.video(i, np.random.default_rng(seed)) - source.video(i, np.random.default_rng(seed))).abs()
            assert difference.max() <= 1 / 255 + 1e-6  # half a grey level


def test_folder_cache_leaves_out_short_videos_as_the_folder_does(tmp_path):
    (tmp_path / "videos").mkdir()
    for i, length in enumerate([4, 9, 5, 8]):
        np.save(tmp_path / "videos" / f"{i}.npy", np.full((length, 8, 8, 3), i, np.uint8))
    shard_writer.write_cache(tmp_path / "videos", tmp_path / "cache", splits=("train",), image_size=8)
    assert default_T(str(tmp_path / "cache")) == 4
    with pytest.warns(DatasetWarning, match="shorter than T=6"):
        cache = get_dataset(str(tmp_path / "cache"), T=6)
    with pytest.warns(DatasetWarning):
        source = get_dataset(str(tmp_path / "videos"), T=6, image_size=8)
    assert_same_clips(source, cache)


# ---------------------------------------------------------------------------
# Resuming and MPI ranks
# ---------------------------------------------------------------------------


def cache_folder_of_npy(tmp_path, count=5):
    """videos/train/<i>.npy of 6 + i frames (8 x 8 pixels) and one test video."""
    for split in ("train", "test"):
        (tmp_path / "videos" / split).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        np.save(tmp_path / "videos" / "train" / f"{i}.npy", rng.integers(0, 256, (6 + i, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "videos" / "test" / "0.npy", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    return tmp_path / "videos"


def test_rerun_after_interruption_gives_the_same_bytes(tmp_path, monkeypatch):
    videos = cache_folder_of_npy(tmp_path)
    out = tmp_path / "cache"
    options = {"splits": ("train",), "T": 4, "image_size": 8, "shard_size": 2}
    assert shard_writer.write_cache(videos, out, **options)["train"]["written"] == 3
    clean = snapshot(out)
    assert shard_writer.write_cache(videos, out, **options)["train"] == {"videos": 5, "frames": 40, "written": 0, "kept": 3}
    assert snapshot(out) == clean

    (out / "index.json").unlink()  # interrupted before the index was written
    assert shard_writer.write_cache(videos, out, **options)["train"]["written"] == 0
    assert snapshot(out) == clean

    (out / "train" / "shard_00001.npy").unlink()
    (out / "train" / "shard_00002.npy.tmp-999").write_bytes(b"half a shard")  # a killed writer's leftover
    data = bytearray((out / "train" / "shard_00000.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, wrong content: the checksum catches it
    (out / "train" / "shard_00000.npy").write_bytes(bytes(data))
    assert shard_writer.write_cache(videos, out, **options)["train"]["written"] == 2
    assert snapshot(out) == clean

    # Killed while writing the second shard: the index says so until a rerun finishes the job.
    real_write, calls = shard_writer._write_shard, []

    def dies_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args)

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(shard_writer, "_write_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_cache(videos, fresh, **options)
    with pytest.raises(DatasetError, match=r"incomplete.*rerun scripts/cache_dataset.py"):
        get_dataset(str(fresh))
    monkeypatch.setattr(shard_writer, "_write_shard", real_write)
    assert shard_writer.write_cache(videos, fresh, **options)["train"] == {"videos": 5, "frames": 40, "written": 2, "kept": 1}
    assert snapshot(fresh) == clean


def test_ranks_split_the_shards(tmp_path):
    """Two ranks (threads with a real barrier) write alternate shards; the cache is the one-process cache."""
    videos = cache_folder_of_npy(tmp_path)
    options = {"T": 4, "image_size": 8, "shard_size": 1, "splits": ("train",)}
    shard_writer.write_cache(videos, tmp_path / "one", **options)
    barrier, results, errors = threading.Barrier(2, timeout=60), {}, []

    def rank(r):
        try:
            results[r] = shard_writer.write_cache(videos, tmp_path / "two", rank=r, world_size=2, barrier=barrier.wait, **options)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (results[0]["train"]["written"], results[1]["train"]["written"]) == (3, 2)  # shards 0, 2, 4 and 1, 3
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


def test_rerun_with_other_settings_is_refused(tmp_path):
    videos = cache_folder_of_npy(tmp_path, count=3)
    shard_writer.write_cache(videos, tmp_path / "cache", splits=("train",), T=4, image_size=8)
    with pytest.raises(DatasetError, match=r"other settings: T 4 \(now 5\).*another --out"):
        shard_writer.write_cache(videos, tmp_path / "cache", splits=("train",), T=5, image_size=8)
    with pytest.raises(DatasetError, match="already a cache"):
        shard_writer.write_cache(tmp_path / "cache", tmp_path / "again")
    with pytest.raises(DatasetError, match="no test split"):
        get_dataset(str(tmp_path / "cache"), split="test")
    with pytest.raises(DatasetError, match="frame_skip 2 is not supported"):
        get_dataset(str(tmp_path / "cache"), frame_skip=2)


# ---------------------------------------------------------------------------
# Corruption: one sentence naming the file
# ---------------------------------------------------------------------------


def one_sentence_naming(error, path):
    message = str(error.value)
    assert str(path) in message and "\n" not in message and message.endswith(".")
    return message


@pytest.mark.parametrize("damage,problem", [
    ("truncate", "is truncated"),
    ("garbage", "is unreadable"),
    ("delete", "is missing"),
    ("append", "longer than its header says"),
    ("actions", "is truncated"),
])
def test_corrupt_shard_is_named(tmp_path, damage, problem):
    shard_writer.write_cache("bouncing_balls_actions", tmp_path / "cache", splits=("train",), T=4, image_size=8,
                       shard_size=2, max_videos=4)
    path = tmp_path / "cache" / "train" / ("shard_00001.actions.npy" if damage == "actions" else "shard_00001.npy")
    data = path.read_bytes()
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes({"truncate": data[:-100], "garbage": b"not a numpy file", "append": data + b"x",
                          "actions": data[:-4]}[damage])
    with pytest.raises(DatasetError, match=problem) as error:
        get_dataset(str(tmp_path / "cache"))
    one_sentence_naming(error, path)
    # The fix the message names: a rerun rewrites that shard.
    summary = shard_writer.write_cache("bouncing_balls_actions", tmp_path / "cache", splits=("train",), T=4, image_size=8,
                                 shard_size=2, max_videos=4)
    assert (summary["train"]["written"], summary["train"]["kept"]) == (1, 1)
    assert len(get_dataset(str(tmp_path / "cache"))) == 4


def test_index_that_disagrees_with_its_shards_is_named(tmp_path):
    shard_writer.write_cache(cache_folder_of_npy(tmp_path, count=3), tmp_path / "cache", splits=("train",), T=4, image_size=8)
    index_path = tmp_path / "cache" / "index.json"
    good = index_path.read_text()

    index = json.loads(good)
    index["splits"]["train"]["videos"][1]["length"] = 1000
    index_path.write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"places train video 1 at frames 6\.\.1005 of shard_00000.npy, which holds 21") as error:
        get_dataset(str(tmp_path / "cache"))
    one_sentence_naming(error, index_path)

    index = json.loads(good)
    index["splits"]["train"]["shards"][0]["frames"] = 22
    index_path.write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"holds uint8 \[21, 8, 8, 3\] but its index expects uint8 \[22, 8, 8, 3\]") as error:
        get_dataset(str(tmp_path / "cache"))
    one_sentence_naming(error, tmp_path / "cache" / "train" / "shard_00000.npy")

    index_path.write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable") as error:
        get_dataset(str(tmp_path / "cache"))
    one_sentence_naming(error, index_path)


def test_shards_without_an_index_are_not_videos(tmp_path):
    out = tmp_path / "cache"
    shard_writer.write_cache(cache_folder_of_npy(tmp_path, count=2), out, splits=("train",), T=4, image_size=8)
    with pytest.raises(DatasetError, match="holds cache shards but no index.json"):
        get_dataset(str(out / "train"))
    (out / "index.json").unlink()
    with pytest.raises(DatasetError, match="holds cache shards but no index.json"):
        get_dataset(str(out))


def test_a_users_own_index_json_is_not_a_cache(tmp_path):
    videos = cache_folder_of_npy(tmp_path, count=2)
    (videos / "index.json").write_text(json.dumps({"videos": ["0.npy", "1.npy"]}))
    assert len(get_dataset(str(videos), T=4)) == 2
    with pytest.raises(DatasetError, match="not a cache's"):
        shard_writer.write_cache(tmp_path / "videos", videos, T=4)
