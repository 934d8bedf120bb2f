"""Per-frame actions: how stored actions become the float vectors a model is conditioned on.

A dataset with actions hands out, with each clip of T frames, a float32 [T x action_dim] array
whose row t is the action of frame t. Two kinds exist:

- discrete: stored as integers in [0, num_actions); delivered one-hot, action_dim = num_actions
  (DMLab: 3, Minecraft: 4, bouncing_balls_actions: 5);
- continuous: stored as a real [T x D] array; delivered as float32 vectors, action_dim = D,
  num_actions = None.

Row t is the action taken at frame t, which leads to frame t + 1 (the convention of the TECO
releases as Diffusion Forcing reads them, see episodes.py).

Users' own videos carry actions in a file beside each video: `<video name without its
extension>.actions.npy`, holding either T integers (discrete; num_actions is 1 + the largest
action in any actions file of the folder, so train and test agree) or a [T x D] real array
(continuous), one row per frame of the video.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError

ACTIONS_SUFFIX = ".actions.npy"


@dataclass(frozen=True)
class ActionEncoding:
    """How a dataset's stored actions are delivered: one-hot of num_actions, or D real numbers."""

    action_dim: int
    num_actions: int = None  # discrete: the one-hot width (= action_dim); None: continuous

    @classmethod
    def discrete(cls, num_actions):
        return cls(action_dim=int(num_actions), num_actions=int(num_actions))

    @classmethod
    def continuous(cls, action_dim):
        return cls(action_dim=int(action_dim))

    @property
    def is_discrete(self):
        return self.num_actions is not None

    def encode(self, stored, source):
        """float32 [T x action_dim] from stored actions ([T] integers or [T x D] reals); `source` names the file."""
        stored = np.asarray(stored)
        if self.is_discrete:
            if stored.ndim != 1 or not np.issubdtype(stored.dtype, np.integer):
                raise DatasetError(f"Actions in {source} must be a vector of integers, got {stored.dtype} with shape {stored.shape}.")
            if stored.size and (stored.min() < 0 or stored.max() >= self.num_actions):
                bad = stored[(stored < 0) | (stored >= self.num_actions)][0]
                raise DatasetError(f"Actions in {source} must lie in [0, {self.num_actions}), but it holds action {bad}.")
            return np.eye(self.num_actions, dtype=np.float32)[stored]
        if stored.ndim != 2 or stored.shape[1] != self.action_dim:
            raise DatasetError(f"Actions in {source} must have shape [T x {self.action_dim}], got {stored.shape}.")
        return stored.astype(np.float32)


def actions_path(video_path):
    """Where a user video's actions live: `clip.mp4` -> `clip.actions.npy` in the same folder."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.name[: -len(video_path.suffix)] + ACTIONS_SUFFIX)


def is_actions_file(path):
    return Path(path).name.lower().endswith(ACTIONS_SUFFIX)


def read_actions_file(path):
    """The array in a user's `.actions.npy` file: [T] integers or [T x D] reals; DatasetError otherwise."""
    try:
        stored = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f"Could not read actions file {path} ({' '.join(str(e).split())[:200]}).") from e
    integer = stored.ndim == 1 and np.issubdtype(stored.dtype, np.integer)
    real = stored.ndim == 2 and stored.shape[1] > 0 and (
        np.issubdtype(stored.dtype, np.floating) or np.issubdtype(stored.dtype, np.integer)
    )
    if not (integer or real):
        raise DatasetError(
            f"Actions file {path} must hold T integers or a [T x D] real array, got {stored.dtype} with shape {stored.shape}."
        )
    if integer and stored.size and stored.min() < 0:
        raise DatasetError(f"Actions file {path} holds the negative action {stored.min()}; actions are numbered from 0.")
    if not integer and not np.all(np.isfinite(stored)):
        raise DatasetError(f"Actions file {path} holds values that are not finite numbers.")
    return stored


def folder_encoding(files):
    """
    The one encoding of a folder's actions files (all of them, every split), or a DatasetError
    naming the first file that disagrees with the others in kind or width.
    """
    encoding, first = None, None
    largest = -1
    for path in files:
        stored = read_actions_file(path)
        this = ActionEncoding.discrete(1) if stored.ndim == 1 else ActionEncoding.continuous(stored.shape[1])
        if encoding is None:
            encoding, first = this, path
        elif this.is_discrete != encoding.is_discrete or (not this.is_discrete and this.action_dim != encoding.action_dim):
            raise DatasetError(
                f"Actions file {path} holds {_kind(stored)} but {first} holds {_kind(read_actions_file(first))}; "
                f"every actions file of a folder must have the same kind and width."
            )
        if stored.ndim == 1 and stored.size:
            largest = max(largest, int(stored.max()))
    if encoding is not None and encoding.is_discrete:
        encoding = ActionEncoding.discrete(max(largest + 1, 1))
    return encoding


def _kind(stored):
    return "integer actions" if stored.ndim == 1 else f"{stored.shape[1]}-dimensional real actions"
