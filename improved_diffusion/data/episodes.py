"""
DMLab and Minecraft: TECO's releases (Yan et al. 2023), read as Diffusion Forcing reads them.

Layout after `bash datasets/{dmlab,minecraft}/download.sh` (under the data root):

    dmlab/data/{train,test}/<dir>/<i>.npz          video uint8 [300 x 64 x 64 x 3], actions int [300]
    minecraft/data/{train,test}/<dir>/<i>.mp4      128 x 128 frames
    minecraft/data/{train,test}/<dir>/<i>.npz      actions int [one per frame of the mp4]

The release tars hold `dmlab/{train,test}/...` and `minecraft/{train,test}/...` (TECO's
teco/data.py reads `<data_path>/{train,test}/*/*.npz` or `*.mp4`); Diffusion Forcing renames
`train` -> `training` and `test` -> `validation` after unpacking and maps its split "test" to
"validation" (datasets/video/{dmlab,minecraft}_video_dataset.py), so a folder prepared by DF's
code (`data/dmlab/{training,validation}`) is read too: link or move it to `<root>/dmlab/data`.

How DF reads an episode (datasets/video/dmlab_video_dataset.py, minecraft_video_dataset.py,
base_video_dataset.py at github.com/buoyancy99/diffusion-forcing):

- DMLab: `actions = data["actions"][i : i + n]; np.eye(3)[actions]`, frame t with action t.
  TECO's collection (github.com/wilson1yan/lab, python/random_agent_traverse.py) appends the
  frame, then the action it takes there, then steps: action t is taken at frame t. Its
  path-following agent uses ids 0 look left, 1 look right, 2 forward (of 5 defined).
- Minecraft: `np.load(npz)["actions"][1:]`, then `np.eye(4)`. collect-minecraft's collect.py
  (github.com/wilson1yan/collect-minecraft) stores actions[0] = 0 for the first frame and
  actions[t] = 1 + the action that led to frame t (1 forward, 2 left, 3 right), so DF's `[1:]`
  pairs frame t with the action taken at frame t, as in DMLab. Frames with an action after
  them: len(actions) - 1 (collect.py's default traj_length 300 writes 301 frames and 301
  actions: 300 usable, DF's episode length). Whether the mp4 has as many frames is only found
  when a window reaches past its end (DatasetError naming both files).
- frame_skip k: DF takes a window of n * k frames starting at any frame, then `video[::k]` and
  `actions[::k]`: every k-th frame with the action taken at it; the actions of the skipped
  frames are dropped, not combined. A clip of T frames here is the same: raw frames
  start, start + k, ..., start + (T - 1) k, start uniform in [0, L - T * k].
- Episode files are listed recursively (DF: `glob("**/*.npz")`); here in natural order of
  their paths, so the order is the same on every machine.
"""

import numpy as np

from ..errors import DatasetError
from .actions import ActionEncoding
from .sources import FileDataset
from .video_reader import cached_copy, natural_key, one_line, read_ffmpeg

NUM_ACTIONS = {"dmlab": 3, "minecraft": 4}  # DF: np.eye(3), np.eye(4)
SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "validation")}  # TECO's names, then DF's


def split_folder(folder, split):
    """The folder of one split: TECO's name (train, test) or, failing that, DF's (training, validation)."""
    for candidate in SPLIT_FOLDERS[split]:
        if (folder / candidate).is_dir():
            return folder / candidate
    return None


def episode_files(split_dir):
    """The .npz file of every episode below a split folder, in natural path order; hidden files ignored."""
    found = [
        p for p in split_dir.rglob("*.npz")
        if not any(part.startswith(".") for part in p.relative_to(split_dir).parts)
    ]
    return sorted(found, key=lambda p: natural_key(p.relative_to(split_dir)))


def episode_dataset(name, folder, split, T, image_size, source_root, skip_bad, frame_skip, download):
    """The EpisodeDataset of a registered name (dmlab or minecraft) at `folder`, or a one-sentence DatasetError."""
    split_dir = split_folder(folder, split)
    if split_dir is None:
        names = " or ".join(f"{c}/" for c in SPLIT_FOLDERS[split])
        raise DatasetError(f"Dataset {name!r} has no {split} split ({names}) in {folder}; download it with `{download}`.")
    paths = episode_files(split_dir)
    if not paths:
        raise DatasetError(f"Dataset {name!r} has no {split} episodes (.npz files) in {split_dir}; download it with `{download}`.")
    return EpisodeDataset(name, split, T, image_size, paths, source_root, skip_bad, frame_skip)


