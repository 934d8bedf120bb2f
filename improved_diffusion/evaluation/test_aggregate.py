"""Tests for aggregate.py: mean ± standard error across runs, and refusing incomplete runs, without sampling."""

import json

import pytest

from improved_diffusion.errors import EvalError, UserError
from improved_diffusion.evaluation import aggregate

# By hand: [0.2, 0.4, 0.9] has mean 1.5 / 3 = 0.5, squared deviations 0.09 + 0.01 + 0.16 = 0.26, sample
# variance 0.26 / 2 = 0.13, standard deviation 0.3605551..., SE 0.3605551 / sqrt(3) = 0.2081666...
SE_OF_0_2_0_4_0_9 = 0.20816659994661327


def test_mean_and_standard_error_match_the_hand_computed_values():
    mean, se, n = aggregate.mean_and_se([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5) and se == pytest.approx(SE_OF_0_2_0_4_0_9) and n == 3
    # [10, 14]: mean 12, deviations ±2, sample variance 8 / 1 = 8, SE sqrt(8) / sqrt(2) = 2
    assert aggregate.mean_and_se([10, 14]) == pytest.approx((12.0, 2.0, 2))


def test_one_run_has_no_standard_error():
    assert aggregate.mean_and_se([0.7]) == (0.7, None, 1)
    stats = aggregate.aggregate_runs([{"autoreg": {"psnr": 14.0}}], ["autoreg"])
    assert stats["autoreg"]["psnr"] == {"mean": 14.0, "se": None, "n": 1, "values": [14.0]}
    assert aggregate.format_mean_se(stats["autoreg"]["psnr"]) == "14"


def test_missing_values_are_left_out_and_counted():
    assert aggregate.mean_and_se([None, float("nan")]) == (None, None, 0)
    assert aggregate.mean_and_se([1.0, None, 3.0]) == pytest.approx((2.0, 1.0, 2))
    assert aggregate.mean_and_se([float("inf"), 3.0]) == (float("inf"), None, 2)


def test_aggregate_keeps_every_run_value_and_formats_mean_and_se():
    runs = [{"a": {"psnr": 0.2}, "b": {"psnr": 1.0}},
            {"a": {"psnr": 0.4}, "b": {"psnr": 1.1}},
            {"a": {"psnr": 0.9}, "b": {"psnr": 1.2}}]
    stats = aggregate.aggregate_runs(runs, ["a", "b"])
    assert stats["a"]["psnr"]["values"] == [0.2, 0.4, 0.9]
    assert aggregate.format_mean_se(stats["a"]["psnr"]) == "0.5 ± 0.2082"
    # b: mean 1.1, SE 0.1 / sqrt(3) = 0.057735; combined with a's: sqrt(0.2081666^2 + 0.057735^2) = 0.216025
    (a, b, diff, combined), = aggregate.clear_differences(stats, ["a", "b"], "psnr")
    assert (a, b) == ("a", "b") and diff == pytest.approx(-0.6) and combined == pytest.approx(0.2160247)
    runs[2]["a"]["psnr"] = 2.0  # a: mean 0.8667, SE 0.5696: the gap of 0.2333 is within 2 combined SEs
    assert aggregate.clear_differences(aggregate.aggregate_runs(runs, ["a", "b"]), ["a", "b"], "psnr") == []


def make_run(run_dir, schemes=("autoreg", "hierarchy-2"), n_videos=2, psnr=14.0, videos=None, scored=None):
    """A run folder as compare_schemes leaves it: samples (videos: {scheme: how many} where fewer), metrics.json,
    runs.json and compare_config.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "compare_config.json").write_text(json.dumps({"checkpoint": "/x/ckpt.pt", "seed": 0, "T": 8}))
    costs = {}
    for k, scheme in enumerate(schemes):
        samples = run_dir / scheme / "samples"
        samples.mkdir(parents=True)
        for i in range((videos or {}).get(scheme, n_videos)):
            (samples / f"sample_{i:04d}-0.npy").write_bytes(b"")
        metrics = {"n_videos": n_videos if scored is None else scored, "overall": {"psnr": psnr + k, "ssim": 0.5}}
        (run_dir / scheme / "metrics.json").write_text(json.dumps(metrics))
        costs[scheme] = {"sampling_seconds": 4.0, "videos_sampled": n_videos, "nfe_per_video": 12}
    (run_dir / "runs.json").write_text(json.dumps(costs))


def test_the_aggregate_report_has_mean_and_se_per_scheme_and_keeps_every_run(tmp_path):
    runs = [dict(folder=f"run{r}", checkpoint=f"/x/ckpt_seed{r}.pt", seed=r) for r in range(3)]
    for r, psnr in enumerate([0.2, 0.4, 0.9]):
        make_run(tmp_path / f"run{r}", psnr=psnr)
    md_path, html_path = aggregate.write_aggregate_report(str(tmp_path), runs, ["autoreg", "hierarchy-2"], 2)
    md = open(md_path).read()
    assert "| scheme | psnr | ssim | runs | NFE / video | s / video |" in md
    assert "| autoreg | 0.5 ± 0.2082 | 0.5 ± 0 | 3 | 12 ± 0 | 2 ± 0 |" in md
    assert "| hierarchy-2 | 1.5 ± 0.2082 |" in md
    assert "Differences of psnr between schemes larger than 2 combined standard errors" in md
    assert "<td>0.5 ± 0.2082</td>" in open(html_path).read()
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["folder"], r["checkpoint"], r["seed"]) for r in saved["runs"]] == [
        (f"run{r}", f"/x/ckpt_seed{r}.pt", r) for r in range(3)]
    assert [r["metrics"]["autoreg"]["psnr"] for r in saved["runs"]] == [0.2, 0.4, 0.9]
    assert saved["runs"][0]["costs"]["autoreg"]["nfe_per_video"] == 12
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["n_runs"] == 3 and summary["schemes"]["autoreg"]["psnr"]["se"] == pytest.approx(SE_OF_0_2_0_4_0_9)


@pytest.mark.parametrize("broken, message", [
    (dict(videos={"hierarchy-2": 1}), "scheme hierarchy-2 has 1 of 2 videos sampled"),
    (dict(schemes=("autoreg",)), "scheme hierarchy-2 has 0 of 2 videos sampled"),
    (dict(scored=1), "scheme autoreg was scored on 1 videos, not on 2"),
])
def test_an_incomplete_run_is_refused_in_one_sentence_naming_it(tmp_path, broken, message):
    runs = [dict(folder=f"run{r}", checkpoint="/x/ckpt.pt", seed=r) for r in range(2)]
    make_run(tmp_path / "run0")
    make_run(tmp_path / "run1", **broken)
    with pytest.raises(EvalError) as caught:
        aggregate.write_aggregate_report(str(tmp_path), runs, ["autoreg", "hierarchy-2"], 2)
    text = str(caught.value)
    assert isinstance(caught.value, UserError) and f"Run folder {tmp_path / 'run1'} is incomplete" in text
    assert message in text and text.count(". ") == 0 and "\n" not in text, text
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "runs.json").exists()
