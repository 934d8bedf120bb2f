import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.data import datasets as video_datasets
from improved_diffusion.data.batches import train_batches
from improved_diffusion.data.datasets import default_image_size, default_T, get_dataset, test_video
from improved_diffusion.data.sources import DatasetWarning
from improved_diffusion.data.splits import scan_lengths, write_carla_split
from improved_diffusion.errors import DatasetError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "datasets"))
import convert_mp4  # noqa: E402


# ---------------------------------------------------------------------------
# Helpers: tiny files in the exact on-disk layouts
# ---------------------------------------------------------------------------


def numbered_video(i, T=6, size=8):
    """uint8 [T x H x W x 3] whose pixels all equal i (so a batch tells which video it came from)."""
    video = np.full((T, size, size, 3), i, dtype=np.uint8)
    video[:, 0, 0, 0] = np.arange(T)  # frame number, to tell windows apart
    return video


def video_ids(batch):
    """Recover the numbered_video ids from a [B x T x C x H x W] batch in [-1, 1]."""
    return [int(round((float(v[0, 1, 1, 1]) + 1) * 127.5)) for v in batch]


def make_npy_dataset(root, dirname, counts, T=6, size=8):
    """<root>/<dirname>/{train,test}/<i>.npy, as datasets/*/download.sh writes them."""
    for split, count in counts.items():
        folder = root / dirname / split
        folder.mkdir(parents=True)
        for i in range(count):
            offset = 0 if split == "train" else 100
            np.save(folder / f"{i}.npy", numbered_video(offset + i, T, size))
    return root


def make_carla(root, count, T=6, size=8, num_test=2):
    """<root>/carla/no-traffic/video_<i>.pt plus split CSVs in FDM's format (full paths, header row)."""
    folder = root / "carla" / "no-traffic"
    folder.mkdir(parents=True)
    for i in range(count):
        torch.save(torch.from_numpy(numbered_video(i, T, size)), folder / f"video_{i}.pt")
    train, test = list(range(count - num_test)), list(range(count - num_test, count))
    for split, ids, first in (("train", train, 0), ("test", test, len(train))):
        rows = "".join(f"{first + k},datasets/carla/no-traffic/video_{i}.pt\n" for k, i in enumerate(ids))
        (folder / f"video_{split}.csv").write_text(",path\n" + rows)
    return folder


def write_mp4(path, frames, fps=10):
    import imageio_ffmpeg  # optional dependency (ffmpeg): only the tests of mp4 files need it

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, quality=10, macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_gif(path, frames):
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)


def check_video(video, T, size):
    assert video.shape == (T, 3, size, size)
    assert video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


# ---------------------------------------------------------------------------
# Registry and procedural datasets
# ---------------------------------------------------------------------------


def test_defaults_match_fdm():
    assert (default_T("carla_no_traffic"), default_image_size("carla_no_traffic")) == (1000, 128)
    assert (default_T("minerl"), default_image_size("minerl")) == (500, 64)
    assert (default_T("mazes_cwvae"), default_image_size("mazes_cwvae")) == (300, 64)
    assert (default_T("bouncing_balls"), default_image_size("bouncing_balls")) == (100, 32)


def test_bouncing_balls_dataset():
    train = get_dataset("bouncing_balls", T=8)
    test = get_dataset("bouncing_balls", split="test", T=8)
    assert (train.name, train.split, train.T, train.image_size) == ("bouncing_balls", "train", 8, 32)
    assert len(train) == 10_000 and len(test) == 100
    check_video(train.video(3, np.random.default_rng(0)), 8, 32)
    # Test videos are the first T frames, every time.
    torch.testing.assert_close(test.video(5), test.video(5))
    torch.testing.assert_close(test.video(5), test_video("bouncing_balls", 5, T=8))
    # A training window is reproducible from its generator and starts anywhere in the video.
    windows = [train.video(3, np.random.default_rng(s)) for s in range(6)]
    torch.testing.assert_close(windows[0], train.video(3, np.random.default_rng(0)))
    assert any(not torch.equal(windows[0], w) for w in windows[1:])


