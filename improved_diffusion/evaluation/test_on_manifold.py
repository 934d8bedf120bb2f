"""Tests for on_manifold.py: ground-truth videos are on-manifold in every frame (overlapping balls and
a ball under the cue included); frames replaced by noise, a blur, an extra or a missing ball, or a
washed-out background are off-manifold in exactly those frames and for the right reason; the verdicts
are deterministic; the aggregates match hand-computed values; the disc area the thresholds rest on is
the generator's."""

import numpy as np
import pytest
from scipy import ndimage

from improved_diffusion.data import bouncing_balls as bb
from improved_diffusion.data import cue_recall as cue
from improved_diffusion.evaluation import on_manifold as om


def balls(index, size, T, seed=0, start=0):
    """(centres [T x n x 2], colours [n x 3], video uint8 [T x H x W x 3]) of bouncing_balls test video `index`."""
    rng = bb.video_rng("test", index, seed)
    n = int(rng.integers(bb.DEFAULT_NUM_BALLS[0], bb.DEFAULT_NUM_BALLS[1] + 1))  # make_video's draws, in order
    colours = bb.PALETTE[rng.choice(len(bb.PALETTE), size=n, replace=False)]
    radius = bb.DEFAULT_RADIUS * size
    centres = bb.ball_trajectories(rng, T, size, n, radius, bb.DEFAULT_SPEED, start)
    video = bb.render(centres, colours, radius, size)
    assert np.array_equal(video, bb.make_video("test", index, seed, T=T, image_size=size, start=start))
    return centres, colours, video


def chw(*videos):
    """[T x H x W x 3] videos -> [N x T x 3 x H x W], the layout of sample files."""
    return np.stack(videos).transpose(0, 1, 4, 2, 3)


def distances(centres):
    return np.linalg.norm(centres[:, 0] - centres[:, -1], axis=-1)


# ---------------------------------------------------------------------------
# Ground truth is on-manifold
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size, videos", [
    (16, [(0, 0), (1, 0), (2, 0), (4, 3)]),  # (index, seed): 2, 2, 2 and 1 balls
    (32, [(2, 1), (3, 0)]),  # 2 balls (0.04 px apart in frame 62), 1 ball
])
def test_ground_truth_bouncing_balls_is_on_manifold_in_every_frame(size, videos):
    T = 200
    made = [balls(i, size, T, seed) for i, seed in videos]
    counts = [len(colours) for _, colours, _ in made]
    assert 1 in counts and 2 in counts
    r = bb.DEFAULT_RADIUS * size
    pair = np.concatenate([distances(c) for c, colours, _ in made if len(colours) == 2])
    # Balls overlapping (their blobs merge), deeply (more than half a radius), and nearly coinciding.
    assert (pair < 2 * r).sum() >= 20 and (pair < r / 2).sum() >= 2 and (pair < r / 4).sum() >= 1
    result = om.judge_videos(chw(*[v for *_, v in made]), "bouncing_balls", chw(*[v for *_, v in made]))
    assert result["on"].all(), np.argwhere(~result["on"])
    assert (result["background_error"] == 0).all()  # the generator's background is exactly black
    merged = result["blobs"] < np.array(counts)[:, None]
    assert merged.sum() >= 10  # overlaps really were judged as one blob


