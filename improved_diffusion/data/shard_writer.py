"""
Writing shard caches (scripts/cache_dataset.py): `write_cache` decodes a dataset of the registry
into the cache folder that shard_cache.py reads (its docstring gives the layout and the rules that
make a cached clip equal the decoded one).

Writing is resumable: each file is written to a temporary name and renamed, a shard counts as
done when its .json is present and its checksums match, and index.json is rewritten last. Under
MPI, rank r writes shards r, r + N, ...; rank 0 writes the index.
"""

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..dist_util import MPI_ENV_VARS
from ..errors import DatasetError
from .datasets import DATASETS, get_dataset
from .episodes import EpisodeDataset
from .pixels import to_uint8
from .shard_cache import FORMAT, INDEX, VERSION, check_npy, find_cache
from .sources import FileDataset, ProceduralDataset
from .video_reader import cached_copy, to_model_range, video_length

DEFAULT_SHARD_SIZE = 64
RESIZE_CHUNK = 64  # frames resized at once: bounds memory for long videos
TMP_MARK = ".tmp-"


def _source_kind(dataset):
    if isinstance(dataset, EpisodeDataset):
        return "episodes"
    if isinstance(dataset, ProceduralDataset):
        return "procedural"
    if isinstance(dataset, FileDataset):
        return "files" if dataset.name in DATASETS else "folder"
    raise DatasetError(f"Dataset {dataset.name!r} ({type(dataset).__name__}) cannot be cached.")


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
    if not any(k in os.environ for k in MPI_ENV_VARS):
        return 0, 1, lambda: None
    from mpi4py import MPI  # importing it initialises MPI: only under mpiexec

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
    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled)