def test_procedural_seed_changes_videos():
    a = get_dataset("bouncing_balls", split="test", T=4, seed=0).video(0)
    b = get_dataset("bouncing_balls", split="test", T=4, seed=1).video(0)
    assert not torch.equal(a, b)


def test_cue_recall_is_registered():
    dataset = get_dataset("cue_recall", T=8)
    check_video(dataset.video(0, np.random.default_rng(0)), 8, default_image_size("cue_recall"))


def test_missing_procedural_module(monkeypatch):
    spec = video_datasets.DatasetSpec("procedural", module="improved_diffusion.no_such_module")
    monkeypatch.setitem(video_datasets.DATASETS, "broken", spec)
    with pytest.raises(DatasetError, match="no_such_module"):
        get_dataset("broken")


def test_unknown_name_split_and_option(tmp_path):
    with pytest.raises(DatasetError, match="neither a registered name"):
        get_dataset("no_such_dataset")
    with pytest.raises(DatasetError, match="split"):
        get_dataset("bouncing_balls", split="valid")
    with pytest.raises(DatasetError, match="on_bad_video"):
        get_dataset("bouncing_balls", on_bad_video="ignore")


# ---------------------------------------------------------------------------
# MineRL and GQN-Mazes: <name>-torch/{train,test}/<i>.npy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,dirname", [("minerl", "minerl_navigate-torch"), ("mazes_cwvae", "gqn_mazes-torch")])
def test_npy_datasets(tmp_path, name, dirname):
    make_npy_dataset(tmp_path, dirname, {"train": 12, "test": 3}, T=10, size=8)
    train = get_dataset(name, T=4, image_size=8, data_root=tmp_path)
    test = get_dataset(name, split="test", T=4, image_size=8, data_root=tmp_path)
    assert len(train) == 12 and len(test) == 3
    # Natural order: 2.npy is video 2, not 10.npy.
    assert video_ids(train.video(2)[None]) == [2]
    check_video(train.video(0, np.random.default_rng(0)), 4, 8)
    video = test.video(1)
    assert video_ids(video[None]) == [101]
    frame_numbers = [round((float(f[0, 0, 0]) + 1) * 127.5) for f in video]
    assert frame_numbers == [0, 1, 2, 3]  # test split: the first T frames
    torch.testing.assert_close(test.video(1), test.video(1))
    starts = {round((float(train.video(0, np.random.default_rng(s))[0, 0, 0, 0]) + 1) * 127.5) for s in range(20)}
    assert starts == set(range(7))  # any window of the 10 frames


def test_npy_resize_and_full_length(tmp_path):
    make_npy_dataset(tmp_path, "minerl_navigate-torch", {"train": 2, "test": 2}, T=5, size=16)
    dataset = get_dataset("minerl", split="test", T=5, image_size=8, data_root=tmp_path)
    check_video(dataset.video(0), 5, 8)