def test_ground_truth_bouncing_balls_at_64_pixels_through_an_overlap():
    centres, colours, video = balls(0, 64, 200)
    assert len(colours) == 2
    start = int(np.argmin(distances(centres))) - 4  # 9 frames around the closest approach
    window = video[start:start + 9]
    assert distances(centres)[start + 4] < 2 * 8
    result = om.judge_videos(chw(window), "bouncing_balls", chw(window))
    assert result["on"].all() and (result["blobs"][0] == 1).any()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_ground_truth_cue_recall_is_on_manifold_in_every_frame(size):
    T = 40  # past the cue's return, and longer than the generator's default 20 frames
    videos = np.stack([cue.make_video("test", i, T=T, image_size=size) for i in range(8)])
    top, bottom, left, right = cue.cue_box(size)
    near_cue = np.zeros((size, size), bool)
    near_cue[max(top - 1, 0):bottom + 1, max(left - 1, 0):right + 1] = True
    near_cue[top:bottom, left:right] = False
    ball = (videos == cue.BALL).all(-1)
    cue_frames = np.r_[0:cue.CUE_VISIBLE, cue.CUE_RETURN:T]
    assert (ball[:, cue_frames] & near_cue).any()  # a ball partly under the cue square is judged
    result = om.judge_videos(videos.transpose(0, 1, 4, 2, 3), "cue_recall")
    assert result["on"].all(), np.argwhere(~result["on"])


# ---------------------------------------------------------------------------
# Corrupted frames are off-manifold, exactly those
# ---------------------------------------------------------------------------


def other_colour(colours):
    return next(p for p in bb.PALETTE if not (colours == p).all(-1).any())


def free_spot(centres, size, r, rng):
    """A centre at which a ball touches none of `centres` [n x 2]."""
    for _ in range(1000):
        p = rng.uniform(r, size - r, 2)
        if (np.linalg.norm(centres - p, axis=-1) > 2 * r + 2).all():
            return p
    raise AssertionError("no free spot for an extra ball")


def corrupt(kind, frame, centres, colours, size, rng):
    """frame [H x W x 3] uint8 with ball centres [n x 2] turned into a `kind` of off-manifold frame."""
    r = bb.DEFAULT_RADIUS * size
    if kind == "noise":
        return np.clip(rng.normal(127.5, 64, frame.shape), 0, 255).round().astype(np.uint8)
    if kind == "blur":  # a 3 x 3 box blur: edges 3 px wide instead of the generator's 1
        return ndimage.uniform_filter(frame.astype(float), size=(3, 3, 1)).round().astype(np.uint8)
    if kind == "washed_out":  # mixed with 30 % mid grey
        return (0.7 * frame + 0.3 * 127.5).round().astype(np.uint8)
    if kind == "extra_ball":
        spot = free_spot(centres, size, r, rng)
        return bb.render(np.concatenate([centres, spot[None]])[None],
                         np.concatenate([colours, other_colour(colours)[None]]), r, size)[0]
    if kind == "missing_ball":
        return bb.render(centres[None, :-1], colours[:-1], r, size)[0]
    raise ValueError(kind)


EXPECTED_REASONS = {"noise": {"background"}, "blur": {"shape", "count"}, "washed_out": {"background"},
                    "extra_ball": {"count"}, "missing_ball": {"count"}}


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("index", [0, 3])  # 2 balls, 1 ball
@pytest.mark.parametrize("kind", list(EXPECTED_REASONS))
def test_corrupted_bouncing_balls_frames_are_off_manifold_exactly_there(kind, index, size):
    T = 36
    centres, colours, video = balls(index, size, T)
    r = bb.DEFAULT_RADIUS * size
    # Frames where the balls are far apart, so an erased or added ball cannot pass for an overlap.
    separate = [f for f in range(2, T) if len(colours) == 1 or distances(centres)[f] > 3 * r]
    bad = separate[::4][:3]
    assert len(bad) == 3
    rng = np.random.default_rng(0)
    sample = video.copy()
    for f in bad:
        sample[f] = corrupt(kind, video[f], centres[f], colours, size, rng)
    result = om.judge_videos(chw(sample), "bouncing_balls", chw(video))
    assert np.flatnonzero(~result["on"][0]).tolist() == bad
    assert set(result["reason"][0, bad]) <= EXPECTED_REASONS[kind]
    if kind == "washed_out":
        assert (result["background_error"][0, bad] > 30).all()


