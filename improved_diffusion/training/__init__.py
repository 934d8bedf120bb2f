"""Training: frame masks and per-frame noise levels, the data-parallel TrainLoop, crash-safe checkpoints.

    config.py           TrainConfig: every training flag, its default, help and checks
    frame_masks.py      one training example: observed / latent frames and per-frame timesteps (noise modes)
    timestep_sampler.py the timestep distribution (uniform or loss-aware) and its importance weights
    randomness.py       every random draw keyed by (seed, step, example); global RNG state kept around measurements
    batches.py          a rank's training batch of examples, and the training loss of a batch
    gradients.py        fp16 loss scaling, the gradients' finiteness check and global norm
    ema.py              the EMA update, and the model / state dict holding EMA weights
    memory.py           the process's peak memory, for the log
    checkpoint_io.py    crash-safe checkpoint files: atomic writes, complete steps, reading a step back
    validation.py       measurements during training: val_loss on fixed clips, evaluation by sampling
    keep_best.py        the figures --keep_best can track and the checkpoint of the best value so far
    train_loop.py       TrainLoop: the steps, logging, measurements, saving and exact resume
    launch.py           one run from the command line's values (scripts/video_train.py)
"""
