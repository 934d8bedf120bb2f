"""Datasets: the registry, loaders of B x T x C x H x W videos in [-1, 1], and the embedded procedural datasets.

    datasets.py                the registry: named datasets, get_dataset, default_T, test_video (the front door)
    batches.py                 train_batches: the sharded, reproducible, prefetched stream of training batches
    sources.py                 VideoDataset and its two kinds: ProceduralDataset, FileDataset
    video_reader.py            reading one video file (.npy, .pt, .gif, ffmpeg), DATA_ROOT copies, to [-1, 1]
    splits.py                  which files make each split: CARLA's split files, the user's own folders
    episodes.py                DMLab and Minecraft episodes (TECO's releases, read as Diffusion Forcing does)
    shard_cache.py             shard caches: their layout, and reading one as a dataset (ShardDataset)
    shard_writer.py            writing shard caches (write_cache, scripts/cache_dataset.py)
    actions.py                 per-frame actions: their encoding and users' <name>.actions.npy files
    pixels.py                  pixel conventions: [-1, 1] floats, uint8 on disk, the [0, 255] scale of metrics
    bouncing_balls.py          procedural dataset: balls bouncing in a box
    bouncing_balls_actions.py  procedural dataset: bouncing balls, one steered by discrete actions
    cue_recall.py              procedural long-range memory benchmark and its pixel-only metric

Imports point one way: shard_writer -> datasets -> {batches, episodes, shard_cache, splits} -> sources
-> {video_reader, actions} -> pixels; the procedural datasets are imported by name (DatasetSpec.module).
"""
