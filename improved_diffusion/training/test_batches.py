"""Training batches: each example a function of (seed, step, global example index) alone, zero-padded
frames, actions that travel with their frames and conditions dropped per example."""

import pytest
import torch

from improved_diffusion.training.batches import training_batch


# ----------------------------------------------------------------------------- per-example randomness


def random_videos(n, seed):
    return torch.rand(n, 10, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("noise_mode", ["fdm", "diffusion_forcing", "mixed"])
def test_an_example_does_not_depend_on_how_the_batch_is_split(noise_mode):
    videos, pads = random_videos(4, 0), random_videos(4, 1)
    kwargs = dict(seed=3, step=7, max_frames=4, noise_mode=noise_mode, num_timesteps=100)
    whole = training_batch(videos, pads, first_index=0, **kwargs)
    halves = [training_batch(videos[:2], pads[:2], first_index=0, **kwargs),
              training_batch(videos[2:], pads[2:], first_index=2, **kwargs)]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves])), key
    other_step = training_batch(videos, pads, first_index=0, **{**kwargs, "step": 8})
    assert not torch.equal(whole["noise"], other_step["noise"])


def test_examples_without_padding_frames_are_zero_padded_to_a_common_length():
    videos = random_videos(6, 0)
    batch = training_batch(videos, None, first_index=0, seed=0, step=0, max_frames=4, noise_mode="fdm",
                           num_timesteps=100)
    K = batch["x"].shape[1]
    chosen = (batch["obs_mask"] + batch["latent_mask"]).view(6, K)
    for b in range(6):
        alone = training_batch(videos[b: b + 1], None, first_index=b, seed=0, step=0, max_frames=4,
                               noise_mode="fdm", num_timesteps=100)
        n = alone["x"].shape[1]
        assert torch.equal(batch["x"][b, :n], alone["x"][0]) and torch.equal(batch["noise"][b, :n], alone["noise"][0])
        assert chosen[b, n:].sum() == 0 and batch["x"][b, n:].abs().sum() == 0


# ----------------------------------------------------------------------------- conditions


def labelled_videos(n, first_id, T=10):
    """Videos whose every pixel is 100 * video id + frame index, and actions (that value, frame index)."""
    ids = torch.arange(first_id, first_id + n, dtype=torch.float32)[:, None]
    value = 100 * ids + torch.arange(T, dtype=torch.float32)[None, :]  # [n x T]
    videos = value[:, :, None, None, None].expand(n, T, 3, 4, 4).clone()
    actions = torch.stack([value, torch.arange(T, dtype=torch.float32).expand(n, T)], dim=-1)
    return videos, actions


@pytest.mark.parametrize("noise_mode", ["fdm", "diffusion_forcing", "mixed"])
@pytest.mark.parametrize("padded", [True, False])
def test_actions_travel_with_their_frames_in_training_batches(noise_mode, padded):
    """Each slot's vector is its frame's, padding frames from another video included."""
    videos, actions = labelled_videos(4, 0)
    pads, pad_actions = labelled_videos(4, 10)
    batch = training_batch(videos, pads if padded else None, first_index=0, seed=1, step=3, max_frames=4,
                           noise_mode=noise_mode, num_timesteps=100, actions=actions,
                           pad_actions=pad_actions if padded else None)
    assert torch.equal(batch["cond"][..., 0], batch["x"][:, :, 0, 0, 0])
    assert torch.equal(batch["cond"][..., 1], batch["frame_indices"].float())
    in_model = (batch["obs_mask"] + batch["latent_mask"]).view(4, -1) > 0
    if padded and noise_mode != "diffusion_forcing":
        assert (~in_model).any() and (batch["x"][:, :, 0, 0, 0][~in_model] >= 1000).all()  # from the pad videos
    # Actions change nothing else.
    plain = training_batch(videos, pads if padded else None, first_index=0, seed=1, step=3, max_frames=4,
                           noise_mode=noise_mode, num_timesteps=100)
    assert set(batch) - set(plain) == {"cond"} and all(torch.equal(plain[k], batch[k]) for k in plain)


def test_conditions_are_dropped_per_example_from_its_own_generator():
    videos, actions = labelled_videos(8, 0)
    pads, pad_actions = labelled_videos(8, 10)
    kwargs = dict(seed=2, step=5, max_frames=4, noise_mode="mixed", num_timesteps=100)
    labels = torch.arange(8) % 3
    whole = training_batch(videos, pads, first_index=0, actions=actions, pad_actions=pad_actions, labels=labels,
                           cond_drop_prob=0.5, **kwargs)
    halves = [training_batch(videos[:4], pads[:4], first_index=0, actions=actions[:4], pad_actions=pad_actions[:4],
                             labels=labels[:4], cond_drop_prob=0.5, **kwargs),
              training_batch(videos[4:], pads[4:], first_index=4, actions=actions[4:], pad_actions=pad_actions[4:],
                             labels=labels[4:], cond_drop_prob=0.5, **kwargs)]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves])), key
    assert whole["drop_cond"].dtype == torch.bool and 0 < int(whole["drop_cond"].sum()) < 8
    assert torch.equal(whole["y"], labels)
    kept = training_batch(videos, pads, first_index=0, actions=actions, pad_actions=pad_actions, labels=labels,
                          **kwargs)
    assert "drop_cond" not in kept and all(torch.equal(kept[k], whole[k]) for k in kept)  # masks, t, noise unchanged
    # About a fraction p of many examples is dropped.
    many = torch.cat([training_batch(videos, None, first_index=0, actions=actions, cond_drop_prob=0.1,
                                     **{**kwargs, "step": s})["drop_cond"] for s in range(40)])
    assert 0.04 < many.float().mean() < 0.18