def cue_corrupt(kind, frame, size, rng):
    r = om.cue_ball_radius(size)
    if kind == "extra_ball":  # a second ball drawn as make_video draws one, away from the first and the cue
        ys, xs = np.nonzero((frame == cue.BALL).all(-1))
        spots = [(y + 0.3, x + 0.3) for y in range(r, size - 1 - r) for x in range(r, size - 1 - r)
                 if max(y, x) > cue.cue_box(size)[1] + r]  # clear of the cue square
        y, x = max(spots, key=lambda p: np.hypot(ys - p[0], xs - p[1]).min())
        assert np.hypot(ys - y, xs - x).min() > 2 * r + 1
        yy, xx = np.mgrid[:size, :size]
        out = frame.copy()
        out[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = cue.BALL
        return out
    if kind == "missing_ball":
        out = frame.copy()
        out[(frame == cue.BALL).all(-1)] = cue.BACKGROUND
        return out
    return corrupt(kind, frame, None, None, size, rng)


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("kind", list(EXPECTED_REASONS))
def test_corrupted_cue_recall_frames_are_off_manifold_exactly_there(kind, size):
    T = 20
    video = cue.make_video("test", 1, T=T, image_size=size)
    bad = [5, 9, 12]  # cue hidden: the ball is whole and in view
    assert all((video[f] == cue.BALL).all(-1).any() for f in bad)
    rng = np.random.default_rng(0)
    sample = video.copy()
    for f in bad:
        sample[f] = cue_corrupt(kind, video[f], size, rng)
    result = om.judge_videos(chw(sample), "cue_recall")
    assert np.flatnonzero(~result["on"][0]).tolist() == bad
    assert set(result["reason"][0, bad]) <= EXPECTED_REASONS[kind]


def test_a_ball_that_changes_colour_or_size_is_off_manifold():
    """Colour and radius are the generator's: another palette colour, or a radius 1/2 px off, fails."""
    centres, colours, video = balls(3, 32, 12)
    r = bb.DEFAULT_RADIUS * 32
    sample = video.copy()
    sample[4] = bb.render(centres[None, 4], other_colour(colours)[None], r, 32)[0]
    sample[8] = bb.render(centres[None, 8], colours, r + 0.5, 32)[0]
    sample[10] = bb.render(centres[None, 10], colours, r - 0.5, 32)[0]
    result = om.judge_videos(chw(sample), "bouncing_balls", chw(video))
    assert np.flatnonzero(~result["on"][0]).tolist() == [4, 8, 10]


def test_judging_is_deterministic():
    centres, colours, video = balls(0, 16, 30)
    sample = video.copy()
    rng = np.random.default_rng(1)
    sample[10] = corrupt("noise", video[10], centres[10], colours, 16, rng)
    sample[20] = corrupt("blur", video[20], centres[20], colours, 16, rng)
    first = om.judge_videos(chw(sample), "bouncing_balls", chw(video))
    second = om.judge_videos(chw(sample.copy()), "bouncing_balls", chw(video.copy()))
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    assert om.on_manifold(chw(sample), "bouncing_balls", chw(video), n_obs=2) == \
        om.on_manifold(chw(sample), "bouncing_balls", chw(video), n_obs=2)


# ---------------------------------------------------------------------------
# Aggregates and constants
# ---------------------------------------------------------------------------


def test_summary_of_a_hand_made_array():
    on = np.array([[1, 1, 1, 1, 1, 1, 1, 1],   # never leaves: censored at T = 8
                   [1, 1, 1, 0, 1, 1, 1, 1],   # leaves at 3 (and comes back: the first exit counts)
                   [1, 1, 0, 0, 0, 0, 0, 0],   # leaves at 2, the first generated frame
                   [0, 1, 1, 1, 1, 1, 0, 1]],  # frame 0 is observed (n_obs 2): leaves at 6
                  dtype=bool)
    out = om.summarize(on, n_obs=2, blobs=np.arange(32).reshape(4, 8), background_error=np.ones((4, 8)))
    assert out["time_to_drift"] == [8, 3, 2, 6]
    assert out["censored"] == [True, False, False, False]
    assert out["median_time_to_drift"] == 4.5
    assert out["last_quarter_frames"] == [6, 7]
    assert out["last_quarter_fraction"] == 5 / 8  # frames 6-7: 1,1 / 1,1 / 0,0 / 0,1
    assert out["last_quarter_per_video"] == [1.0, 1.0, 0.0, 0.5]
    assert out["per_frame"] == [0.75, 1.0, 0.75, 0.5, 0.75, 0.75, 0.5, 0.75]
    assert out["blob_count"] == [12.0 + f for f in range(8)] and out["background_error"] == [1.0] * 8
    assert om.summarize(on, n_obs=0)["time_to_drift"] == [8, 3, 2, 0]
    assert list(om.last_quarter(200)) == list(range(150, 200)) and list(om.last_quarter(3)) == [2]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_disc_area_is_the_coverage_of_the_generators_disc(size):
    """The closed form pi (r^2 + 1/12) that MAX_COVERAGE rests on is what render() draws."""
    look = om.Look.of("bouncing_balls", size)
    rng = np.random.default_rng(size)
    centres = rng.uniform(size / 4, 3 * size / 4, (20, 1, 2))
    drawn = bb.render(centres, bb.PALETTE[:1], look.radius, size).astype(float)
    coverage = look.coverage(drawn).sum(axis=(1, 2))
    assert np.allclose(coverage, look.disc_area, rtol=0.03)  # pixel sampling: +-3 % at radius 2
    assert coverage.mean() == pytest.approx(look.disc_area, rel=0.01)
    assert look.radius == size / 8 and om.Look.of("cue_recall", size).radius == max(2, size // 10)


def test_other_datasets_and_missing_ground_truth_are_refused():
    with pytest.raises(ValueError, match="applies to bouncing_balls and cue_recall, not 'minerl'"):
        om.Look.of("minerl", 32)
    video = chw(balls(0, 16, 4)[2])
    with pytest.raises(ValueError, match="needs the ground-truth videos"):
        om.judge_videos(video, "bouncing_balls")


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("kind", ["noise", "washed_out", "extra_ball", "missing_ball", "blur"])
def test_model_tolerances_accept_more_but_not_lost_or_added_balls_noise_or_washed_out_frames(kind, size):
    """At "model" tolerances ground truth stays on-manifold, a faintly noisy background (a model's) is
    accepted where "generator" refuses it, and the corruptions still fail (blur: measured, may pass)."""
    T = 36
    centres, colours, video = balls(0, size, T)
    r = bb.DEFAULT_RADIUS * size
    separate = [f for f in range(2, T) if distances(centres)[f] > 3 * r]
    bad = separate[::4][:3]
    rng = np.random.default_rng(1)
    sample = video.copy()
    for f in bad:
        sample[f] = corrupt(kind, video[f], centres[f], colours, size, rng)
    faint = [f for f in range(T) if f not in bad][:4]  # background noise |N(0, 12)|: mean 9.6 grey levels
    noisy = video[faint].astype(float) + np.abs(rng.normal(0, 12, video[faint].shape)) * (video[faint] == 0)
    sample[faint] = np.clip(noisy, 0, 255).round().astype(np.uint8)
    model = om.judge_videos(chw(sample), "bouncing_balls", chw(video), om.TOLERANCES["model"])
    generator = om.judge_videos(chw(sample), "bouncing_balls", chw(video))
    assert model["on"][0, faint].all() and not generator["on"][0, faint].any()
    clean = [f for f in range(T) if f not in bad and f not in faint]
    assert model["on"][0, clean].all()
    if kind != "blur":
        assert not model["on"][0, bad].any()
    assert om.on_manifold(chw(sample), "bouncing_balls", chw(video), tolerance="model")["tolerance"] == "model"
    with pytest.raises(ValueError, match="Unknown on_manifold tolerance 'loose'; choose from generator, model"):
        om.on_manifold(chw(sample), "bouncing_balls", chw(video), tolerance="loose")
