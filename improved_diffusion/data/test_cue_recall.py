import numpy as np
import pytest
import torch

from improved_diffusion.data import cue_recall as cr


def channels_first(videos):
    """[... x T x H x W x C] -> [... x T x C x H x W], the layout cue_recall reads."""
    return np.moveaxis(videos, -1, -3)


def test_make_video_shape_and_determinism():
    v = cr.make_video("train", 3, seed=1)
    assert v.shape == (cr.DEFAULT_T, cr.DEFAULT_IMAGE_SIZE, cr.DEFAULT_IMAGE_SIZE, 3)
    assert v.dtype == np.uint8
    np.testing.assert_array_equal(v, cr.make_video("train", 3, seed=1))
    assert not np.array_equal(v, cr.make_video("train", 4, seed=1))
    assert not np.array_equal(v, cr.make_video("train", 3, seed=2))
    assert not np.array_equal(v, cr.make_video("test", 3, seed=1))
    big = cr.make_video("test", 0, T=40, image_size=64)
    assert big.shape == (40, 64, 64, 3)


def test_cue_schedule():
    assert cr.CUE_RETURN - cr.CUE_VISIBLE > 8  # hidden for longer than the 8-frame windows it targets
    top, bottom, left, right = cr.cue_box(cr.DEFAULT_IMAGE_SIZE)
    for index in range(10):
        v = cr.make_video("test", index)
        colour = cr.PALETTE[cr.cue_colour_index("test", index)]
        patch = v[:, top:bottom, left:right]
        assert np.all(patch[:cr.CUE_VISIBLE] == colour)
        assert np.all(patch[cr.CUE_RETURN:] == colour)
        hidden = patch[cr.CUE_VISIBLE:cr.CUE_RETURN]
        assert not np.any(np.all(hidden == colour, axis=-1))  # the cue colour never shows while hidden


def test_ball_moves():
    v = cr.make_video("train", 0).astype(int)
    frame_changes = np.abs(np.diff(v, axis=0)).sum(axis=(1, 2, 3))
    # Every step moves the ball, not only the cue switching on and off.
    assert np.all(frame_changes > 0)


def test_colours_cover_palette():
    colours = [cr.cue_colour_index("train", i) for i in range(200)]
    counts = np.bincount(colours, minlength=cr.NUM_COLOURS)
    assert np.all(counts > 25)


def test_ground_truth_scores_one():
    videos = channels_first(cr.make_videos("test", 40))
    result = cr.cue_recall(videos)
    assert result["recall"] == 1.0 and result["shown"] == 1.0
    assert result["n_videos"] == 40
    assert result["chance"] == pytest.approx(1 / cr.NUM_COLOURS)
    assert result["start_colours"] == [cr.cue_colour_index("test", i) for i in range(40)]
    # Float videos in [-1, 1] (the package convention) and tensors give the same answer.
    as_float = torch.from_numpy(videos).float() / 127.5 - 1
    assert cr.cue_recall(as_float)["start_colours"] == result["start_colours"]


def test_shuffled_return_colour_scores_chance():
    n = 400
    rng = np.random.default_rng(0)
    videos = cr.make_videos("train", n)
    top, bottom, left, right = cr.cue_box(cr.DEFAULT_IMAGE_SIZE)
    new_colours = rng.integers(cr.NUM_COLOURS, size=n)  # different or same, uniformly
    for video, c in zip(videos, new_colours):
        video[cr.CUE_RETURN:, top:bottom, left:right] = cr.PALETTE[c]
    result = cr.cue_recall(channels_first(videos))
    original = np.array([cr.cue_colour_index("train", i) for i in range(n)])
    assert result["return_colours"] == new_colours.tolist()
    assert result["matches"] == (original == new_colours).tolist()
    # Binomial(400, 1/4): standard deviation 0.022.
    assert abs(result["recall"] - 1 / cr.NUM_COLOURS) < 0.08
    assert result["shown"] == 1.0 and result["recall_when_shown"] == result["recall"]


def test_a_cue_that_does_not_return_is_never_a_match():
    videos = channels_first(cr.make_videos("test", 40))
    top, bottom, left, right = cr.cue_box(cr.DEFAULT_IMAGE_SIZE)
    videos[:20, cr.CUE_RETURN:, :, top:bottom, left:right] = cr.BACKGROUND[None, :, None, None]
    result = cr.cue_recall(videos)
    assert result["return_colours"][:20] == [cr.NO_CUE] * 20
    assert result["matches"] == [False] * 20 + [True] * 20
    assert result["recall"] == 0.5 and result["shown"] == 0.5 and result["recall_when_shown"] == 1.0
    # Near-background noise is still "no cue", and the start colour is read as before.
    dim = videos[:20].astype(np.float64) + np.random.default_rng(2).normal(0, 10, videos[:20].shape)
    assert cr.cue_recall(np.clip(dim, 0, 255).astype(np.uint8))["shown"] == 0.0


def test_per_video_results_are_deterministic():
    videos = channels_first(cr.make_videos("test", 12, seed=3))
    videos[::3, cr.CUE_RETURN:] = 0  # some videos lose their cue (and the ball)
    a, b = cr.cue_recall(videos), cr.cue_recall(videos.copy())
    assert a == b
    assert cr.cue_recall(videos[5:6])["matches"] == [a["matches"][5]]


def test_noisy_samples_still_classified():
    # Blur-like noise of a sampler must not flip well-separated colours.
    videos = channels_first(cr.make_videos("test", 20)).astype(np.float64)
    noisy = np.clip(videos + np.random.default_rng(1).normal(0, 25, videos.shape), 0, 255).astype(np.uint8)
    assert cr.cue_recall(noisy)["recall"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="longer than CUE_RETURN"):
        cr.make_video("train", 0, T=cr.CUE_RETURN)
    with pytest.raises(ValueError, match="non-negative"):
        cr.make_video("train", -1)
    short = channels_first(cr.make_videos("train", 2))[:, :cr.CUE_RETURN]
    with pytest.raises(ValueError, match="longer than return_frame"):
        cr.cue_recall(short)
    with pytest.raises(ValueError, match=r"\[T x C x H x W\]"):
        cr.cue_recall(cr.make_videos("train", 2))  # channels last