def test_missing_dataset_names_download_command(tmp_path):
    with pytest.raises(DatasetError, match=r"bash datasets/minerl/download.sh"):
        get_dataset("minerl", data_root=tmp_path)
    with pytest.raises(DatasetError, match=r"bash datasets/carla/download.sh"):
        get_dataset("carla_no_traffic", data_root=tmp_path)
    (tmp_path / "gqn_mazes-torch" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no train videos.*bash datasets/gqn_mazes/download.sh"):
        get_dataset("mazes_cwvae", data_root=tmp_path)
    with pytest.raises(DatasetError, match=r"no test split"):
        get_dataset("mazes_cwvae", split="test", data_root=tmp_path)


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"this is not a numpy file", "Could not read"),
        (np.zeros((6, 8, 8, 3), np.float32), "expected a uint8 video"),
        (np.zeros((6, 8, 8, 5), np.uint8), "expected a uint8 video"),
        (np.zeros((2, 8, 8, 3), np.uint8), "fewer than T=6"),
    ],
    ids=["corrupt", "dtype", "shape", "short"],
)
def test_bad_npy_files(tmp_path, content, problem):
    make_npy_dataset(tmp_path, "minerl_navigate-torch", {"train": 4, "test": 1})
    bad = tmp_path / "minerl_navigate-torch" / "train" / "2.npy"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        np.save(bad, content)
    dataset = get_dataset("minerl", T=6, data_root=tmp_path)
    with pytest.raises(DatasetError, match=problem) as info:
        dataset.video(2)
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)

    # Skip mode: the bad file is replaced by a good video, with a warning, never garbage.
    skipping = get_dataset("minerl", T=6, data_root=tmp_path, on_bad_video="skip")
    with pytest.warns(DatasetWarning, match="2.npy"):
        batches = [next(train_batches(skipping, batch_size=4, seed=s)) for s in range(3)]
    for batch in batches:
        assert set(video_ids(batch)) <= {0, 1, 3}


def test_truncated_npy(tmp_path):
    make_npy_dataset(tmp_path, "minerl_navigate-torch", {"train": 2, "test": 1})
    path = tmp_path / "minerl_navigate-torch" / "train" / "1.npy"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DatasetError, match="1.npy"):
        get_dataset("minerl", T=6, data_root=tmp_path).video(1)


# ---------------------------------------------------------------------------
# CARLA: carla/no-traffic/video_<i>.pt + video_{train,test}.csv
# ---------------------------------------------------------------------------


def test_carla(tmp_path):
    make_carla(tmp_path, count=6, T=7, size=16)
    train = get_dataset("carla_no_traffic", T=5, image_size=8, data_root=tmp_path)
    test = get_dataset("carla_no_traffic", split="test", T=5, image_size=8, data_root=tmp_path)
    assert len(train) == 4 and len(test) == 2
    assert video_ids(test.video(0)[None]) == [4]
    check_video(train.video(1, np.random.default_rng(0)), 5, 8)
    torch.testing.assert_close(test.video(1), test.video(1))
    assert default_T("carla_no_traffic") == 1000


def test_carla_split_rule(tmp_path):
    folder = tmp_path / "carla" / "no-traffic"
    folder.mkdir(parents=True)
    for i in range(103):
        torch.save(torch.zeros(3, 4, 4, 3, dtype=torch.uint8), folder / f"video_{i}.pt")
    # Without split files the loader applies FDM's rule itself: the last 100 are the test set.
    assert len(get_dataset("carla_no_traffic", T=3, data_root=tmp_path)) == 3
    train, test = write_carla_split(folder)
    assert train == ["video_0.pt", "video_1.pt", "video_2.pt"]
    assert test[0] == "video_3.pt" and test[-1] == "video_102.pt" and len(test) == 100
    lines = (folder / "video_test.csv").read_text().splitlines()
    assert lines[0] == ",path" and lines[1] == "3,no-traffic/video_3.pt"
    assert len(get_dataset("carla_no_traffic", split="test", T=3, data_root=tmp_path)) == 100


def test_carla_bad_files(tmp_path):
    folder = make_carla(tmp_path, count=4, T=6)
    (folder / "video_1.pt").unlink()
    with pytest.raises(DatasetError, match="video_1.pt"):
        get_dataset("carla_no_traffic", T=6, data_root=tmp_path)
    with pytest.warns(DatasetWarning):
        assert len(get_dataset("carla_no_traffic", T=6, data_root=tmp_path, on_bad_video="skip")) == 1
    torch.save({"video": torch.zeros(6, 8, 8, 3, dtype=torch.uint8)}, folder / "video_1.pt")
    with pytest.raises(DatasetError, match=r"video_1.pt.*dict"):
        get_dataset("carla_no_traffic", T=6, data_root=tmp_path).video(1)
    torch.save(torch.zeros(6, 8, 8, 3), folder / "video_1.pt")
    with pytest.raises(DatasetError, match=r"video_1.pt.*uint8"):
        get_dataset("carla_no_traffic", T=6, data_root=tmp_path).video(1)


