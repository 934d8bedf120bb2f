"""Tests for report.py (cost records, network-evaluation counting, markdown/HTML rendering) and plots.py."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from improved_diffusion.data import bouncing_balls, bouncing_balls_actions
from improved_diffusion.evaluation import report
from improved_diffusion.evaluation.plots import SHADE, frame_strip, nice_ticks, plot_per_frame
from improved_diffusion.evaluation.video_files import GENERATED_COLOUR, OBSERVED_COLOUR
from improved_diffusion.sampling.plan_picture import draw_plan
from improved_diffusion.sampling.plans import plan_stages
from improved_diffusion.sampling.scheme import Scheme
from improved_diffusion.script_util import ModelConfig, UserError, create_model


@pytest.fixture(scope="module")
def tiny_unet():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return create_model(ModelConfig(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="8",
                                    num_heads=2)).eval()


def call(model, batch):
    with torch.no_grad():
        model(torch.zeros(batch, 2, 3, 16, 16), torch.zeros(batch, 2, dtype=torch.long))


# ---------------------------------------------------------------------------
# plots.py
# ---------------------------------------------------------------------------


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 97) == [20, 40, 60, 80]
    assert nice_ticks(2, 2) == [2]


def test_plot_per_frame_shades_observed_frames_and_skips_non_finite_values(tmp_path):
    path = tmp_path / "plot.png"
    plot_per_frame({"a": [math.inf, math.inf, 20.0, 21.5, None, 19.0], "b": [math.nan] * 6}, path,
                   title="psnr", ylabel="dB", n_obs=2)
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == SHADE).all(axis=-1).sum() > 1000  # the shaded observed frames
    plot_per_frame({"only inf": [math.inf] * 3}, tmp_path / "empty.png")  # nothing finite: axes only
    assert Image.open(tmp_path / "empty.png").size == (640, 360)


def test_frame_strip_borders_observed_and_generated_frames(tmp_path):
    video = np.full((10, 3, 8, 8), 128, dtype=np.uint8)
    shown = frame_strip(video, n_obs=3, path=tmp_path / "strip.png", max_frames=5, scale=1, gap=2)
    assert shown == [0, 2, 4, 7, 9]  # evenly spaced, first and last included
    pixels = np.asarray(Image.open(tmp_path / "strip.png").convert("RGB"))
    width = 8 + 2 * 2  # frame plus border
    assert tuple(pixels[0, 0]) == OBSERVED_COLOUR and tuple(pixels[0, width + 2]) == OBSERVED_COLOUR  # frames 0, 2
    assert tuple(pixels[0, 2 * (width + 2)]) == GENERATED_COLOUR  # frame 4
    assert pixels.shape[1] == 5 * width + 4 * 2


# ---------------------------------------------------------------------------
# Settings and schemes
# ---------------------------------------------------------------------------


def test_parse_schemes():
    assert report.parse_schemes(" autoreg, df-pyramid,autoreg ") == ["autoreg", "df-pyramid"]
    with pytest.raises(UserError, match="Unknown sampling scheme 'nope'"):
        report.parse_schemes("autoreg,nope")
    with pytest.raises(UserError, match="names no sampling scheme"):
        report.parse_schemes(",")


def test_scheme_specs_carry_their_own_settings():
    specs = report.parse_schemes("autoreg,stabilized-autoreg:stabilization_level=50, df-pyramid:eta=0.5:scheduling_matrix=pyramid")
    assert specs == ["autoreg", "stabilized-autoreg:stabilization_level=50", "df-pyramid:eta=0.5:scheduling_matrix=pyramid"]
    assert report.scheme_folder(specs[1]) == "stabilized-autoreg_stabilization_level=50"
    for spec, message in [("autoreg:stabilization_level", "not a setting=value override"),
                          ("autoreg:T=9", "not a setting=value override; settings are chunk_size, optimality, "
                                          "scheduling_matrix"),
                          ("autoreg:stabilization_level=ten", "stabilization_level must be int, got 'ten'"),
                          ("nope:eta=1", "Unknown sampling scheme 'nope'")]:
        with pytest.raises(UserError, match=message):
            report.parse_schemes(spec)


def write_eval_dir(eval_dir, scheme, T=8):
    (eval_dir / "samples").mkdir(parents=True)
    (eval_dir / "sampling_config.json").write_text(json.dumps({"dataset": "bouncing_balls", **scheme.to_dict()}))
    np.save(eval_dir / "samples" / "sample_0000-0.npy", np.zeros((T, 3, 8, 8), np.uint8))


def test_scheme_pictures_come_from_the_saved_scheme(tmp_path):
    """The plan picture is the saved scheme's plan; an adaptive plan's is its counterpart's, with a note."""
    adaptive = Scheme.from_preset("adaptive-hierarchy-2", T=8, n_obs=2, max_frames=4)
    write_eval_dir(tmp_path / "a", adaptive)
    pictures = report.draw_scheme_pictures(tmp_path / "a")
    draw_plan(plan_stages("hierarchy-2", 8, 2, 4, 2), 8, tmp_path / "ref.png")
    assert (tmp_path / "ref.png").read_bytes() == open(pictures["plan"], "rb").read()
    assert any("plan of hierarchy-2" in note for note in pictures["notes"])
    # A saved scheme that no longer runs (its schedule file is gone) gets a note instead of a picture.
    write_eval_dir(tmp_path / "b", Scheme("optimal", "optimal", 8, 2, 4, 2, optimality=str(tmp_path / "gone.pt")))
    pictures = report.draw_scheme_pictures(tmp_path / "b")
    assert pictures["plan"] is None and "does not exist" in pictures["notes"][0]


