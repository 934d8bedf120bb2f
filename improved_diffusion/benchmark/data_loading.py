"""How long training waits for data: a folder of mp4 clips against its shard cache (scripts/bench_data.py).

For each image size the folder's train split is cached (data.shard_writer.write_cache); then
train_batches are timed from the folder and from the cache, with each number of reader threads
and the default read-ahead. Two numbers per row, medians over repetitions: seconds per batch when
nothing else runs (the loader's throughput), and seconds a training step of `step_s` seconds
(simulated by sleeping) waits for its batch (what read-ahead leaves of the reading time).
"""

import statistics
import tempfile
import time
from pathlib import Path

from ..data import bouncing_balls
from ..data.batches import train_batches
from ..data.datasets import get_dataset
from ..data.shard_writer import write_cache


def make_clips(folder, clips, frames, size):
    """Bouncing-ball clips as mp4 files (the codec imageio-ffmpeg ships), like a user's own folder."""
    import imageio_ffmpeg  # optional dependency (ffmpeg): only clips made here need it

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        path = folder / f"{i}.mp4"
        if path.exists():
            continue
        writer = imageio_ffmpeg.write_frames(str(path), (size, size), fps=10, quality=8, macro_block_size=1)
        writer.send(None)
        for frame in bouncing_balls.make_video("train", i, T=frames, image_size=size):
            writer.send(frame)
        writer.close()
    return folder


def time_batches(dataset, batch_size, reps, batches_per_rep, workers, step_s):
    """Median over reps of the seconds per batch spent in next(), a step of step_s seconds between calls."""
    batches = train_batches(dataset, batch_size, seed=0, num_workers=workers)
    next(batches)  # threads started, files opened
    per_rep = []
    for _ in range(reps):
        waited = 0.0
        for _ in range(batches_per_rep):
            if step_s:
                time.sleep(step_s)
            start = time.perf_counter()
            next(batches)
            waited += time.perf_counter() - start
        per_rep.append(waited / batches_per_rep)
    batches.close()
    return statistics.median(per_rep)


def compare_sources(folder=None, work_dir=None, clips=64, frames=32, clip_size=64, image_sizes=(16, 64),
                    workers=(0, 1), batch_size=8, T=8, reps=5, batches=2, step_s=0.1, log=None):
    """Print one row per (source, image size, reader threads): s/batch and wait/step (see above).

    folder: a folder of videos (None: make bouncing-ball mp4 clips, `clips` x `frames` frames of
    `clip_size` pixels); work_dir: where the clips and caches go (None: a temporary folder); log:
    called with each line (None: print, flushed).
    """
    log = log or (lambda line: print(line, flush=True))
    work = Path(work_dir or tempfile.mkdtemp(prefix="bench_data-"))
    folder = Path(folder) if folder else make_clips(work / "clips", clips, frames, clip_size)
    log(f"folder {folder}: batch {batch_size} x T {T}, median of {reps} x {batches} batches, "
        f"wait/step with a {step_s} s step")
    log(f"{'source':<7} {'size':>4} {'workers':>7} {'s/batch':>9} {'wait/step':>9}")
    for size in image_sizes:
        cache = work / f"cache-{size}"
        start = time.perf_counter()
        write_cache(folder, cache, splits=("train",), image_size=size)
        cache_s = time.perf_counter() - start
        sources = {"mp4": get_dataset(str(folder), T=T, image_size=size), "cache": get_dataset(str(cache), T=T)}
        for name, dataset in sources.items():
            for w in workers:
                throughput = time_batches(dataset, batch_size, reps, batches, w, 0.0)
                wait = time_batches(dataset, batch_size, reps, batches, w, step_s)
                log(f"{name:<7} {size:>4} {w:>7} {throughput:>9.4f} {wait:>9.4f}")
        log(f"(caching the {len(sources['mp4'])} train clips at size {size} took {cache_s:.1f} s)")
