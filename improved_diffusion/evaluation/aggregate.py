"""One comparison of sampling schemes over several runs (training seeds x sampling seeds): the spread.

A single run's metric says little about whether one scheme beats another: a second training seed or a
second sampling seed can move it by more than the gap. compare.compare_runs samples and scores every run
into <out_dir>/run<r>/ (a whole single-run comparison each); this module reads those folders back and
reports every metric as mean ± standard error across runs (SE = sample standard deviation, ddof 1,
over sqrt(number of runs)), keeping each run's values in <out_dir>/runs.json.

A run is only aggregated when every scheme has all n_videos samples and was scored on them: averaging
an incomplete run with complete ones would mix different test sets, so it is refused instead.
"""

import json
import math
import os

from ..errors import EvalError
from ..results import write_json_atomic
from .evaluate import format_value
from .report import RUNS_FILE, SETTINGS_FILE, count_samples, load_runs, scheme_folder, write_blocks

AGGREGATE_FILE = "report.json"


# ---------------------------------------------------------------------------
# The statistics (pure functions)
# ---------------------------------------------------------------------------


def mean_and_se(values):
    """(mean, standard error, n) of the finite numbers in `values`; SE is None below 2 of them.

    SE = sample standard deviation (ddof=1) / sqrt(n): the uncertainty of the mean over runs. None and
    NaN (a metric a run skipped) are left out, and n says how many values remain. An infinite value
    makes the mean infinite and the SE None.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(kept)
    if n == 0:
        return None, None, 0
    mean = sum(kept) / n
    if n < 2 or not all(math.isfinite(v) for v in kept):
        return mean, None, n
    variance = sum((v - mean) ** 2 for v in kept) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n), n


def aggregate_runs(run_values, schemes):
    """{scheme: {metric: {"mean", "se", "n", "values"}}} from one {scheme: {metric: value}} per run.

    "values" keeps the per-run values in run order (None where a run has none), so nothing is lost.
    """
    out = {}
    for scheme in schemes:
        metrics = list(dict.fromkeys(m for run in run_values for m in run.get(scheme, {})))
        out[scheme] = {}
        for m in metrics:
            values = [run.get(scheme, {}).get(m) for run in run_values]
            mean, se, n = mean_and_se(values)
            out[scheme][m] = {"mean": mean, "se": se, "n": n, "values": values}
    return out


def clear_differences(aggregate, schemes, metric):
    """[(a, b, mean_a - mean_b, combined SE)] for the pairs whose means differ by more than 2 combined SEs.

    Combined SE = sqrt(SE_a^2 + SE_b^2), as for two independent means; a pair where either has no SE
    (one run, or a missing value) is left out.
    """
    found = []
    for i, a in enumerate(schemes):
        for b in schemes[i + 1:]:
            sa, sb = aggregate[a].get(metric), aggregate[b].get(metric)
            if not sa or not sb or sa["se"] is None or sb["se"] is None:
                continue
            diff, combined = sa["mean"] - sb["mean"], math.hypot(sa["se"], sb["se"])
            if abs(diff) > 2 * combined:
                found.append((a, b, diff, combined))
    return found


def format_mean_se(stat):
    """"mean ± SE" for a table cell; the mean alone when there is no SE, '-' when there is no value."""
    if stat is None or stat["mean"] is None:
        return "-"
    if stat["se"] is None:
        return format_value(stat["mean"])
    return f"{format_value(stat['mean'])} ± {format_value(stat['se'])}"


# ---------------------------------------------------------------------------
# Reading run folders back, refusing incomplete ones
# ---------------------------------------------------------------------------


def load_run_metrics(run_dir, schemes, n_videos):
    """{scheme: metrics.json's "overall"} of one run folder; EvalError unless every scheme is complete.

    Complete: test videos 0..n_videos-1 all sampled, and metrics.json scored on exactly those.
    """
    values = {}
    for scheme in schemes:
        eval_dir = os.path.join(run_dir, scheme_folder(scheme))
        found = count_samples(eval_dir, n_videos)
        if found < n_videos:
            raise EvalError(f"Run folder {run_dir} is incomplete: scheme {scheme} has {found} of {n_videos} videos "
                            "sampled; rerun the comparison to finish it before its runs are aggregated.")
        path = os.path.join(eval_dir, "metrics.json")
        scored = None
        if os.path.isfile(path):
            with open(path) as f:
                metrics = json.load(f)
            scored = metrics.get("n_videos")
        if scored != n_videos:
            raise EvalError(f"Run folder {run_dir} is incomplete: scheme {scheme} was "
                            f"{'never scored' if scored is None else f'scored on {scored} videos'}, not on "
                            f"{n_videos}; rerun the comparison to score it before its runs are aggregated.")
        values[scheme] = metrics["overall"]
    return values


def _cost_values(record):
    """The cost columns of one run's runs.json record of a scheme (None where it has no record)."""
    seconds, sampled = record.get("sampling_seconds"), record.get("videos_sampled")
    return {"NFE / video": record.get("nfe_per_video"),
            "s / video": seconds / sampled if seconds is not None and sampled else None}


def write_aggregate_report(out_dir, runs, schemes, n_videos):
    """Aggregate the run folders of `runs` ([{"folder", "checkpoint", "seed"}]) into out_dir.

    Writes runs.json (every run's checkpoint, seed, per-scheme metrics and sampling costs), report.json
    (mean, SE, n and values per scheme and metric) and report.md / report.html (the table); returns the
    paths of the last two. Every run is checked for completeness before anything is written.
    """
    metrics = [load_run_metrics(os.path.join(out_dir, run["folder"]), schemes, n_videos) for run in runs]
    costs = [load_runs(os.path.join(out_dir, run["folder"])) for run in runs]
    records = [dict(run=r, **run, metrics=metrics[r], costs={s: costs[r][s] for s in schemes if s in costs[r]})
               for r, run in enumerate(runs)]
    write_json_atomic(os.path.join(out_dir, RUNS_FILE), {"n_videos": n_videos, "schemes": schemes, "runs": records})

    stats = aggregate_runs(metrics, schemes)
    cost_stats = aggregate_runs([{s: _cost_values(c.get(s, {})) for s in schemes} for c in costs], schemes)
    metric_names = list(dict.fromkeys(m for s in schemes for m in stats[s]))
    main = metric_names[0] if metric_names else None
    differences = clear_differences(stats, schemes, main) if main else []
    write_json_atomic(os.path.join(out_dir, AGGREGATE_FILE), {
        "n_runs": len(runs), "n_videos": n_videos, "schemes": stats, "costs": cost_stats, "main_metric": main,
        "clear_differences": [dict(a=a, b=b, difference=d, combined_se=se) for a, b, d, se in differences]})

    n = len(runs)
    blocks = [("h1", f"Sampling schemes over {n} runs")]
    with open(os.path.join(out_dir, runs[0]["folder"], SETTINGS_FILE)) as f:
        settings = {k: v for k, v in json.load(f).items() if k not in ("checkpoint", "seed")}
    blocks.append(("p", "Runs: " + "; ".join(f"{run['folder']}: {run['checkpoint']}, seed {run['seed']}"
                                             for run in runs) + "."))
    blocks.append(("p", "Settings of every run: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "."))
    blocks.append(("p", f"{n_videos} test videos per scheme and run. Each cell: the mean over runs ± its standard "
                        "error (sample standard deviation over the square root of the number of runs); each run's "
                        f"values are in {RUNS_FILE}, its own report in run<r>/report.md."))
    header = ["scheme", *metric_names, "runs", "NFE / video", "s / video"]
    rows = []
    for s in schemes:
        cells = [s]
        for m in metric_names:
            stat = stats[s].get(m)
            text = format_mean_se(stat)
            cells.append(text if stat is None or stat["n"] in (0, n) else f"{text} (of {stat['n']})")
        cells += [str(n), format_mean_se(cost_stats[s]["NFE / video"]), format_mean_se(cost_stats[s]["s / video"])]
        rows.append(cells)
    blocks.append(("table", header, rows))
    if main and n > 1 and len(schemes) > 1:
        found = "; ".join(f"{a} − {b} = {format_value(d)} (combined SE {format_value(se)})"
                          for a, b, d, se in differences) or "none"
        blocks.append(("p", f"Differences of {main} between schemes larger than 2 combined standard errors "
                            f"(sqrt(SE_a² + SE_b²)): {found}."))
    return write_blocks(out_dir, blocks)
