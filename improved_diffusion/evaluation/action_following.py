"""Action following on bouncing_balls_actions: does the white ball move as the actions say? From pixels alone.

In bouncing_balls_actions (data/bouncing_balls_actions.py) action a_t moves the white
(controlled) ball one STEP from frame t to frame t + 1: up, down, left, right, or not at all.
This metric reads the ball's position from the pixels of any video (ground truth or a
model's sample) and checks each move against its action, so it needs no network.

Definitions (all thresholds scale with the image size through the ball radius and STEP):

- found: the pixels whose largest channel difference from white is at most COLOUR_TOLERANCE
  (in 0..255) belong to the ball; if there are at least MIN_AREA_FRACTION of the ball's area
  (pi r^2), the ball's position is their centroid, else the ball is not found in that frame.
- observed move of transition t -> t+1: NONE if the centroid moved less than half a STEP
  along both axes; otherwise the axis along which it moved further, with its sign: RIGHT
  (x grows), LEFT, DOWN (rows grow downwards), UP.
- score: the fraction of transitions t -> t+1 (t from `first` to T - 2, in every video) whose
  observed move is the action a_t. A transition whose ball is not found in frame t or t + 1
  counts as a failure: a video that loses the ball does not follow its actions.
- chance: the agreement expected if moves were independent of the actions,
  sum over a of p_action(a) * p_observed(a) on the same transitions (Cohen's expected
  agreement; a missing ball matches no action). Ground-truth videos with their actions
  shuffled score about this.
"""

import numpy as np

from ..data.bouncing_balls import DEFAULT_RADIUS
from ..data.bouncing_balls_actions import CONTROLLED_COLOUR, DOWN, LEFT, NONE, NUM_ACTIONS, RIGHT, UP, step_pixels
from ..data.pixels import to_pixel_scale

DATASET = "bouncing_balls_actions"  # the dataset whose videos this metric reads
COLOUR_TOLERANCE = 48.0  # largest channel difference from white, in 0..255
MIN_AREA_FRACTION = 0.25  # of the ball's nominal area pi r^2
NOT_FOUND = -1  # observed_moves' answer when the ball is missing from either frame


def locate_ball(video, colour=CONTROLLED_COLOUR, radius=DEFAULT_RADIUS):
    """
    Centroid (x, y) in pixels of the controlled ball in each frame, [T x 2], NaN where it is
    not found. video: [T x C x H x W], uint8 or float in [-1, 1]; radius as a fraction of the width.
    """
    video = to_pixel_scale(video)
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"A video must be an RGB [T x C x H x W] array, got shape {video.shape}.")
    distance = np.abs(video - np.asarray(colour, dtype=np.float64)[None, :, None, None]).max(axis=1)
    mask = distance <= COLOUR_TOLERANCE  # [T x H x W]
    height, width = mask.shape[1:]
    ys, xs = np.mgrid[:height, :width] + 0.5  # pixel centres, as render() draws them
    count = mask.sum(axis=(1, 2))
    enough = count >= MIN_AREA_FRACTION * np.pi * (radius * width) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        centres = np.stack([(mask * xs).sum(axis=(1, 2)) / count, (mask * ys).sum(axis=(1, 2)) / count], axis=-1)
    centres[~enough] = np.nan
    return centres


def observed_moves(centres, image_size):
    """The move of each transition t -> t+1 of centres [T x 2] as an action (NONE..RIGHT), or NOT_FOUND; [T - 1]."""
    move = np.diff(centres, axis=0)
    dx, dy = move[:, 0], move[:, 1]
    horizontal = np.where(dx > 0, RIGHT, LEFT)
    vertical = np.where(dy > 0, DOWN, UP)
    with np.errstate(invalid="ignore"):
        moves = np.where(np.abs(dx) >= np.abs(dy), horizontal, vertical)
        moves = np.where(np.maximum(np.abs(dx), np.abs(dy)) < step_pixels(image_size) / 2, NONE, moves)
    return np.where(np.isnan(move).any(axis=1), NOT_FOUND, moves)


def action_indices(actions):
    """Integer actions [T] from integers [T] or one-hot (or any scores) [T x NUM_ACTIONS]."""
    actions = np.asarray(actions.detach().cpu() if hasattr(actions, "detach") else actions)
    if actions.ndim == 2:
        if actions.shape[1] != NUM_ACTIONS:
            raise ValueError(f"One-hot actions must have {NUM_ACTIONS} columns, got shape {actions.shape}.")
        return actions.argmax(axis=1)
    if actions.ndim != 1:
        raise ValueError(f"Actions must be [T] integers or [T x {NUM_ACTIONS}] one-hot, got shape {actions.shape}.")
    return actions.astype(np.int64)


def action_following(videos, actions, first=0):
    """
    Score how well videos follow their actions (module docstring).

    videos: [N x T x C x H x W] (or a list of [T x C x H x W]), uint8 or float in [-1, 1].
    actions: [N x T'] integers or [N x T' x NUM_ACTIONS] one-hot, T' >= T - 1; a_t is the
    action of frame t. first: the first transition scored (e.g. n_obs - 1 for samples whose
    first n_obs frames were given). Returns score, chance, found (fraction of scored
    transitions with the ball in both frames), n_transitions and per_video scores.
    """
    if len(videos) == 0 or len(videos) != len(actions):
        raise ValueError(f"Need one action sequence per video, got {len(videos)} videos and {len(actions)} sequences.")
    observed, given, per_video = [], [], []
    for video, video_actions in zip(videos, actions):
        video_actions = action_indices(video_actions)
        if len(video_actions) < len(video) - 1:
            raise ValueError(f"A video of {len(video)} frames needs at least {len(video) - 1} actions, got {len(video_actions)}.")
        if not 0 <= first < len(video) - 1:
            raise ValueError(f"first={first} leaves no transition to score in a video of {len(video)} frames.")
        moves = observed_moves(locate_ball(video), np.asarray(video).shape[-1])[first:]
        wanted = video_actions[first : len(video) - 1]
        observed.append(moves)
        given.append(wanted)
        per_video.append(float(np.mean(moves == wanted)))
    observed, given = np.concatenate(observed), np.concatenate(given)
    p_given = np.bincount(given, minlength=NUM_ACTIONS) / len(given)
    p_observed = np.bincount(observed[observed != NOT_FOUND], minlength=NUM_ACTIONS) / len(observed)
    return dict(
        score=float(np.mean(observed == given)),
        chance=float(np.dot(p_given, p_observed)),
        found=float(np.mean(observed != NOT_FOUND)),
        n_transitions=int(len(observed)),
        per_video=per_video,
    )
