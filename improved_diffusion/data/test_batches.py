"""Training batches (batches.py): sharding, determinism, resuming, reader threads and read-ahead."""

import gc
import threading
import time

import numpy as np
import pytest
import torch

from improved_diffusion.data.batches import batch_plan, train_batches
from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.data.sources import VideoDataset
from improved_diffusion.data.test_datasets import make_npy_dataset, video_ids
from improved_diffusion.errors import DatasetError


# ---------------------------------------------------------------------------
# train_batches: sharding, determinism, resuming
# ---------------------------------------------------------------------------


def test_train_batches_shapes_and_resume():
    dataset = get_dataset("bouncing_balls", T=4, image_size=16)
    first = train_batches(dataset, batch_size=3, seed=7)
    batches = [next(first) for _ in range(5)]
    assert batches[0].shape == (3, 4, 3, 16, 16)
    resumed = train_batches(dataset, batch_size=3, seed=7, start_step=3)
    torch.testing.assert_close(next(resumed), batches[3])
    torch.testing.assert_close(next(resumed), batches[4])
    other_seed = next(train_batches(dataset, batch_size=3, seed=8))
    assert not torch.equal(other_seed, batches[0])


def test_shards_disjoint_and_epochs_cover(tmp_path):
    make_npy_dataset(tmp_path, "minerl_navigate-torch", {"train": 10, "test": 1})
    dataset = get_dataset("minerl", T=6, data_root=tmp_path)
    seen = {}
    for rank in range(3):
        batches = train_batches(dataset, batch_size=2, seed=0, rank=rank, world_size=3)
        seen[rank] = [i for _ in range(6) for i in video_ids(next(batches))]
    for rank in range(3):
        assert set(seen[rank]) == set(range(rank, 10, 3))  # exactly this rank's shard
    # Every epoch visits each video of the shard once (rank 0's shard has 4 videos).
    assert sorted(seen[0][:4]) == [0, 3, 6, 9] and sorted(seen[0][4:8]) == [0, 3, 6, 9]


def test_threads_give_same_batches(tmp_path):
    make_npy_dataset(tmp_path, "gqn_mazes-torch", {"train": 5, "test": 1}, T=9)
    dataset = get_dataset("mazes_cwvae", T=4, data_root=tmp_path)
    plain = train_batches(dataset, batch_size=4, seed=1)
    threaded = train_batches(dataset, batch_size=4, seed=1, num_workers=3)
    for _ in range(3):
        torch.testing.assert_close(next(plain), next(threaded))


def test_batches_are_a_function_of_the_step_whatever_the_threads():
    """Steps 0..5 are the same with or without reader threads and read-ahead, and a resume at step 3 continues them."""
    dataset = get_dataset("bouncing_balls_actions", T=4, image_size=8)

    def steps(n, **options):
        batches = train_batches(dataset, batch_size=3, seed=5, with_actions=True, **options)
        taken = [next(batches) for _ in range(n)]
        batches.close()
        return taken

    reference = steps(6, num_workers=0, prefetch=0)
    for options in ({"num_workers": 0}, {"num_workers": 4}, {"num_workers": 4, "prefetch": 0}, {"prefetch": 5}):
        for (videos, actions), (ref_videos, ref_actions) in zip(steps(6, **options), reference):
            assert torch.equal(videos, ref_videos) and torch.equal(actions, ref_actions), options
    for num_workers in (0, 4):
        resumed = steps(3, start_step=3, num_workers=num_workers)
        for (videos, actions), (ref_videos, ref_actions) in zip(resumed, reference[3:]):
            assert torch.equal(videos, ref_videos) and torch.equal(actions, ref_actions)


def _reader_threads(besides=()):
    """The prefetch threads alive now, but for `besides` (those of other tests' streams still in use)."""
    return [t for t in threading.enumerate() if t.name.startswith("train_batches-") and t not in besides]


class _RecordingDataset(VideoDataset):
    """Numbered videos that note which ones were read, and fail on video `bad`."""

    def __init__(self, count, bad=None):
        super().__init__("recording", "train", 2, 4)
        self.count, self.bad, self.read = count, bad, []

    def __len__(self):
        return self.count

    def frames(self, index, rng=None):
        if index == self.bad:
            raise DatasetError(f"Video {index} is broken.")
        self.read.append(index)
        return np.full((2, 4, 4, 3), index, np.uint8)


def test_prefetch_reads_ahead_and_stops_when_closed():
    others = _reader_threads()
    dataset = _RecordingDataset(count=64)
    batches = train_batches(dataset, batch_size=2, seed=0, num_workers=2, prefetch=3)
    next(batches)
    deadline = time.monotonic() + 30
    while len(dataset.read) < 2 * 4 and time.monotonic() < deadline:  # step 0 and three steps ahead
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(dataset.read) == 2 * 4, "not exactly the next 3 batches were read while the consumer was busy"
    assert _reader_threads(others)
    batches.close()
    assert not _reader_threads(others)
    # A generator dropped without close() stops its thread too.
    batches = train_batches(dataset, batch_size=2, seed=0)
    next(batches)
    del batches
    gc.collect()
    assert not _reader_threads(others)


def test_prefetch_raises_a_read_error_at_its_step():
    others = _reader_threads()
    dataset = _RecordingDataset(count=4, bad=2)
    order = [int(batch_plan(4, 1, seed=0, step=s)[0][0]) for s in range(4)]
    batches = train_batches(dataset, batch_size=1, seed=0, prefetch=2)
    for step in range(order.index(2)):  # the steps before it arrive intact
        assert video_ids(next(batches)) == [order[step]]
    with pytest.raises(DatasetError, match="Video 2 is broken"):
        next(batches)
    assert not _reader_threads(others)


def test_too_many_ranks(tmp_path):
    make_npy_dataset(tmp_path, "minerl_navigate-torch", {"train": 2, "test": 1})
    dataset = get_dataset("minerl", T=6, data_root=tmp_path)
    with pytest.raises(DatasetError, match="too few"):
        next(train_batches(dataset, batch_size=1, seed=0, rank=2, world_size=3))
