"""The ground-truth test videos a sampling run continued, as uint8 frames to compare and show.

Sample `sample_<index>-<k>.npy` continues test video `index`. Which video carries that index
depends on how the dataset is built: folder datasets leave out videos shorter than T, so the
dataset must be built exactly as video_sample.py builds it (T = max(n_obs, 1)) for an index to
name the same video, and with the run's frame_skip (dmlab, minecraft) for its frames to be the
ones the model saw. Evaluation and video_make_mp4.py both read the ground truth through here.
"""

import copy

from ..data.datasets import get_dataset
from ..data.pixels import to_uint8
from ..data.video_reader import cached_copy, video_length
from ..errors import DatasetError, EvalError


def _stored_length(dataset, index):
    """Frames available in test video `index`, or None when any length can be made (procedural data)."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return int(lengths[index])
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return video_length(cached_copy(paths[index], dataset.source_root))
    return None


class GroundTruth:
    """The test videos of a sampling config, as uint8 [t x C x H x W] with t <= the frames asked for."""

    def __init__(self, config, data_root=None):
        self.config = config
        self.data_root = data_root
        # Datasets do not depend on the training seed; a sampling config may record another one.
        self.seed = int(config.get("data_seed", 0))
        self.frame_skip = int(config.get("frame_skip") or 1)
        self.dataset = self._dataset(max(int(config.get("n_obs", 0)), 1))
        self._procedural = {}  # T -> dataset: generated videos come at any length

    def _dataset(self, T):
        try:
            return get_dataset(self.config["dataset"], split="test", T=T, image_size=int(self.config["image_size"]),
                               seed=self.seed, data_root=self.data_root, frame_skip=self.frame_skip)
        except DatasetError as e:
            raise EvalError(f"The ground truth is unavailable: {e}") from None
        except KeyError as e:
            raise EvalError(f"sampling_config.json has no {e.args[0]!r} entry.") from None

    def __len__(self):
        return len(self.dataset)

    def video(self, index, T):
        """The first min(T, stored length) frames of test video `index`."""
        return to_uint8(self._read(index, T, "video")).numpy()

    def actions(self, index, T):
        """The actions [t x action_dim] (float32) of the first min(T, stored length) frames of test video `index`."""
        if getattr(self.dataset, "action_dim", None) is None:
            raise EvalError(f"Dataset {self.config['dataset']!r} has no actions.")
        return self._read(index, T, "video_and_actions")[1].numpy()

    def _read(self, index, T, method):
        if not 0 <= index < len(self.dataset):
            raise EvalError(f"Ground-truth video {index} does not exist: the test split of "
                            f"{self.config['dataset']!r} has {len(self.dataset)} videos.")
        try:
            length = _stored_length(self.dataset, index)
            if length is None:
                if T not in self._procedural:
                    self._procedural[T] = self._dataset(T)
                return getattr(self._procedural[T], method)(index)
            view = copy.copy(self.dataset)  # the same files, read up to T frames
            view.T = min(T, length)
            return getattr(view, method)(index)
        except DatasetError as e:
            raise EvalError(f"Ground-truth video {index} could not be read: {e}") from None