def test_settings_file_refuses_other_settings(tmp_path):
    settings = dict(checkpoint="/a.pt", T=8, n_obs=2, max_latent_frames=None)
    report.check_settings_file(tmp_path, settings)
    report.check_settings_file(tmp_path, settings)  # the same settings resume
    with pytest.raises(UserError, match="made with T=8, not 16"):
        report.check_settings_file(tmp_path, {**settings, "T": 16})


# ---------------------------------------------------------------------------
# Sampling cost
# ---------------------------------------------------------------------------


def test_network_evaluations_count_calls_and_videos(tiny_unet):
    with report.count_network_evaluations() as counter:
        call(tiny_unet, 3)
        call(tiny_unet, 1)
        torch.nn.Linear(2, 2)(torch.zeros(1, 2))  # other modules are not the video model
    call(tiny_unet, 2)  # after the block: not counted
    assert (counter.calls, counter.video_calls) == (2, 4)


def test_sample_schemes_records_cost_and_keeps_it_when_resumed(tmp_path, tiny_unet):
    def sample(scheme, eval_dir, indices):
        for i in indices:
            path = tmp_path / scheme / "samples" / f"sample_{i:04d}-0.npy"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(5 if scheme == "autoreg" else 7):  # 5 or 7 network evaluations per video
                call(tiny_unet, 1)
            np.save(path, np.zeros(1, np.uint8))

    runs = report.sample_schemes(["autoreg", "df-pyramid"], lambda s, d: sample(s, d, [0]), tmp_path, n_videos=2)
    assert runs["autoreg"]["videos_sampled"] == 1 and runs["autoreg"]["nfe_per_video"] == 5
    assert runs["df-pyramid"]["nfe_per_video"] == 7 and runs["df-pyramid"]["sampling_seconds"] > 0
    first = json.loads((tmp_path / "runs.json").read_text())

    runs = report.sample_schemes(["autoreg", "df-pyramid"], lambda s, d: sample(s, d, [0]), tmp_path, n_videos=2)
    assert runs == first  # nothing new sampled: the recorded cost stays
    runs = report.sample_schemes(["autoreg"], lambda s, d: sample(s, d, [0, 1]), tmp_path, n_videos=2)
    assert runs["autoreg"]["videos_sampled"] == 2 and runs["autoreg"]["nfe_per_video"] == 5
    assert runs["autoreg"]["sampling_seconds"] > first["autoreg"]["sampling_seconds"]
    assert report.count_samples(tmp_path / "autoreg", 1) == 1


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def test_markdown_and_html_hold_the_same_content():
    blocks = [("h1", "Schemes <on> ckpt"), ("p", "a | b"), ("table", ["scheme", "psnr"], [["autoreg", "**21.5**"],
                                                                                         ["df-pyramid", "20"]]),
              ("img", "plots/psnr.png", "psnr per frame")]
    md, html = report.render_markdown(blocks), report.render_html(blocks)
    assert md.splitlines()[0] == "# Schemes <on> ckpt"
    assert "| autoreg | **21.5** |" in md and "![psnr per frame](plots/psnr.png)" in md
    assert "<h1>Schemes &lt;on&gt; ckpt</h1>" in html and "<td><b>21.5</b></td>" in html
    assert '<img src="plots/psnr.png" alt="psnr per frame">' in html
    assert html.count("<tr>") == 3 and md.count("\n| ") == 3


