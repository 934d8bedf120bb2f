"""
Shard caches: a dataset decoded once into memory-mapped uint8 shards, so training decodes no video.

Decoding mp4 files (or generating procedural videos) costs far more than a training step of a
small model; a cache pays that cost once. `write_cache` (scripts/cache_dataset.py) stores every
video of a dataset whole, already resized to the training image size, and `ShardDataset` reads
windows from it by memory-mapping, drawing them from the generator exactly as the source does.

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

Writing is resumable: each file is written to a temporary name and renamed, a shard counts as
done when its .json is present and its checksums match, and index.json is rewritten last. Under
MPI, rank r writes shards r, r + N, ...; rank 0 writes the index.
"""

import copy
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .actions import ActionEncoding
from .datasets import (
    DatasetWarning,
    FileDataset,
    ProceduralDataset,
    VideoDataset,
    cached_copy,
    get_dataset,
    to_model_range,
    video_length,
)
from .pixels import to_uint8

FORMAT = "improved_diffusion.shard_cache"
VERSION = 1
INDEX = "index.json"
DEFAULT_SHARD_SIZE = 64
RESIZE_CHUNK = 64  # frames resized at once: bounds memory for long videos
TMP_MARK = ".tmp-"


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


def is_cache(name):
    return find_cache(name) is not None


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


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _source_kind(dataset):
    from .episodes import EpisodeDataset

    if isinstance(dataset, EpisodeDataset):
        return "episodes"
    if isinstance(dataset, ProceduralDataset):
        return "procedural"
    if isinstance(dataset, FileDataset):
        return "files" if dataset.name in _registered() else "folder"
    raise DatasetError(f"Dataset {dataset.name!r} ({type(dataset).__name__}) cannot be cached.")


def _registered():
    from .datasets import DATASETS

    return DATASETS


def full_length(dataset, i):
    """Frames in the whole of video i, the length the source draws its windows from."""
    kind = _source_kind(dataset)
    if kind == "procedural":
        return dataset.full_length
    if kind == "episodes":
        return len(dataset._stored_actions(cached_copy(dataset.paths[i], dataset.source_root)))
    if dataset.lengths is not None:
        return int(dataset.lengths[i])
    return video_length(cached_copy(dataset.paths[i], dataset.source_root))


def whole_video(dataset, i, length):
    """uint8 [length x H x W x 3] first frames of video i and their encoded actions (None without), as the source reads them."""
    view = copy.copy(dataset)  # the same source read as one window of the whole length
    view.T = length
    if _source_kind(dataset) == "episodes":
        view.frame_skip = 1
    frames, actions = view.frames_and_actions(i, None)
    if len(frames) != length:
        raise DatasetError(f"Video {i} of {dataset.name!r} gave {len(frames)} frames, not the {length} it has.")
    return frames, actions


def to_stored_size(frames, image_size):
    """uint8 [L x S x S x 3]: unchanged at that size, else to_model_range's resize rounded back to uint8."""
    if frames.shape[1:] == (image_size, image_size, 3) and frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    chunks = [
        to_uint8(to_model_range(frames[i : i + RESIZE_CHUNK], image_size)).permute(0, 2, 3, 1).numpy()
        for i in range(0, len(frames), RESIZE_CHUNK)
    ]
    return np.concatenate(chunks)


def _tmp_name(path):
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def _atomic_json(path, value):
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_names(j):
    return f"shard_{j:05d}.npy", f"shard_{j:05d}.actions.npy", f"shard_{j:05d}.json"


def _shard_done(split_dir, j, config, indices, image_size, verify=True):
    """The shard's record if it is complete and matches `config` (and, with verify, its checksums); else None."""
    frames_name, actions_name, record_name = _shard_names(j)
    if not (split_dir / record_name).is_file():
        return None
    try:
        record = json.loads((split_dir / record_name).read_text())
        if record.get("config") != config or [v["index"] for v in record["videos"]] != list(indices):
            return None
        check_npy(split_dir / frames_name, (record["frames"], image_size, image_size, 3), np.uint8)
        if verify and sha256(split_dir / frames_name) != record["sha256"]:
            return None
        if record["action_encoding"] is not None:
            check_npy(split_dir / actions_name, (record["frames"], record["action_encoding"]["action_dim"]), np.float32)
            if verify and sha256(split_dir / actions_name) != record["actions_sha256"]:
                return None
    except (DatasetError, OSError, ValueError, KeyError, TypeError):
        return None
    return record


