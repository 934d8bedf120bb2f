import numpy as np
import pytest

from improved_diffusion.data import bouncing_balls_actions as bba
from improved_diffusion.data.bouncing_balls import render
from improved_diffusion.data.datasets import get_dataset
from improved_diffusion.evaluation.action_following import NOT_FOUND, action_following, locate_ball, observed_moves

N_VIDEOS, T = 40, 24


def ground_truth(image_size=32, n=N_VIDEOS, split="test"):
    """uint8 videos [N x T x C x H x W] of bouncing_balls_actions and their integer actions [N x T]."""
    pairs = [bba.make_video_and_actions(split, i, T=T, image_size=image_size) for i in range(n)]
    videos = np.stack([frames for frames, _ in pairs]).transpose(0, 1, 4, 2, 3)
    return videos, np.stack([actions for _, actions in pairs])


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_ground_truth_follows_its_actions(image_size):
    """Measured: 1.0 at 16, 32 and 64 px (every ball found, every move read right); required >= 0.95."""
    videos, actions = ground_truth(image_size)
    result = action_following(videos, actions)
    assert result["score"] >= 0.95
    assert result["found"] == 1.0
    assert result["n_transitions"] == N_VIDEOS * (T - 1)
    assert min(result["per_video"]) >= 0.9


def test_shuffled_actions_score_chance():
    """Actions shuffled across videos and time: measured 0.209 against chance 0.202 (about 1/5)."""
    videos, actions = ground_truth()
    shuffled = np.random.default_rng(0).permutation(actions.reshape(-1)).reshape(actions.shape)
    result = action_following(videos, shuffled)
    frequencies = np.bincount(actions[:, :-1].reshape(-1), minlength=5) / actions[:, :-1].size
    assert result["chance"] == pytest.approx(float(np.sum(frequencies**2)), abs=0.02)  # both sides ~ the same distribution
    assert 0.15 < result["chance"] < 0.25
    assert abs(result["score"] - result["chance"]) < 0.05
    assert result["score"] < 0.3


def test_float_videos_and_one_hot_actions_from_the_dataset():
    dataset = get_dataset("bouncing_balls_actions", split="test", T=T)
    pairs = [dataset.video_and_actions(i) for i in range(8)]
    result = action_following(np.stack([v.numpy() for v, _ in pairs]), np.stack([a.numpy() for _, a in pairs]))
    assert result["score"] >= 0.95


def test_deterministic():
    videos, actions = ground_truth(n=6)
    assert action_following(videos, actions) == action_following(videos, actions)


def test_each_direction_read_from_pixels():
    """A ball drawn moving right, left, down, up, then still: y grows downwards."""
    step = bba.step_pixels(32)
    centres = np.cumsum([[16, 16], [step, 0], [-step, 0], [0, step], [0, -step], [0, 0]], axis=0)[:, None].astype(float)
    frames = render(centres, bba.CONTROLLED_COLOUR[None], 4, 32).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(locate_ball(frames), centres[:, 0], atol=1e-6)
    assert observed_moves(locate_ball(frames), 32).tolist() == [bba.RIGHT, bba.LEFT, bba.DOWN, bba.UP, bba.NONE]
    result = action_following(frames[None], np.array([[bba.RIGHT, bba.LEFT, bba.DOWN, bba.UP, bba.NONE, 0]]))
    assert result["score"] == 1.0


def test_a_missing_ball_counts_as_a_failure():
    videos, actions = ground_truth(n=2)
    videos[:, 5:] = 0  # the ball vanishes from frame 5 on
    result = action_following(videos, actions)
    assert result["found"] == pytest.approx(4 / (T - 1))
    assert result["score"] <= 4 / (T - 1)
    assert observed_moves(locate_ball(videos[0]), 32)[4] == NOT_FOUND


def test_first_scored_transition():
    videos, actions = ground_truth(n=3)
    wrong = actions.copy()
    wrong[:, :4] = (actions[:, :4] + 1) % 5  # wrong only before frame 4
    assert action_following(videos, wrong, first=4)["score"] == 1.0
    assert action_following(videos, wrong, first=4)["n_transitions"] == 3 * (T - 1 - 4)
    assert action_following(videos, wrong)["score"] < 1.0


def test_bad_inputs():
    videos, actions = ground_truth(n=2)
    with pytest.raises(ValueError, match="one action sequence per video"):
        action_following(videos, actions[:1])
    with pytest.raises(ValueError, match="needs at least"):
        action_following(videos, actions[:, :5])
    with pytest.raises(ValueError, match="columns"):
        action_following(videos, np.zeros((2, T, 3)))
    with pytest.raises(ValueError, match="first"):
        action_following(videos, actions, first=T)


def test_chance_is_the_expected_agreement_of_independent_moves():
    """sum_a p_action(a) p_observed(a): a still ball with all-NONE actions agrees by construction (chance 1);
    the five moves of test_each_direction against RIGHT five times give 1/5."""
    still = render(np.full((6, 1, 2), 16.0), bba.CONTROLLED_COLOUR[None], 4, 32).transpose(0, 3, 1, 2)
    result = action_following(still[None], np.zeros((1, 6), np.int64))
    assert (result["score"], result["chance"]) == (1.0, 1.0)
    step = bba.step_pixels(32)
    centres = np.cumsum([[16, 16], [step, 0], [-step, 0], [0, step], [0, -step], [0, 0]], axis=0)[:, None].astype(float)
    moving = render(centres, bba.CONTROLLED_COLOUR[None], 4, 32).transpose(0, 3, 1, 2)
    result = action_following(np.stack([moving, still]), np.stack([np.full(6, bba.RIGHT), np.full(6, bba.RIGHT)]))
    # given: RIGHT 10/10; observed: RIGHT 1/10 (the moving ball), NONE 6/10, others 1/10 each.
    assert result["chance"] == pytest.approx(0.1) and result["score"] == pytest.approx(0.1)