class EpisodeDataset(FileDataset):
    """
    One episode per .npz file (DMLab: video and actions; Minecraft: actions, the frames in the
    .mp4 of the same name). Every clip comes with its one-hot actions, aligned frame by frame,
    and with frame_skip k > 1 every k-th frame of a window of T * k (module docstring).

    `lengths[i]` is the number of frames episode i can give at this frame_skip (read from its
    actions when first asked for), so evaluation can read whole test episodes.
    """

    def __init__(self, name, split, T, image_size, paths, source_root, skip_bad=False, frame_skip=1):
        super().__init__(name, split, T, image_size, paths, source_root, skip_bad=skip_bad,
                         action_encoding=ActionEncoding.discrete(NUM_ACTIONS[name]))
        self.frame_skip = int(frame_skip)
        self.lengths = _EpisodeLengths(self)

    def _read(self, i, rng):
        source = self.paths[i]
        actions = self._stored_actions(cached_copy(source, self.source_root))
        span = self.T * self.frame_skip
        if len(actions) < span:
            raise DatasetError(
                f"Episode {source} has {len(actions)} frames, fewer than the {span} that T={self.T} at frame_skip "
                f"{self.frame_skip} spans."
            )
        start = 0 if rng is None else int(rng.integers(0, len(actions) - span + 1))
        frames = self._raw_frames(source, len(actions), start, span)[:: self.frame_skip]
        return frames, self.action_encoding.encode(actions[start : start + span : self.frame_skip], source)

    def _stored_actions(self, path):
        """The integer action of every usable frame of an episode, frame t's first (see the module docstring)."""
        actions = _npz_array(path, "actions")
        if actions.ndim != 1 or not np.issubdtype(actions.dtype, np.integer):
            raise DatasetError(f"Episode file {path} must hold integer actions of shape [T], got {actions.dtype} {actions.shape}.")
        return actions[1:] if self.name == "minecraft" else actions

    def _raw_frames(self, source, num_actions, start, span):
        """uint8 [span x H x W x 3] frames start .. start + span - 1 of an episode with num_actions usable frames."""
        if self.name == "dmlab":
            path = cached_copy(source, self.source_root)
            video = _npz_array(path, "video")
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
                raise DatasetError(f"Episode file {path} must hold a uint8 video [T x H x W x 3], got {video.dtype} {video.shape}.")
            if len(video) != num_actions:
                raise DatasetError(f"Episode file {path} has {len(video)} frames but {num_actions} actions; it needs one per frame.")
            return video[start : start + span]
        if not source.with_suffix(".mp4").is_file():
            raise DatasetError(f"Episode {source} has no video {source.with_suffix('.mp4').name} beside it.")
        mp4 = cached_copy(source.with_suffix(".mp4"), self.source_root)
        try:
            frames = read_ffmpeg(mp4, start, span)
        except Exception as e:
            raise DatasetError(f"Could not read video file {mp4} ({one_line(e)}).") from e
        if len(frames) < span:
            raise DatasetError(
                f"Video file {mp4} ended after {start + len(frames)} frames, but its actions file {source.name} has "
                f"actions for {num_actions} frames; it needs one frame per action."
            )
        return frames


class _EpisodeLengths:
    """Frames each episode can give at the dataset's frame_skip, read lazily from its actions."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._known = {}

    def __len__(self):
        return len(self.dataset.paths)

    def __getitem__(self, i):
        if i not in self._known:
            path = cached_copy(self.dataset.paths[i], self.dataset.source_root)
            self._known[i] = len(self.dataset._stored_actions(path)) // self.dataset.frame_skip
        return self._known[i]


def _npz_array(path, key):
    """Array `key` of the .npz episode file at `path`; a missing key or unreadable file is one DatasetError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data[key])
    except KeyError:
        raise DatasetError(f"Episode file {path} has no {key!r} array.") from None
    except Exception as e:
        raise DatasetError(f"Could not read episode file {path} ({one_line(e)}).") from e
