"""
Shard caches: a dataset decoded once into memory-mapped uint8 shards, so training decodes no video.

Decoding mp4 files (or generating procedural videos) costs far more than a training step of a
small model; a cache pays that cost once. `write_cache` (shard_writer.py, scripts/cache_dataset.py)
stores every video of a dataset whole, already resized to the training image size; this module
reads it: `find_cache` recognises a cache folder and `ShardDataset` reads windows from it by
memory-mapping, drawing them from the generator exactly as the source does.

Layout of a cache folder DIR:

    DIR/index.json                        what the cache holds; its presence makes DIR a --dataset
    DIR/<split>/shard_00000.npy           uint8 [F x S x S x 3]: the frames of up to shard_size
                                          whole videos, one video after the other
    DIR/<split>/shard_00000.actions.npy   float32 [F x D]: the encoded actions of those frames
                                          (datasets with actions only; row t = frame t's action)
    DIR/<split>/shard_00000.json          the shard's videos, lengths and checksums; written after
                                          the shard, so its presence says the shard is complete

index.json holds "format" and "version"; "config" (source dataset, seed, T, image_size,
frame_skip, shard_size, max_videos, max_length: a rerun with another config is refused);
"source_kind" (folder, files, procedural or episodes); and per split: "complete", "action_encoding"
(null or {action_dim, num_actions}), "shards" ([{file, frames, sha256, actions_file,
actions_sha256}]) and "videos" ([{shard, offset, length, source}]: video i is frames
offset .. offset + length - 1 of shard `shard`).

Exactness: a clip of T frames at frame_skip k starts at 0 without a generator, else at
rng.integers(0, L - T * k + 1) for a video of L frames, and takes every k-th frame: the rule of
FileDataset, ProceduralDataset (L = its full length) and EpisodeDataset, so an rng in the same
state gives the same clip from the cache as from the source. Frames stored at another size are
resized by `to_model_range` and rounded to uint8 (`pixels.to_uint8`), so there a cached clip
differs from the decoded one by at most half a grey level; at the stored size it is bit-exact.
Procedural videos are cached at their full length, max(T, DEFAULT_T) at the cache's T.
"""

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .actions import ActionEncoding
from .sources import DatasetWarning, VideoDataset
from .video_reader import cached_copy

FORMAT = "improved_diffusion.shard_cache"
VERSION = 1
INDEX = "index.json"


# ---------------------------------------------------------------------------
# Detection and the index
# ---------------------------------------------------------------------------


_index_cache = {}


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{what} {path} is unreadable ({' '.join(str(e).split())[:200]}).") from None


def find_cache(name):
    """The parsed index.json if `name` is a cache folder, else None (cached by file size and mtime).

    A folder holding shard .json files but no index.json is an unfinished cache or one split of a
    cache: a DatasetError, so its shards are never mistaken for a folder of .npy videos.
    """
    folder = Path(str(name)).expanduser()
    path = folder / INDEX
    if not path.is_file():
        if folder.is_dir() and (any(folder.glob("shard_*.json")) or any(folder.glob("*/shard_*.json"))):
            raise DatasetError(
                f"Folder {folder} holds cache shards but no {INDEX}: pass the cache folder itself, or rerun "
                f"scripts/cache_dataset.py to finish it."
            )
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _index_cache:
        index = _read_json(path, "Cache index")
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            return None  # a user's own index.json beside their videos
        if index.get("version") != VERSION:
            raise DatasetError(f"Cache index {path} has version {index.get('version')}; this code reads version {VERSION}.")
        _index_cache.clear()
        _index_cache[key] = index
    return _index_cache[key]


def cache_default_T(name, frame_skip=1):
    """Frames per clip when none is asked for: the cache's T, at its frame_skip (episodes)."""
    config = find_cache(name)["config"]
    return int(config["T"]) * int(config["frame_skip"]) // int(frame_skip)


def cache_image_size(name):
    return int(find_cache(name)["config"]["image_size"])


