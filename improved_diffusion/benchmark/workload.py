"""What every variant is measured on: the shared weights, the training batch, and a training step's FLOPs.

Built once per run, so every variant runs the same work on a copy of the same weights.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.build import ModelConfig, create_model
from ..training.batches import training_batch


def randomize_zero_parameters(model, seed):
    """Small random values for the parameters that start at zero (the output layers).

    The cost does not depend on the values, but a network whose output is exactly zero makes
    sampling degenerate (every frame the same), which a benchmark should not rely on.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def make_training_batch(bench, diffusion, device, seed):
    """A training batch as train_loop builds one (FDM's masks, padded to max_frames), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    size = bench.model["image_size"]
    videos = torch.rand(2 * bench.batch_size, 2 * bench.max_frames, 3, size, size, generator=gen) * 2 - 1
    B = bench.batch_size
    batch = training_batch(videos[:B], videos[B:], first_index=0, seed=seed, step=0, max_frames=bench.max_frames,
                           noise_mode="fdm", num_timesteps=diffusion.num_timesteps)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["loss_mask"] = 1 - batch["obs_mask"]  # latent and padding frames, as train_loop with padding
    batch["x_t"] = diffusion.q_sample(batch["x"], batch["t"], batch["noise"], latent_mask=batch["loss_mask"])
    batch["kwargs"] = {"x0": batch["x"], "frame_indices": batch["frame_indices"], "obs_mask": batch["obs_mask"],
                       "latent_mask": batch["latent_mask"]}
    return batch


def count_train_flops(bench, state, work, device):
    """FLOPs of one float32 training step's forward and backward (model FLOPs, no recomputation)."""
    model = create_model(ModelConfig(**bench.model)).to(device)
    model.load_state_dict(state)
    b = work["batch"]
    with FlopCounterMode(display=False) as counter:
        terms = work["train_diffusion"].training_losses(model, b["x"], b["t"], b["kwargs"], noise=b["noise"],
                                                        latent_mask=b["loss_mask"])
        terms["loss"].mean().backward()
    return counter.get_total_flops()
