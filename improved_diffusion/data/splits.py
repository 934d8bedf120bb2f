"""
Splits of file datasets: which files are a split's videos, for CARLA and for the user's own folders.

CARLA: FDM's split files (a CSV with a header row and rows "<i>,<path>"), or, without them, FDM's
rule (the highest-numbered videos are the test set). User folders: a train/ and test/ subfolder,
or else a stable hash split of the files; videos shorter than T are left out, and actions files
(`<name>.actions.npy`, actions.py) are checked against the videos they belong to.
"""

import hashlib
import os
import re
import warnings
from pathlib import Path

from ..errors import DatasetError
from .actions import actions_path, folder_encoding, is_actions_file, read_actions_file
from .sources import DatasetWarning, FileDataset
from .video_reader import VIDEO_SUFFIXES, cached_copy, natural_key, video_length

CARLA_NUM_TEST = 100  # FDM's split: the 100 highest-numbered videos are the test set
USER_FOLDER_TEST_PERCENT = 10


# ---------------------------------------------------------------------------
# CARLA split files (FDM format: a CSV with a header row and rows "<i>,<path>")
# ---------------------------------------------------------------------------


def carla_split(filenames, num_test=CARLA_NUM_TEST):
    """FDM's split of CARLA video files: sorted by number, the last num_test are the test set."""
    ordered = sorted(filenames, key=lambda f: int(re.search(r"(\d+)", Path(f).stem).group(1)))
    return ordered[:-num_test], ordered[-num_test:]


def write_carla_split(folder, num_test=CARLA_NUM_TEST):
    """Write video_train.csv and video_test.csv next to the video_<i>.pt files, as FDM's split script does."""
    folder = Path(folder)
    names = [p.name for p in folder.glob("video_*.pt")]
    if len(names) <= num_test:
        raise DatasetError(f"Folder {folder} holds {len(names)} CARLA videos, too few for a {num_test}-video test split.")
    train, test = carla_split(names, num_test)
    for split, files, first in (("train", train, 0), ("test", test, len(train))):
        rows = "".join(f"{first + i},{folder.name}/{name}\n" for i, name in enumerate(files))
        _atomic_write_text(folder / f"video_{split}.csv", ",path\n" + rows)
    return train, test


def _atomic_write_text(path, text):
    part = path.with_name(path.name + f".{os.getpid()}.part")
    part.write_text(text)
    os.replace(part, path)


def carla_split_paths(folder, split, skip_bad, root):
    """Videos of one split, from FDM's CSV if present, else from the same rule applied to the folder."""
    csv = folder / f"video_{split}.csv"
    if csv.exists():
        lines = cached_copy(csv, root).read_text().splitlines()
        names = [Path(line.split(",", 1)[-1].strip()).name for line in lines if ".pt" in line]
    else:
        found = [p.name for p in folder.glob("video_*.pt")]
        if len(found) <= CARLA_NUM_TEST:
            raise DatasetError(
                f"Folder {folder} has no {csv.name} and only {len(found)} videos, too few to split; "
                f"re-run `bash datasets/carla/download.sh`."
            )
        names = carla_split(found)[0 if split == "train" else 1]
    paths = [folder / name for name in names]
    missing = [p for p in paths if not p.exists()]
    if missing and not skip_bad:
        raise DatasetError(f"Split file {csv} lists {missing[0].name}, which does not exist in {folder}.")
    if missing:
        warnings.warn(f"Skipped {len(missing)} videos listed in {csv} that do not exist.", DatasetWarning)
    return [p for p in paths if p.exists()]


# ---------------------------------------------------------------------------
# User folders
# ---------------------------------------------------------------------------


def find_videos(folder):
    """Video files below `folder`, in a stable order; hidden, partial and actions files are ignored."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if is_actions_file(path) or any(p.startswith(".") for p in rel.parts):
            continue
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder)))


def _is_test_file(rel_path):
    """Deterministic ~10% test split by a hash of the relative path, stable when files are added."""
    digest = hashlib.md5(rel_path.as_posix().encode()).hexdigest()
    return int(digest, 16) % 100 < USER_FOLDER_TEST_PERCENT


def _user_split(folder, split):
    """Files of one split: the train/ or test/ subfolder if there is one, else a hash split."""
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        sub = folder / split
        if not sub.is_dir():
            raise DatasetError(f"Folder {folder} has a train/ or test/ subfolder but no {split}/ subfolder.")
        return find_videos(sub)
    files = find_videos(folder)
    is_test = [_is_test_file(p.relative_to(folder)) for p in files]
    if len(files) >= 2 and not any(is_test):
        is_test[0] = True  # keep a tiny folder usable: one test video
    if len(files) >= 2 and all(is_test):
        is_test[-1] = False
    return [p for p, t in zip(files, is_test) if t == (split == "test")]


def user_folder_dataset(name, folder, split, T, image_size, skip_bad):
    """The FileDataset of one split of a folder of the user's videos: those with at least T frames."""
    if not find_videos(folder):
        raise DatasetError(f"No videos ({', '.join(VIDEO_SUFFIXES)}) found in folder {folder}.")
    files = _user_split(folder, split)
    lengths = scan_lengths(files, skip_bad)
    unreadable = [p for p, n in lengths.items() if n is None]
    short = [p for p, n in lengths.items() if n is not None and n < T]
    keep = [p for p in files if lengths[p] is not None and lengths[p] >= T]
    if unreadable or short:
        warnings.warn(
            f"Skipped {len(unreadable) + len(short)} of {len(files)} {split} videos in {folder}: "
            f"{len(short)} shorter than T={T}, {len(unreadable)} unreadable.",
            DatasetWarning,
        )
    if not keep:
        raise DatasetError(f"Folder {folder} has no {split} videos with at least T={T} frames.")
    encoding = _user_folder_actions(folder, keep, lengths)
    return FileDataset(
        name, split, T, image_size, keep, source_root=folder, skip_bad=skip_bad, lengths=[lengths[p] for p in keep],
        action_encoding=encoding,
    )


def _user_folder_actions(folder, videos, lengths):
    """
    The encoding of a folder's `<name>.actions.npy` files (None if it has none), after checking
    that every video of the folder has one and that each of `videos` has one action per frame.
    """
    every_video = find_videos(folder)
    with_actions = [p for p in every_video if actions_path(p).is_file()]
    if not with_actions:
        return None
    if len(with_actions) < len(every_video):
        lacking = next(p for p in every_video if not actions_path(p).is_file())
        raise DatasetError(
            f"Folder {folder} has actions files for {len(with_actions)} of its {len(every_video)} videos "
            f"({lacking.name} has no {actions_path(lacking).name}); give every video one or none."
        )
    encoding = folder_encoding([actions_path(p) for p in every_video])
    for video in videos:
        count = len(read_actions_file(actions_path(video)))
        if count != lengths[video]:
            raise DatasetError(
                f"Actions file {actions_path(video)} has {count} actions but {video.name} has {lengths[video]} frames; "
                f"it needs one action per frame."
            )
    return encoding


_length_cache = {}


def scan_lengths(paths, skip_bad):
    """Frame count of each file (None if unreadable and skip_bad); cached by size and mtime."""
    lengths = {}
    for path in paths:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _length_cache or (_length_cache[key] is None and not skip_bad):
            try:
                _length_cache[key] = video_length(path)
            except DatasetError:
                if not skip_bad:
                    raise  # a file remembered as unreadable is read again, so the caller learns why
                _length_cache[key] = None
        lengths[path] = _length_cache[key]
    return lengths
