"""Training batches and their loss: what one optimizer step trains on, and the one definition of the loss.

A batch is made per example (frame masks, per-frame timesteps, noise; frame_masks.py) from the
example's own generators (randomness.py), then collated; `example_losses` is the training loss of
such a batch, which validation.py evaluates on fixed clips too.

Conditions: `data(step)` may return (videos, actions, labels) instead of videos, actions being
[2B x T x D] per-frame vectors (or None) and labels [2B] class labels (or None). Actions are
gathered with the frames' indices (frame_masks.py); labels go with their video. With
cond_drop_prob p > 0 each example's conditions are replaced by the model's null ones with
probability p, drawn from the example's own generator after its masks, so a resumed run repeats it.
"""

import torch

from .frame_masks import training_example
from .randomness import example_generators
from .timestep_sampler import importance_weights


def collate(examples):
    """Stack per-example dicts of [1 x K_i x ...] tensors, zero-padding the frame axis to the largest K_i.

    Zero frames in neither mask are padding frames: the model keeps them apart from the
    real ones (they only attend to each other) and the loss ignores them.
    """
    K = max(ex["x"].shape[1] for ex in examples)
    batch = {}
    for key in examples[0]:
        parts = []
        for ex in examples:
            value = ex[key]
            if value.dim() >= 2 and value.shape[1] < K:
                pad = torch.zeros(1, K - value.shape[1], *value.shape[2:], dtype=value.dtype)
                value = torch.cat([value, pad], dim=1)
            parts.append(value)
        batch[key] = torch.cat(parts)
    return batch


def training_batch(videos, pad_videos, first_index, seed, step, max_frames, noise_mode, num_timesteps, p=None,
                   actions=None, pad_actions=None, labels=None, cond_drop_prob=0.0, generators=None):
    """One rank's training examples: frames, masks, timesteps and noise, example j being global example first_index + j.

    videos, pad_videos: [B x T x C x H x W] (pad_videos None: no padding frames); p: the
    timestep distribution (None: uniform). Returns training_example's dict plus `noise`
    and `obs_noise` (like `x`) and `weights`, the importance weights of `t` (like `t`).
    Conditions: actions, pad_actions [B x T x D] (each slot gets its frame's vector, `cond`
    [B x K x D]), labels [B] (`y`); cond_drop_prob > 0 adds `drop_cond` [B] bool, True with that
    probability per example. Classifier-free guidance samples the unconditional branch with
    every condition of a video null at once, so conditions are dropped per video (all frames'
    vectors and the label together): exactly the input the guided sampler shows the model.
    generators: a function of the global example index giving its (numpy, torch) generators, for
    examples that are not training ones (validation.py); None: example_generators(seed, step, index).
    """
    examples = []
    for j in range(len(videos)):
        if generators is None:
            rng, torch_gen = example_generators(seed, step, first_index + j)
        else:
            rng, torch_gen = generators(first_index + j)
        pad = None if pad_videos is None else pad_videos[j: j + 1]
        example = training_example(
            videos[j: j + 1], pad, max_frames, noise_mode, num_timesteps, rng, p,
            actions=None if actions is None else actions[j: j + 1],
            pad_actions=None if actions is None or pad_actions is None else pad_actions[j: j + 1])
        example["noise"] = torch.randn(example["x"].shape, generator=torch_gen)
        example["obs_noise"] = torch.randn(example["x"].shape, generator=torch_gen)
        example["weights"] = importance_weights(example["t"], p)
        if labels is not None:
            example["y"] = torch.as_tensor(labels[j: j + 1], dtype=torch.long)
        if cond_drop_prob > 0:  # drawn after every other draw of the example: its masks are unchanged
            example["drop_cond"] = torch.tensor([bool(rng.random() < cond_drop_prob)])
        examples.append(example)
    return collate(examples)


CONDITION_KEYS = ("cond", "y", "drop_cond")  # a training batch's entries that go to the model as they are


def example_losses(network, diffusion, part, pad_with_random_frames):
    """Per-example loss terms of a training batch `part` (training_batch's dict, on the network's device).

    The one definition of the training loss, which validation.py evaluates too. Returns (terms
    {name: [B]}, loss mask [B x K x 1 x 1 x 1], per-frame terms {name: [B x K]}, trained frames
    [B x K], trained-frame count [B]).
    """
    x, t = part["x"], part["t"]
    obs_mask, latent_mask = part["obs_mask"], part["latent_mask"]
    x0 = x
    if part["noisy_obs"].any():
        # Observed frames shown slightly noisy (mixed mode): noise them to their own t.
        obs_noise = diffusion.training_noise(part["obs_noise"])
        x0 = diffusion.q_sample(x, t, obs_noise, latent_mask=part["noisy_obs"])
    # Loss on every frame that is not observed: latent and padding frames (FDM).
    loss_mask = 1 - obs_mask if pad_with_random_frames else latent_mask
    model_kwargs = {"x0": x0, "frame_indices": part["frame_indices"], "obs_mask": obs_mask,
                    "latent_mask": latent_mask, **{k: part[k] for k in CONDITION_KEYS if k in part}}
    B, K = loss_mask.shape[:2]
    # SNR loss weights (diffusion/loss_weights): clean observed frames are known; the running
    # SNR goes over the example's own frames (observed and latent), not over padding frames.
    known = (obs_mask > 0) & ~(part["noisy_obs"] > 0)
    frame_weights = diffusion.loss_frame_weights(t, K, known=known.view(B, K),
                                                 in_sequence=((obs_mask + latent_mask) > 0).view(B, K))
    frame_terms = diffusion.training_losses(network, x, t, model_kwargs, noise=part["noise"],
                                            latent_mask=loss_mask, per_frame_terms=True,
                                            frame_weights=frame_weights)
    # Each trained frame's loss times its timestep's importance weight, averaged over the
    # example's trained frames (with uniform timesteps every weight is 1).
    trained = loss_mask.view(B, K)
    weights = part["weights"].view(B, -1)
    count = trained.sum(1).clamp(min=1)
    terms = {k: (v * weights).sum(1) / count for k, v in frame_terms.items()}
    return terms, loss_mask, frame_terms, trained, count


def timestep_quarters(t, trained, num_timesteps):
    """Which quarter (0..3) of the timestep range each example's loss belongs to, [B] long.

    A per-video t is its own; a per-frame t counts as the mean t of the example's trained frames.
    """
    B = t.shape[0]
    if t.dim() == 2:
        weights = trained.view(B, -1)
        t_example = (t.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
    else:
        t_example = t.float()
    return (4 * t_example / num_timesteps).long().clamp(max=3)


def split_data(item):
    """(videos, actions, labels) of what `data(step)` returned: videos alone or a tuple of two or three."""
    if not isinstance(item, (tuple, list)):
        return item, None, None
    videos, actions, labels = (*item, None, None)[:3]
    return videos, actions, labels
