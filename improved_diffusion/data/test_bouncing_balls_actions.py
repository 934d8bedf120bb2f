import numpy as np
import pytest

from improved_diffusion.data import bouncing_balls_actions as bba
from improved_diffusion.data.bouncing_balls import DEFAULT_RADIUS
from improved_diffusion.data.datasets import get_dataset


def white_centroid(frame):
    """Centre (x, y) of the pure-white pixels of an [H x W x 3] frame (the controlled ball's core)."""
    ys, xs = np.nonzero((frame >= 250).all(-1))
    return np.array([xs.mean(), ys.mean()]) + 0.5


def test_shapes_and_ranges():
    frames, actions = bba.make_video_and_actions("train", 0, T=12, image_size=32)
    assert frames.shape == (12, 32, 32, 3) and frames.dtype == np.uint8
    assert actions.shape == (12,) and actions.dtype == np.int64
    assert set(actions.tolist()) <= set(range(bba.NUM_ACTIONS))
    np.testing.assert_array_equal(bba.make_video("train", 0, T=12), frames)


def test_deterministic_per_split_index_seed():
    a = bba.make_video_and_actions("train", 5, seed=2, T=20)
    b = bba.make_video_and_actions("train", 5, seed=2, T=20)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in (("train", 5, 3), ("train", 6, 2), ("test", 5, 2)):
        c = bba.make_video_and_actions(other[0], other[1], seed=other[2], T=20)
        assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_start_is_a_window():
    frames, actions = bba.make_video_and_actions("train", 4, T=45)
    window = bba.make_video_and_actions("train", 4, T=8, start=37)
    np.testing.assert_array_equal(window[0], frames[37:])
    np.testing.assert_array_equal(window[1], actions[37:])


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_each_action_moves_the_white_ball_one_step_its_way(image_size):
    """The dynamics, read back from pixels: a_t moves the white ball from frame t to t + 1 by STEP * direction."""
    for index in range(6):
        frames, actions = bba.make_video_and_actions("test", index, T=40, image_size=image_size, num_other_balls=0)
        centres = np.array([white_centroid(f) for f in frames])
        moves = np.diff(centres, axis=0)
        np.testing.assert_allclose(moves, bba.step_pixels(image_size) * bba.DIRECTIONS[actions[:-1]], atol=1e-9)


def test_given_actions_that_push_out_stop_at_the_wall():
    radius = DEFAULT_RADIUS * 32
    path = bba.controlled_path([radius + 1, 16.0], [bba.LEFT, bba.LEFT, bba.RIGHT, bba.NONE], 32)
    np.testing.assert_allclose(path, [[radius + 1, 16], [radius, 16], [radius, 16], [radius + 2, 16]])


def test_generated_actions_turn_back_at_walls():
    """Every stored action moves the ball a full step: summed without clipping, the path stays inside."""
    size = 32
    lo, hi = DEFAULT_RADIUS * size, size - DEFAULT_RADIUS * size
    reached_a_wall = 0
    for index in range(30):
        frames, actions = bba.make_video_and_actions("train", index, T=100, num_other_balls=0)
        steps = bba.step_pixels(size) * bba.DIRECTIONS[actions[:-1]]
        free = white_centroid(frames[0]) + np.concatenate([[[0, 0]], np.cumsum(steps, 0)])
        assert (free >= lo - 1e-9).all() and (free <= hi + 1e-9).all()
        reached_a_wall += bool((free < lo + bba.step_pixels(size)).any() or (free > hi - bba.step_pixels(size)).any())
    assert reached_a_wall >= 10  # the turning back is exercised


def test_actions_persist_and_cover_all_five():
    actions = np.concatenate([bba.make_video_and_actions("train", i, T=100)[1] for i in range(50)])
    frequencies = np.bincount(actions, minlength=5) / len(actions)
    assert frequencies.min() > 0.15  # about uniform
    runs = np.diff(np.flatnonzero(np.diff(actions) != 0))
    assert runs.mean() > 3  # motion lasts several frames, so it is visible


def test_white_is_reserved_for_the_controlled_ball():
    assert not any(np.array_equal(c, bba.CONTROLLED_COLOUR) for c in bba.OTHER_COLOURS)
    for index in range(10):
        frames, _ = bba.make_video_and_actions("train", index, T=10, num_other_balls=2)
        white = (frames >= 250).all(-1).sum(axis=(1, 2))
        assert (white > 0).all() and (white <= np.pi * (DEFAULT_RADIUS * 32) ** 2).all()


def test_registered_with_one_hot_actions():
    dataset = get_dataset("bouncing_balls_actions", T=8)
    assert (dataset.T, dataset.image_size, len(dataset), dataset.action_dim, dataset.num_actions) == (8, 32, 10_000, 5, 5)
    frames, actions = dataset.frames_and_actions(11)
    expected_frames, expected_actions = bba.make_video_and_actions("train", 11, T=8)
    np.testing.assert_array_equal(frames, expected_frames)
    np.testing.assert_array_equal(actions, np.eye(5)[expected_actions])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        bba.make_video_and_actions("valid", 0)
    with pytest.raises(ValueError, match="num_other_balls"):
        bba.make_video_and_actions("train", 0, num_other_balls=9)
    with pytest.raises(ValueError, match="no room"):
        bba.make_video_and_actions("train", 0, image_size=32, radius=0.45)