# ---------------------------------------------------------------------------
# User folders
# ---------------------------------------------------------------------------


def make_user_folder(folder):
    """One video of every supported format, in nested folders, with different sizes."""
    (folder / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_mp4(folder / "clip.mp4", np.full((9, 16, 24, 3), 200, np.uint8))
    write_gif(folder / "a" / "anim.gif", rng.integers(0, 255, (7, 10, 12, 3), dtype=np.uint8))
    np.save(folder / "a" / "b" / "array.npy", numbered_video(50, T=8, size=12))
    torch.save(torch.from_numpy(numbered_video(60, T=8, size=12)), folder / "a" / "tensor.pt")
    np.save(folder / "short.npy", numbered_video(70, T=2, size=12))
    (folder / "notes.txt").write_text("not a video")
    return folder


def test_user_folder_all_formats(tmp_path):
    folder = make_user_folder(tmp_path / "videos")
    assert default_T(str(folder)) == 2  # the shortest video
    with pytest.warns(DatasetWarning, match="1 shorter than T=6"):
        train = get_dataset(str(folder), split="train", T=6, image_size=8)
        test = get_dataset(str(folder), split="test", T=6, image_size=8)
    assert len(train) + len(test) == 4
    assert len(test) >= 1
    for dataset in (train, test):
        for i in range(len(dataset)):
            check_video(dataset.video(i), 6, 8)
            check_video(dataset.video(i, np.random.default_rng(i)), 6, 8)
    mp4 = [i for d in (train, test) for i, p in enumerate(d.paths) if p.suffix == ".mp4"]
    assert mp4  # decoded through ffmpeg
    owner = train if any(p.suffix == ".mp4" for p in train.paths) else test
    clip = owner.video([p.suffix for p in owner.paths].index(".mp4"))
    assert abs(float(clip.mean()) - (200 / 127.5 - 1)) < 0.05  # lossy codec, close to the stored value


def test_user_folder_split_is_deterministic_and_disjoint(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        np.save(folder / f"v{i}.npy", numbered_video(i, T=3, size=4))
    train = get_dataset(str(folder), T=3, image_size=4)
    test = get_dataset(str(folder), split="test", T=3, image_size=4)
    assert not set(train.paths) & set(test.paths)
    assert len(train) + len(test) == 40 and 1 <= len(test) <= 12
    assert test.paths == get_dataset(str(folder), split="test", T=3, image_size=4).paths


def test_user_folder_train_test_subfolders(tmp_path):
    folder = tmp_path / "split"
    for split, count in (("train", 3), ("test", 2)):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            np.save(folder / split / f"{i}.npy", numbered_video(i, T=4, size=6))
    assert len(get_dataset(str(folder), T=4, image_size=6)) == 3
    assert len(get_dataset(str(folder), split="test", T=4, image_size=6)) == 2


def test_user_folder_crops_centre(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    video = np.zeros((3, 8, 16, 3), np.uint8)
    video[:, :, 4:12] = 255  # bright centre, dark sides
    for name in ("a.npy", "b.npy"):
        np.save(folder / name, video)
    dataset = get_dataset(str(folder), T=3, image_size=8)
    torch.testing.assert_close(dataset.video(0), torch.ones(3, 3, 8, 8))


def test_user_folder_bad_data(tmp_path):
    with pytest.raises(DatasetError, match="videos .* found in folder"):
        (tmp_path / "empty").mkdir()
        get_dataset(str(tmp_path / "empty"))
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", numbered_video(i, T=4, size=6))
    (folder / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="broken.mp4"):
        get_dataset(str(folder), T=4, image_size=6)
    with pytest.warns(DatasetWarning, match="1 unreadable"):
        train = get_dataset(str(folder), T=4, image_size=6, on_bad_video="skip")
        test = get_dataset(str(folder), split="test", T=4, image_size=6, on_bad_video="skip")
    assert len(train) + len(test) == 3


def test_folder_of_unreadable_files_is_one_sentence(tmp_path):
    folder = tmp_path / "unreadable"
    folder.mkdir()
    (folder / "a.npy").write_bytes(b"not an array")
    (folder / "b.gif").write_bytes(b"GIF89a broken")
    for T in (None, 4):
        with pytest.raises(DatasetError) as error:
            get_dataset(str(folder), T=T, image_size=8)
        message = str(error.value)
        assert str(folder) in message and "\n" not in message and message.endswith(".")
    with pytest.raises(DatasetError, match="nor an existing folder"):
        get_dataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        get_dataset(str(folder / "a.npy"))


def test_data_root_copies_on_first_access(tmp_path, monkeypatch):
    make_npy_dataset(tmp_path / "src", "minerl_navigate-torch", {"train": 2, "test": 1})
    cache = tmp_path / "fast"
    monkeypatch.setenv("DATA_ROOT", str(cache))
    dataset = get_dataset("minerl", T=6, data_root=tmp_path / "src")
    assert not cache.exists() or not list(cache.rglob("*.npy"))
    first = dataset.video(1)
    copies = list(cache.rglob("*.npy"))
    assert [p.name for p in copies] == ["1.npy"]
    assert not list(cache.rglob("*.part"))
    np.testing.assert_array_equal(np.load(copies[0]), np.load(tmp_path / "src" / "minerl_navigate-torch" / "train" / "1.npy"))
    torch.testing.assert_close(dataset.video(1), first)


# ---------------------------------------------------------------------------
# Converters and download scripts
# ---------------------------------------------------------------------------


def test_convert_mp4_natural_order_and_resume(tmp_path):
    src, dst = tmp_path / "mp4", tmp_path / "npy"
    src.mkdir()
    for name, value in (("0.mp4", 10), ("10.mp4", 100), ("2.mp4", 20), ("1.mp4", 250)):
        write_mp4(src / name, np.full((5, 8, 8, 3), value, np.uint8))
    assert convert_mp4.convert_folder(src, dst, quiet=True) == 4
    means = [np.load(dst / f"{i}.npy").mean() for i in range(4)]
    assert np.allclose(means, [10, 250, 20, 100], atol=6)  # 0, 1, 2, 10
    assert np.load(dst / "0.npy").shape == (5, 8, 8, 3) and np.load(dst / "0.npy").dtype == np.uint8
    assert (dst / "sources.txt").read_text().splitlines()[3] == "3 10.mp4"
    (dst / "1.npy").unlink()
    assert convert_mp4.convert_folder(src, dst, quiet=True) == 1  # only the missing one
    assert not list(dst.glob("*.part"))
    write_mp4(src / "3.mp4", np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="different set of videos"):
        convert_mp4.convert_folder(src, dst, quiet=True)


def test_convert_mp4_corrupt_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "0.mp4").write_bytes(b"not a video")
    with pytest.raises(SystemExit, match="0.mp4"):
        convert_mp4.convert_folder(tmp_path / "src", tmp_path / "dst", quiet=True)


def run_script(script, env_extra, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "script,name,url_var,top,out",
    [
        ("datasets/minerl/download.sh", "minerl", "MINERL_URL", "minerl_navigate", "minerl_navigate-torch"),
        ("datasets/gqn_mazes/download.sh", "mazes_cwvae", "GQN_MAZES_URL", "", "gqn_mazes-torch"),
    ],
)
def test_mp4_download_scripts_with_local_archive(tmp_path, script, name, url_var, top, out):
    """The real script, fed a local zip laid out like the release ({train,test}/*.mp4, maybe in a top folder)."""
    if shutil.which("curl") is None and shutil.which("wget") is None:
        pytest.skip("needs curl or wget")
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for split, count in (("train", 3), ("test", 1)):
            for i in range(count):
                mp4 = tmp_path / f"{split}{i}.mp4"
                write_mp4(mp4, np.full((6, 8, 8, 3), 40 * (i + 1), np.uint8))
                z.write(mp4, str(Path(top, split, f"{i}.mp4")))
    data = tmp_path / "data"
    env = {url_var: f"file://{archive}", "DATASETS_DIR": str(data)}
    for _ in range(2):  # the second run finds everything done
        result = run_script(script, env)
        assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert not (data / f"{top or 'gqn_mazes'}-download").exists()  # sources removed by default
    assert sorted(p.name for p in (data / out / "train").glob("*.npy")) == ["0.npy", "1.npy", "2.npy"]
    dataset = get_dataset(name, T=6, image_size=8, data_root=data)
    assert len(dataset) == 3
    check_video(dataset.video(0), 6, 8)
    check_video(get_dataset(name, split="test", T=6, image_size=8, data_root=data).video(0), 6, 8)


def test_carla_download_script_with_local_archive(tmp_path):
    if shutil.which("curl") is None and shutil.which("wget") is None:
        pytest.skip("needs curl or wget")
    release = tmp_path / "release" / "no-traffic"
    release.mkdir(parents=True)
    for i in range(103):
        torch.save(torch.from_numpy(numbered_video(i, T=2, size=4)), release / f"video_{i}.pt")
    archive = tmp_path / "no-traffic.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(release.parent), "no-traffic"], check=True)
    data = tmp_path / "data"
    result = run_script("datasets/carla/download.sh", {"CARLA_URL": f"file://{archive}", "DATASETS_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    folder = data / "carla" / "no-traffic"
    assert (folder / "video_train.csv").exists() and (folder / "video_test.csv").exists()
    train = get_dataset("carla_no_traffic", T=2, image_size=4, data_root=data)
    test = get_dataset("carla_no_traffic", split="test", T=2, image_size=4, data_root=data)
    assert len(train) == 3 and len(test) == 100
    assert video_ids(test.video(0)[None]) == [3]


def test_fetch_resumes_partial_download(tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    source = tmp_path / "source.bin"
    source.write_bytes(np.random.default_rng(0).integers(0, 255, 100_000, dtype=np.uint8).tobytes())
    dest = tmp_path / "out" / "file.bin"
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(source.read_bytes()[:40_000])  # an interrupted download
    script = f'source "{REPO}/datasets/common.sh"; fetch "file://{source}" "{dest}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == source.read_bytes()
    assert not Path(str(dest) + ".part").exists()


def test_check_space_refuses(tmp_path):
    script = f'source "{REPO}/datasets/common.sh"; check_space "{tmp_path}" 999999999999999999'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "free" in result.stderr and str(tmp_path) in result.stderr


def test_download_reports_failed_url(tmp_path):
    if shutil.which("curl") is None and shutil.which("wget") is None:
        pytest.skip("needs curl or wget")
    missing = f"file://{tmp_path}/missing.zip"
    script = f'source "{REPO}/datasets/common.sh"; fetch "{missing}" "{tmp_path}/out.zip"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert missing in result.stderr


SCRIPTS = sorted(str(p) for p in (REPO / "datasets").glob("*/download.sh")) + [str(REPO / "datasets" / "common.sh")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_a_file_skipped_once_as_unreadable_still_fails_a_strict_scan(tmp_path):
    bad = tmp_path / "broken.npy"
    bad.write_bytes(b"not a video")
    lengths = scan_lengths([bad], skip_bad=True)
    assert lengths[bad] is None
    with pytest.raises(DatasetError, match="broken.npy"):
        scan_lengths([bad], skip_bad=False)