def test_report_shows_the_on_manifold_curve_and_columns(tmp_path):
    """Ground truth as one scheme's samples, noise from frame 4 as the other's: the table has the last-
    quarter fraction and median time to drift (best in bold), and the on-manifold curve is plotted."""
    T = 8
    truth = [bouncing_balls.make_video("test", i, T=T, image_size=16).transpose(0, 3, 1, 2) for i in range(2)]
    noise = np.random.default_rng(0).integers(0, 256, (T - 4, 3, 16, 16), dtype=np.uint8)
    for name, samples in (("autoreg", truth), ("df-pyramid", [np.concatenate([t[:4], noise]) for t in truth])):
        scheme = Scheme.from_preset(name, T=T, n_obs=2, max_frames=4)
        eval_dir = tmp_path / name
        (eval_dir / "samples").mkdir(parents=True)
        (eval_dir / "sampling_config.json").write_text(json.dumps(
            {"dataset": "bouncing_balls", "image_size": 16, "data_seed": 0, **scheme.to_dict()}))
        for i, sample in enumerate(samples):
            np.save(eval_dir / "samples" / f"sample_{i:04d}-0.npy", sample)
    schemes = ["autoreg", "df-pyramid"]
    results = report.evaluate_schemes(schemes, tmp_path, ["psnr", "on_manifold"], n_videos=2)
    assert results["df-pyramid"]["overall"]["time_to_drift"] == 4.0
    md = report.render_markdown(report.build_report(tmp_path, schemes, results, {}, {"checkpoint": "c.pt"}))
    header = next(line for line in md.splitlines() if line.startswith("| scheme |"))
    assert " on_manifold_last_quarter | time_to_drift |" in header
    assert "| autoreg | autoreg | full_sequence | **inf** | **1** | **8** |" in md
    assert "| 0 | 4 |" in next(line for line in md.splitlines() if line.startswith("| df-pyramid |"))
    assert "frames 6..7 (the last quarter)" in md
    assert "![on_manifold per frame](plots/on_manifold.png)" in md
    with Image.open(tmp_path / "plots" / "on_manifold.png") as image:
        image.verify()


def test_report_states_action_following_and_its_chance(tmp_path):
    """Ground truth with its own actions (score 1) as one scheme, the same videos said to be driven by
    one fixed action file as the other: the table has the scores and the text each scheme's chance."""
    T = 10
    truth = [bouncing_balls_actions.make_video("test", i, T=T, image_size=16).transpose(0, 3, 1, 2)
             for i in range(3)]
    np.save(tmp_path / "fixed.npy", np.full(T, 2))
    for name, conditions in (("autoreg", {"actions_source": "dataset"}),
                             ("long-range", {"actions_source": "file", "actions_file": str(tmp_path / "fixed.npy")})):
        scheme = Scheme.from_preset(name, T=T, n_obs=2, max_frames=4)
        eval_dir = tmp_path / name
        (eval_dir / "samples").mkdir(parents=True)
        (eval_dir / "sampling_config.json").write_text(json.dumps(
            {"dataset": "bouncing_balls_actions", "image_size": 16, "data_seed": 0, **conditions, **scheme.to_dict()}))
        for i, sample in enumerate(truth):
            np.save(eval_dir / "samples" / f"sample_{i:04d}-0.npy", sample)
    schemes = ["autoreg", "long-range"]
    results = report.evaluate_schemes(schemes, tmp_path, ["action_following"], n_videos=3)
    assert results["autoreg"]["overall"]["action_following"] == 1.0
    assert results["long-range"]["overall"]["action_following"] < 0.5
    md = report.render_markdown(report.build_report(tmp_path, schemes, results, {}, {"checkpoint": "c.pt"}))
    assert "| autoreg | autoreg | full_sequence | **1** |" in md
    chances = [results[s]["details"]["action_following"]["chance"] for s in schemes]
    assert f"Chance (the agreement if moves ignored the actions): autoreg {report.format_value(chances[0])}, " \
           f"long-range {report.format_value(chances[1])}." in md
