"""
Training batches: any dataset as an endless, sharded, exactly reproducible stream of
float32 [B x T x C x H x W] batches (`train_batches`).

The batch of step s is a function of (dataset, batch size, seed, s, rank, world size) only, so
a resumed run sees exactly the batches an uninterrupted one would, whatever the reader threads.
"""

import functools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import DatasetError


def shard_indices(num_videos, rank=0, world_size=1):
    """Videos of one rank: every world_size-th, so shards are disjoint and cover the dataset."""
    return np.arange(rank, num_videos, world_size)


def batch_plan(num_in_shard, batch_size, seed, step, rank=0):
    """
    Positions in the shard and per-video generators for training step `step`.

    The shard is visited in a fresh random order every epoch (an epoch's order is a
    function of seed, rank and epoch number), so each video is seen once per
    epoch; nothing depends on earlier steps.
    """
    positions = step * batch_size + np.arange(batch_size)
    epochs = positions // num_in_shard
    chosen = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, rank, int(epoch), 0x5EED]).permutation(num_in_shard)
        mask = epochs == epoch
        chosen[mask] = order[positions[mask] % num_in_shard]
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, rank, step]).spawn(batch_size)]
    return chosen, rngs


def read_batch(dataset, shard, batch_size, seed, rank, step, pool=None, with_actions=False):
    """The batch of training step `step` (see train_batches); pool: a thread pool to read its videos in."""
    positions, rngs = batch_plan(len(shard), batch_size, seed, step, rank)
    indices = [int(shard[p]) for p in positions]
    read = dataset.video_and_actions if with_actions else dataset.video
    clips = [read(i, r) for i, r in zip(indices, rngs)] if pool is None else list(pool.map(read, indices, rngs))
    if not with_actions:
        return torch.stack(clips)
    videos, actions = zip(*clips)
    return torch.stack(videos), None if actions[0] is None else torch.stack(actions)


class _Prefetcher:
    """
    One background thread that reads the batches of steps start, start + 1, ... in order, at most
    `depth` of them ahead of the consumer, so reading overlaps training. Each batch is a function
    of its step only, so the stream is the same whatever the threads' timing.
    """

    def __init__(self, make_batch, start_step, depth, num_workers):
        self._queue = queue.SimpleQueue()
        self._room = threading.Semaphore(depth)  # batches that may be read before the consumer takes one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_batch, start_step, num_workers),
                                        name="train_batches-prefetch", daemon=True)
        self._thread.start()

    def _run(self, make_batch, step, num_workers):
        pool = ThreadPoolExecutor(num_workers, thread_name_prefix="train_batches-read") if num_workers > 0 else None
        try:
            while True:
                while not self._room.acquire(timeout=0.1):  # wakes up now and then to see a close
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                try:
                    self._queue.put((True, make_batch(step, pool)))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                    self._queue.put((False, e))
                    return
                step += 1
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def get(self):
        ok, value = self._queue.get()
        self._room.release()
        if not ok:
            raise value
        return value

    def close(self):
        """Stop reading ahead and wait for the thread (at most the batch it is reading)."""
        self._stop.set()
        self._thread.join()


def train_batches(dataset, batch_size, seed, rank=0, world_size=1, start_step=0, num_workers=0, with_actions=False,
                  prefetch=2):
    """
    Endless float32 [B x T x C x H x W] training batches from this rank's shard.

    The batch at step s depends only on (dataset, batch_size, seed, s, rank,
    world_size), so resuming at start_step reproduces exactly the batches an
    uninterrupted run would have seen. num_workers > 0 reads the videos of a
    batch in that many threads (same batches, just faster for files); prefetch > 0
    reads that many batches ahead in a background thread (same batches, read while the
    model trains), which stops when the generator is closed or collected.
    with_actions=True yields (videos, actions) pairs instead: the same videos, and their
    float32 [B x T x action_dim] actions (None for a dataset without actions).
    """
    shard = shard_indices(len(dataset), rank, world_size)
    if len(shard) == 0:
        raise DatasetError(
            f"Dataset {dataset.name!r} has {len(dataset)} {dataset.split} videos, too few to give each of {world_size} ranks one."
        )
    make_batch = functools.partial(read_batch, dataset, shard, batch_size, seed, rank, with_actions=with_actions)
    if prefetch > 0:
        prefetcher = _Prefetcher(make_batch, start_step, prefetch, num_workers)
        try:
            while True:
                yield prefetcher.get()
        finally:
            prefetcher.close()
        return
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    step = start_step
    try:
        while True:
            yield make_batch(step, pool)
            step += 1
    finally:
        if pool is not None:
            pool.shutdown(wait=False)
