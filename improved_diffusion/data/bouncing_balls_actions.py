"""
Bouncing balls with actions: one white ball moved by a per-frame action, among bouncing balls.

A procedural action-conditioned dataset that needs no download, so conditioning on actions
can be trained and measured on a CPU (evaluation/action_following.py scores, from pixels
alone, whether a video's white ball moves as its actions say).

Dynamics (positions in pixels, y grows downwards; STEP = 2 px per frame at 32 px, scaled
with image_size):

- action a_t of frame t is one of NONE, UP, DOWN, LEFT, RIGHT (0..4); it sets the controlled
  ball's velocity for that frame: centre_{t+1} = clip(centre_t + STEP * DIRECTIONS[a_t]) with
  the ball kept inside the frame (centre in [radius, image_size - radius]);
- actions are drawn with persistence: a_0 is uniform; afterwards the previous action is kept,
  except with probability CHANGE_PROBABILITY a new one is drawn uniformly (possibly the same),
  so motion runs for several frames and is visible;
- an action that would push the ball out of the frame is replaced by the opposite direction
  (the ball bounces back); the stored action is the one taken, so every stored action moves
  the ball exactly one STEP in its direction (or not at all for NONE);
- the other balls (0 to 2 per video) bounce freely as in bouncing_balls.py, in its palette
  without white, and are drawn under the controlled ball. White is reserved for the
  controlled ball, so its position can be read from pixels.

Actions are delivered one-hot of width NUM_ACTIONS = 5 by the dataset loader. Videos and
actions are a pure function of (split, index, seed).
"""

import numpy as np

from .bouncing_balls import DEFAULT_RADIUS, DEFAULT_SPEED, PALETTE, REFERENCE_SIZE, ball_trajectories, render, video_rng

DEFAULT_T = 100
DEFAULT_IMAGE_SIZE = 32
NUM_VIDEOS = {"train": 10_000, "test": 100}

NONE, UP, DOWN, LEFT, RIGHT = range(5)
ACTION_NAMES = ("none", "up", "down", "left", "right")
NUM_ACTIONS = len(ACTION_NAMES)
DIRECTIONS = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], dtype=np.float64)  # (x, y) per action
OPPOSITE = np.array([NONE, DOWN, UP, RIGHT, LEFT])

STEP = 2.0  # pixels per frame at REFERENCE_SIZE
CHANGE_PROBABILITY = 0.25
DEFAULT_NUM_OTHER_BALLS = (0, 2)  # inclusive range, drawn per video

CONTROLLED_COLOUR = np.array([255, 255, 255], dtype=np.float64)  # white: no other ball uses it
OTHER_COLOURS = np.array([c for c in PALETTE if not np.array_equal(c, CONTROLLED_COLOUR)])


def step_pixels(image_size):
    """How far one action moves the controlled ball, in pixels, at this image size."""
    return STEP * image_size / REFERENCE_SIZE


def controlled_path(start_centre, actions, image_size, radius=DEFAULT_RADIUS):
    """
    Centres [T x 2] (x, y) of the controlled ball at frames 0..T-1 for actions a_0..a_{T-1}:
    frame 0 at start_centre, then a_t moves it from frame t to t + 1, kept inside the frame.
    """
    lo, hi = radius * image_size, image_size - radius * image_size
    centres = np.empty((len(actions), 2))
    centre = np.asarray(start_centre, dtype=np.float64)
    for t, action in enumerate(actions):
        centres[t] = centre
        centre = np.clip(centre + step_pixels(image_size) * DIRECTIONS[action], lo, hi)
    return centres


def _draw_actions(rng, n, start_centre, image_size, radius):
    """n actions with persistence, each turned back if it would push the ball out (module docstring)."""
    lo, hi = radius * image_size, image_size - radius * image_size
    step = step_pixels(image_size)
    draws = rng.random((n, 2))  # per frame: change or not, which new action; drawn whatever the outcome
    actions = np.empty(n, dtype=np.int64)
    centre = np.asarray(start_centre, dtype=np.float64)
    action = NONE
    for t in range(n):
        if t == 0 or draws[t, 0] < CHANGE_PROBABILITY:
            action = int(draws[t, 1] * NUM_ACTIONS)
        target = centre + step * DIRECTIONS[action]
        if np.any(target < lo) or np.any(target > hi):
            action = int(OPPOSITE[action])
        actions[t] = action
        centre = np.clip(centre + step * DIRECTIONS[action], lo, hi)
    return actions


def make_video_and_actions(
    split,
    index,
    seed=0,
    T=DEFAULT_T,
    image_size=DEFAULT_IMAGE_SIZE,
    start=0,
    num_other_balls=DEFAULT_NUM_OTHER_BALLS,
    radius=DEFAULT_RADIUS,
    speed=DEFAULT_SPEED,
):
    """
    Video `index` of `split` as uint8 [T x H x W x 3] and its integer actions [T] (a_t moves the
    white ball from frame t to t + 1). start skips that many frames: with T=8, start=5 both
    equal frames and actions [5:] of T=13 (the actions before `start` are drawn, not rendered).
    """
    if isinstance(num_other_balls, int):
        num_other_balls = (num_other_balls, num_other_balls)
    if not 0 <= num_other_balls[0] <= num_other_balls[1] <= len(OTHER_COLOURS):
        raise ValueError(f"num_other_balls must lie in [0, {len(OTHER_COLOURS)}], got {num_other_balls}.")
    if image_size - 2 * radius * image_size < 2 * step_pixels(image_size):
        raise ValueError(f"image_size {image_size} leaves the controlled ball no room to move.")
    # Separate streams, so the scene's draws never depend on how many actions are drawn.
    scene_seeds = video_rng(split, index, seed).bit_generator.seed_seq.spawn(2)
    scene_rng, action_rng = (np.random.default_rng(s) for s in scene_seeds)
    radius_px = radius * image_size
    start_centre = scene_rng.uniform(radius_px, image_size - radius_px, size=2)
    n_other = int(scene_rng.integers(num_other_balls[0], num_other_balls[1] + 1))
    colours = OTHER_COLOURS[scene_rng.choice(len(OTHER_COLOURS), size=n_other, replace=False)]
    others = ball_trajectories(scene_rng, T, image_size, n_other, radius_px, speed, start)

    actions = _draw_actions(action_rng, start + T, start_centre, image_size, radius)
    controlled = controlled_path(start_centre, actions, image_size, radius)[start:]
    centres = np.concatenate([others, controlled[:, None]], axis=1)  # the controlled ball is drawn last, on top
    frames = render(centres, np.concatenate([colours, CONTROLLED_COLOUR[None]]), radius_px, image_size)
    return frames, actions[start:]


def make_video(split, index, seed=0, T=DEFAULT_T, image_size=DEFAULT_IMAGE_SIZE, start=0):
    """The frames of make_video_and_actions (the interface of every procedural dataset)."""
    return make_video_and_actions(split, index, seed=seed, T=T, image_size=image_size, start=start)[0]