def _source_name(dataset, i):
    """Where video i came from, relative to its dataset (None for generated videos)."""
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return None
    try:
        return paths[i].relative_to(dataset.source_root).as_posix()
    except ValueError:
        return paths[i].name


def _write_shard(dataset, split_dir, j, config, indices, max_length):
    """Decode the videos `indices` into shard j: frames, then actions, then the record that marks it complete."""
    frames_name, actions_name, record_name = _shard_names(j)
    lengths = [full_length(dataset, i) for i in indices]
    if max_length is not None:
        lengths = [min(n, max_length) for n in lengths]
    total, size = sum(lengths), config["image_size"]
    encoding = dataset.action_encoding
    frames_tmp = _tmp_name(split_dir / frames_name)
    stored = np.lib.format.open_memmap(frames_tmp, mode="w+", dtype=np.uint8, shape=(total, size, size, 3))
    actions_tmp = actions = None
    if encoding is not None:
        actions_tmp = _tmp_name(split_dir / actions_name)
        actions = np.lib.format.open_memmap(actions_tmp, mode="w+", dtype=np.float32, shape=(total, encoding.action_dim))
    videos, offset = [], 0
    for i, length in zip(indices, lengths):
        frames, encoded = whole_video(dataset, i, length)
        stored[offset : offset + length] = to_stored_size(frames, size)
        if actions is not None:
            actions[offset : offset + length] = encoded
        videos.append({"index": int(i), "length": int(length), "source": _source_name(dataset, i)})
        offset += length
    stored.flush()
    del stored
    os.replace(frames_tmp, split_dir / frames_name)
    record = {"config": config, "shard": j, "frames": total, "videos": videos, "sha256": sha256(split_dir / frames_name),
              "action_encoding": None if encoding is None else {"action_dim": encoding.action_dim,
                                                                "num_actions": encoding.num_actions},
              "actions_sha256": None}
    if actions is not None:
        actions.flush()
        del actions
        os.replace(actions_tmp, split_dir / actions_name)
        record["actions_sha256"] = sha256(split_dir / actions_name)
    _atomic_json(split_dir / record_name, record)
    return record


def _remove_temporaries(split_dir):
    for path in split_dir.glob(f"*{TMP_MARK}*"):
        path.unlink(missing_ok=True)


def _config_differences(old, new):
    return ", ".join(f"{key} {old.get(key)!r} (now {new.get(key)!r})" for key in new if old.get(key) != new.get(key))


def _index_for_update(out, config, kind):
    """The cache's index to add a split to: the existing one if its config is this one, else a fresh one."""
    existing = find_cache(out) if (out / INDEX).is_file() else None
    if existing is None and (out / INDEX).is_file():
        raise DatasetError(f"Folder {out} has an {INDEX} that is not a cache's; pass another --out.")
    if existing is None:
        return {"format": FORMAT, "version": VERSION, "config": config, "source_kind": kind, "splits": {}}
    if existing["config"] != config:
        raise DatasetError(
            f"Folder {out} already holds a cache made with other settings: {_config_differences(existing['config'], config)}; "
            f"pass another --out or delete it."
        )
    return copy.deepcopy(existing)


def _assemble(split, records):
    """The index entry of a split from its shard records: shards, then videos in dataset order."""
    shards, videos = [], []
    for j, record in enumerate(records):
        frames_name, actions_name, _ = _shard_names(j)
        shards.append({"file": f"{split}/{frames_name}", "frames": record["frames"], "sha256": record["sha256"],
                       "actions_file": None if record["actions_sha256"] is None else f"{split}/{actions_name}",
                       "actions_sha256": record["actions_sha256"]})
        offset = 0
        for video in record["videos"]:
            videos.append({"shard": j, "offset": offset, "length": video["length"], "source": video["source"]})
            offset += video["length"]
    encoding = records[0]["action_encoding"] if records else None
    return {"complete": True, "num_videos": len(videos), "action_encoding": encoding, "shards": shards, "videos": videos}


