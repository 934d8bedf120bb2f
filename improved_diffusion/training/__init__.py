"""Training: frame masks and per-frame noise levels, the data-parallel TrainLoop, crash-safe checkpoints."""
