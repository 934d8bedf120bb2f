"""Datasets: the registry, loaders of B x T x C x H x W videos in [-1, 1], and the embedded procedural datasets."""
