import numpy as np
import pytest

from improved_diffusion.data import bouncing_balls
from improved_diffusion.data.bouncing_balls import make_video


def bright_centroid(frame):
    """Centre of mass (x, y) of the non-black pixels of an [H x W x 3] frame."""
    weight = frame.astype(np.float64).sum(-1)
    ys, xs = np.indices(weight.shape)
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


def test_shape_dtype_and_range():
    video = make_video("train", 0, T=12, image_size=32)
    assert video.shape == (12, 32, 32, 3)
    assert video.dtype == np.uint8
    assert video.max() > 200  # balls are bright and saturated
    assert video.min() == 0  # background is black


def test_other_sizes():
    assert make_video("test", 3, T=5, image_size=64).shape == (5, 64, 64, 3)
    assert make_video("test", 3, T=1, image_size=16).shape == (1, 16, 16, 3)


def test_deterministic():
    np.testing.assert_array_equal(make_video("train", 7, seed=3, T=20), make_video("train", 7, seed=3, T=20))
    assert not np.array_equal(make_video("train", 7, seed=3, T=20), make_video("train", 7, seed=4, T=20))
    assert not np.array_equal(make_video("train", 7, T=20), make_video("train", 8, T=20))


def test_prefix_consistent():
    """A shorter video is the start of the longer one, so T never changes the content."""
    np.testing.assert_array_equal(make_video("test", 2, T=10), make_video("test", 2, T=30)[:10])


def test_start_is_a_window():
    np.testing.assert_array_equal(make_video("train", 4, T=8, start=37), make_video("train", 4, T=45)[37:])


def test_splits_disjoint():
    test_videos = [make_video("test", i, T=4).tobytes() for i in range(bouncing_balls.NUM_VIDEOS["test"])]
    train_videos = {make_video("train", i, T=4).tobytes() for i in range(300)}
    assert len(set(test_videos)) == len(test_videos)
    assert not train_videos.intersection(test_videos)


def test_unknown_split_and_negative_index():
    with pytest.raises(ValueError, match="split"):
        make_video("valid", 0)
    with pytest.raises(ValueError, match="index"):
        make_video("train", -1)


@pytest.mark.parametrize("index", range(10))
def test_balls_move_within_eight_frames(index):
    video = make_video("train", index, T=8)
    shift = np.linalg.norm(bright_centroid(video[-1]) - bright_centroid(video[0]))
    assert shift > 1.0


def test_balls_stay_inside_frame():
    """Trajectories are long enough to bounce many times; a ball never leaves the frame."""
    rng = bouncing_balls.video_rng("train", 0)
    size, radius = 32, 4.0
    centres = bouncing_balls.ball_trajectories(rng, 500, size, 2, radius, (1.0, 2.0))
    assert centres.min() >= radius - 1e-9
    assert centres.max() <= size - radius + 1e-9
    # Something bounced: the velocity sign flips at least once per axis.
    steps = np.diff(centres, axis=0)
    assert (np.sign(steps[1:]) != np.sign(steps[:-1])).any(axis=0).all()


def test_bounce_keeps_speed():
    """Elastic bounce: the distance moved per frame stays constant (up to one frame straddling a wall)."""
    rng = bouncing_balls.video_rng("test", 5)
    centres = bouncing_balls.ball_trajectories(rng, 200, 32, 1, 4.0, (1.5, 1.5))
    per_axis = np.abs(np.diff(centres[:, 0], axis=0))
    # Away from a wall, |dx| and |dy| are constant; near one they can only be smaller.
    assert per_axis.max(axis=0) == pytest.approx(np.median(per_axis, axis=0), abs=1e-9)
    assert np.linalg.norm(np.median(per_axis, axis=0)) == pytest.approx(1.5)


def test_brightness_constant_over_time():
    """Balls never leave the frame, so total colour stays the same unless they overlap."""
    video = make_video("train", 1, num_balls=1, T=200).astype(np.float64)
    totals = video.sum(axis=(1, 2, 3))
    assert totals.std() / totals.mean() < 0.03


def test_distinct_colours():
    palette = {tuple(c) for c in bouncing_balls.PALETTE.astype(np.uint8)}
    for index in range(20):
        pixels = make_video("train", index, num_balls=2, T=30).reshape(-1, 3)
        used = {tuple(c) for c in np.unique(pixels, axis=0)} & palette
        assert len(used) == 2  # two balls, two different palette colours