def cache_skips_frames(name):
    """Whether --frame_skip applies: only to a cache of dmlab or minecraft episodes."""
    return find_cache(name)["source_kind"] == "episodes"


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _npy_header(path):
    """(shape, dtype, bytes the file must have) from a .npy header; DatasetError naming the file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            return tuple(shape), dtype, f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except FileNotFoundError:
        raise DatasetError(f"Cache shard {path} is missing; rerun scripts/cache_dataset.py to rewrite it.") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse the header is a corrupt shard
        raise DatasetError(
            f"Cache shard {path} is unreadable ({' '.join(str(e).split())[:200]}); rerun scripts/cache_dataset.py to rewrite it."
        ) from None


def check_npy(path, shape, dtype):
    """DatasetError (one sentence naming `path`) unless it is a complete .npy file of this shape and dtype."""
    found_shape, found_dtype, expected = _npy_header(path)
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
        raise DatasetError(
            f"Cache shard {path} holds {found_dtype} {list(found_shape)} but its index expects {np.dtype(dtype)} "
            f"{list(shape)}; rerun scripts/cache_dataset.py to rewrite it."
        )
    size = path.stat().st_size
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise DatasetError(
            f"Cache shard {path} is {problem} ({size} bytes, {expected} expected); rerun scripts/cache_dataset.py "
            f"to rewrite it."
        )


class ShardDataset(VideoDataset):
    """
    A split of a cache folder: every video whole in memory-mapped shards, so a clip is a slice.

    T defaults to the cache's T, image_size to its stored size (another size is resized on the
    fly). A cache of a folder leaves out videos shorter than T, as the folder's loader does;
    elsewhere a video shorter than T is a DatasetError. frame_skip k > 1 needs a cache of episodes.
    `lengths[i]`: the frames video i can give at this frame_skip, so evaluation can read it whole.
    """

    def __init__(self, folder, split="train", T=None, image_size=None, frame_skip=1):
        index = find_cache(folder)
        if index is None:
            raise DatasetError(f"Folder {folder} is not a cache: it has no {INDEX} written by scripts/cache_dataset.py.")
        folder = Path(str(folder)).expanduser()
        entry = index.get("splits", {}).get(split)
        if entry is None:
            raise DatasetError(
                f"Cache {folder} has no {split} split; make it with scripts/cache_dataset.py --split {split}."
            )
        if not entry.get("complete"):
            raise DatasetError(
                f"Cache {folder} is incomplete: its {split} split was interrupted while being written; rerun "
                f"scripts/cache_dataset.py with the same flags to finish it."
            )
        if frame_skip != 1 and index["source_kind"] != "episodes":
            raise DatasetError(f"frame_skip {frame_skip} is not supported for cache {folder} of {index['config']['dataset']}.")
        T = cache_default_T(folder, frame_skip) if T is None else int(T)
        super().__init__(str(folder), split, T, cache_image_size(folder) if image_size is None else int(image_size))
        self.folder = folder
        self.frame_skip = int(frame_skip)
        self.stored_size = int(index["config"]["image_size"])
        encoding = entry.get("action_encoding")
        self.action_encoding = None if encoding is None else ActionEncoding(**encoding)
        self._shards = self._check_shards(entry["shards"])
        videos = self._check_videos(entry["videos"])
        span = self.T * self.frame_skip
        short = [v for v in videos if v[2] < span]
        if short and index["source_kind"] == "folder":
            warnings.warn(f"Skipped {len(short)} of {len(videos)} {split} videos in cache {folder}: shorter than "
                          f"T={self.T}.", DatasetWarning)
            videos = [v for v in videos if v[2] >= span]
        elif short:
            raise DatasetError(
                f"Cache {folder} holds {split} videos of {short[0][2]} frames, fewer than the {span} a clip of T={self.T} "
                f"needs; cache the dataset again with --T {self.T}."
            )
        if not videos:
            raise DatasetError(f"Cache {folder} has no {split} videos with at least T={self.T} frames.")
        self._videos = videos
        self.lengths = [length // self.frame_skip for _, _, length in videos]
        self._maps = {}

    def _check_shards(self, shards):
        """(frames path, actions path, frame count) of each shard, after checking their headers and sizes."""
        checked = []
        for shard in shards:
            path = self.folder / shard["file"]
            frames = int(shard["frames"])
            check_npy(path, (frames, self.stored_size, self.stored_size, 3), np.uint8)
            actions = None
            if self.action_encoding is not None:
                actions = self.folder / shard["actions_file"]
                check_npy(actions, (frames, self.action_encoding.action_dim), np.float32)
            checked.append((path, actions, frames))
        return checked

    def _check_videos(self, videos):
        index_path = self.folder / INDEX
        checked = []
        for i, video in enumerate(videos):
            shard, offset, length = int(video["shard"]), int(video["offset"]), int(video["length"])
            if not 0 <= shard < len(self._shards):
                raise DatasetError(f"Cache index {index_path} places {self.split} video {i} in shard {shard}, which it does not list.")
            path, _, frames = self._shards[shard]
            if offset < 0 or length < 1 or offset + length > frames:
                raise DatasetError(
                    f"Cache index {index_path} places {self.split} video {i} at frames {offset}..{offset + length - 1} of "
                    f"{path.name}, which holds {frames} frames."
                )
            checked.append((shard, offset, length))
        return checked

    def __len__(self):
        return len(self._videos)

    def _map(self, path):
        """The shard memory-mapped (after copying it to DATA_ROOT if that is set)."""
        if path not in self._maps:
            try:
                self._maps[path] = np.load(cached_copy(path, self.folder), mmap_mode="r", allow_pickle=False)
            except Exception as e:  # noqa: BLE001 - checked at construction; a file replaced since
                raise DatasetError(f"Cache shard {path} is unreadable ({' '.join(str(e).split())[:200]}).") from None
        return self._maps[path]

    def _window(self, index, rng):
        shard, offset, length = self._videos[index]
        span = self.T * self.frame_skip
        if length < span:  # a copy with a longer T (evaluation reads whole videos)
            raise DatasetError(f"Video {index} of cache {self.folder} has {length} frames, fewer than T={self.T}.")
        start = 0 if rng is None else int(rng.integers(0, length - span + 1))
        return shard, slice(offset + start, offset + start + span, self.frame_skip)

    def frames(self, index, rng=None):
        shard, window = self._window(index, rng)
        return np.array(self._map(self._shards[shard][0])[window])

    def frames_and_actions(self, index, rng=None):
        shard, window = self._window(index, rng)
        frames_path, actions_path, _ = self._shards[shard]
        frames = np.array(self._map(frames_path)[window])
        return frames, None if actions_path is None else np.array(self._map(actions_path)[window])