def mpi_world():
    """(rank, world size, barrier) under mpiexec, else (0, 1, a no-op): ranks split the shards to write."""
    from ..dist_util import MPI_ENV_VARS

    if not any(k in os.environ for k in MPI_ENV_VARS):
        return 0, 1, lambda: None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm.Barrier


def write_cache(source, out, splits=("train", "test"), T=None, image_size=None, frame_skip=1,
                shard_size=DEFAULT_SHARD_SIZE, seed=0, data_root=None, max_videos=None, max_length=None,
                rank=0, world_size=1, barrier=None, progress=False):
    """
    Decode dataset `source` (a registered name or a folder) into a cache at `out` (module docstring).

    Shards already complete (record present, checksums right) are kept, so an interrupted run is
    finished by running it again. Rank r of world_size writes shards r, r + world_size, ...;
    `barrier` synchronises the ranks (None: a single process). Returns per split
    {"videos", "frames", "written", "kept"} (shard counts of this rank).
    """
    barrier = barrier or (lambda: None)
    out = Path(out).expanduser()
    if find_cache(source) is not None:
        raise DatasetError(f"Dataset {source} is already a cache; train on it directly.")
    if int(shard_size) < 1:
        raise DatasetError(f"shard_size must be a positive number of videos, got {shard_size}.")
    if max_videos is not None and int(max_videos) < 1:
        raise DatasetError(f"max_videos must be positive, got {max_videos}.")
    if max_length is not None and int(max_length) < 1:
        raise DatasetError(f"max_length must be positive, got {max_length}.")
    summary = {}
    for split in splits:
        dataset = get_dataset(source, split=split, T=T, image_size=image_size, seed=seed, data_root=data_root,
                              frame_skip=frame_skip)
        kind = _source_kind(dataset)
        name = str(Path(str(source)).expanduser().resolve()) if kind == "folder" else str(source)
        config = {"dataset": name, "seed": int(seed), "T": dataset.T, "image_size": dataset.image_size,
                  "frame_skip": int(frame_skip), "shard_size": int(shard_size),
                  "max_videos": None if max_videos is None else int(max_videos),
                  "max_length": None if max_length is None else int(max_length)}
        if max_length is not None and max_length < dataset.T * frame_skip:
            raise DatasetError(f"max_length {max_length} is shorter than a clip of T={dataset.T} frames.")
        num_videos = len(dataset) if max_videos is None else min(len(dataset), int(max_videos))
        plan = [range(j * shard_size, min((j + 1) * shard_size, num_videos)) for j in range(math.ceil(num_videos / shard_size))]
        split_dir = out / split
        index = _index_for_update(out, config, kind)  # every rank checks; rank 0 writes
        if rank == 0:
            split_dir.mkdir(parents=True, exist_ok=True)
            _remove_temporaries(split_dir)
            index["splits"][split] = {"complete": False, "num_videos": num_videos}
            _atomic_json(out / INDEX, index)
        barrier()
        mine = range(rank, len(plan), world_size)
        written = kept = 0
        bar = _progress(len(mine), f"caching {split}", progress and rank == 0)
        for j in mine:
            if _shard_done(split_dir, j, config, plan[j], dataset.image_size) is None:
                _write_shard(dataset, split_dir, j, config, plan[j], max_length)
                written += 1
            else:
                kept += 1
            bar.update(1)
        bar.close()
        barrier()
        if rank == 0:
            records = []
            for j, indices in enumerate(plan):
                record = _shard_done(split_dir, j, config, indices, dataset.image_size, verify=False)
                if record is None:
                    raise DatasetError(f"Shard {split_dir / _shard_names(j)[0]} was not written; run scripts/cache_dataset.py again.")
                records.append(record)
            index["splits"][split] = _assemble(split, records)
            _atomic_json(out / INDEX, index)
        barrier()
        entry = find_cache(out)["splits"][split]
        summary[split] = {"videos": entry["num_videos"], "frames": sum(s["frames"] for s in entry.get("shards", [])),
                          "written": written, "kept": kept}
    return summary


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled)
