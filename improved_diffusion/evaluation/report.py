"""Comparing sampling schemes on one checkpoint: sample each, record the cost, write a report.

`sample_schemes` runs a sampling function once per scheme (each into its own eval dir), timing it and
counting network evaluations; the costs go to `runs.json` so a resumed comparison still reports them.
`evaluate_schemes` scores every eval dir (evaluation.py), and `write_report` writes the same content
as `report.md` and `report.html`: a table of metrics and costs per scheme, metric-vs-frame plots with
one line per scheme, and each scheme's plan picture and frame strip.

Number of network evaluations (NFE) per video: while a scheme samples, a global forward pre-hook
counts every forward pass of a video network (FDM's UNet or DF's 3D-UNet) and the number of videos in
it; the sum divided by the number of videos sampled is the NFE per video. That is exact for any batch
size, rank count, plan and noise schedule, because it counts what the sampler does rather than what
the plan suggests (the sampler skips noise-level rows in which no frame changes, which stages x
(rows - 1) would count). An energy model (models/energy.py) runs its network forward once per call
and then backward to its input: each of its gradient evaluations, whether a denoising step's
prediction or an MCMC step's gradient, counts as one NFE, and each energy-only evaluation (MCMC
acceptance) as one NFE too (sampling/mcmc.py says how many a step makes). Because a gradient
evaluation also pays a backward pass (about twice a forward), the report adds "grad evals / video",
the evaluations of the NFE that were followed by one (counted by a forward hook on the energy
model), whenever a scheme made any; and, for MCMC refinement, the acceptance rate
(sampling.run.mcmc_summary). Wall time (s / video) remains the plain measure of equal cost.
"""

import html
import json
import math
import os
import re
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import dist_util
from .evaluate import (
    HIGHER_IS_BETTER, evaluate, format_value, load_detector,
    write_metrics,
)
from .metrics import MetricUnavailable, load_lpips
from .plots import frame_strip, plot_per_frame
from ..errors import ConfigError, UserError
from ..models import DFUNet3D, EnergyModel, UNetVideoModel
from ..results import SAMPLE_RE, find_samples, read_sampling_config, write_json_atomic
from ..sampling.plan_picture import draw_plan
from ..sampling.plans import sampling_schemes
from ..sampling.run import mcmc_summary
from ..sampling.request import SchemeRequest
from ..sampling.scheme import Scheme
from ..sampling.settings import canonical

RUNS_FILE = "runs.json"
SETTINGS_FILE = "compare_config.json"


# ---------------------------------------------------------------------------
# Schemes and settings
# ---------------------------------------------------------------------------


def parse_schemes(text):
    """Scheme specs from "a,b:key=value,c", in order and without repeats; ConfigError if one is malformed.

    A spec is a registry preset, optionally followed by ":key=value" overrides of its plan options and
    stage settings (sampling.request.SchemeRequest.with_spec), so one comparison can hold a scheme at
    several settings.
    """
    specs = list(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    if not specs:
        raise ConfigError("--schemes names no sampling scheme.")
    for spec in specs:
        SchemeRequest().with_spec(spec)
    return specs


def scheme_folder(spec):
    """The eval dir name of a scheme spec inside a comparison's out_dir: the spec, ':' made '_'."""
    return spec.replace(":", "_").replace(" ", "")


def check_settings_file(out_dir, settings, write=True):
    """Refuse to mix samples of different settings in one out_dir; record the settings otherwise.

    Existing samples are reused (resume), so they must come from the same checkpoint and settings.
    """
    path = os.path.join(out_dir, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [k for k in settings if k in saved and saved[k] != settings[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"{out_dir} holds samples made with {k}={saved[k]!r}, not {settings[k]!r}; "
                            "use another --out_dir.")
    if write:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(path, settings)


# ---------------------------------------------------------------------------
# Sampling cost
# ---------------------------------------------------------------------------


VIDEO_NETWORKS = (UNetVideoModel, DFUNet3D)


def _videos_in(args):
    return int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 1


class NetworkEvaluations:
    """Counts forward passes of the video networks: `calls` calls holding `video_calls` videos in all; and of
    those, the energy-gradient evaluations (`gradient_calls`, `gradient_video_calls`: energy model calls that
    returned a gradient, so ran a backward pass too)."""

    def __init__(self):
        self.calls = 0
        self.video_calls = 0
        self.gradient_calls = 0
        self.gradient_video_calls = 0

    def _hook(self, module, args):
        if isinstance(module, VIDEO_NETWORKS):
            self.calls += 1
            self.video_calls += _videos_in(args)

    def _energy_hook(self, module, args, kwargs, output):
        if isinstance(module, EnergyModel) and kwargs.get("gradient", True):
            self.gradient_calls += 1
            self.gradient_video_calls += _videos_in(args)


@contextmanager
def count_network_evaluations():
    """Count every video-network forward pass (and energy-gradient evaluation) inside the `with` block."""
    counter = NetworkEvaluations()
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(counter._hook),
               torch.nn.modules.module.register_module_forward_hook(counter._energy_hook, with_kwargs=True)]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def load_runs(out_dir):
    path = os.path.join(out_dir, RUNS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def count_samples(eval_dir, n_videos):
    """Sample files (sample_idx 0) of test videos 0..n_videos-1 that exist in eval_dir."""
    if not os.path.isdir(os.path.join(eval_dir, "samples")):
        return 0
    return len(find_samples(eval_dir, n_videos, sample_idx=0))


def _sum_over_ranks(values):
    """Element-wise sum of a list of numbers over all ranks (the list itself on one rank)."""
    if dist_util.get_world_size() == 1:
        return list(values)
    device = dist_util.dev() if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


@contextmanager
def _watch_samples(bar, eval_dir, n_videos, done_before):
    """Move `bar` as sample files appear (from every rank) while a scheme samples."""
    stop = threading.Event()

    def poll():
        while not stop.wait(0.5):
            bar.n = done_before + count_samples(eval_dir, n_videos)
            bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def sample_schemes(schemes, sample_fn, out_dir, n_videos):
    """Run `sample_fn(scheme, eval_dir)` for each scheme, with eval_dir = out_dir/<scheme>.

    Under MPI every rank calls this; `sample_fn` samples the rank's share. Rank 0 records per scheme,
    in out_dir/runs.json: the wall time (of all ranks together, model loading included) and number
    of videos of the runs that sampled something, accumulated over resumed runs, and the NFE per video.
    """
    rank = dist_util.get_rank()
    runs = load_runs(out_dir) if rank == 0 else {}
    bar = tqdm(total=len(schemes) * n_videos, desc="sampling (scheme, video)", disable=rank != 0)
    for k, scheme in enumerate(schemes):
        eval_dir = os.path.join(out_dir, scheme_folder(scheme))
        before = count_samples(eval_dir, n_videos)
        bar.set_postfix_str(scheme)
        bar.n = k * n_videos + before
        bar.refresh()
        dist_util.barrier()  # every rank has counted before any writes
        start = time.perf_counter()
        with count_network_evaluations() as counter, _watch_samples(bar, eval_dir, n_videos, k * n_videos):
            sample_fn(scheme, eval_dir)
        dist_util.barrier()
        seconds = time.perf_counter() - start
        video_calls, gradient_video_calls = _sum_over_ranks([counter.video_calls, counter.gradient_video_calls])
        new = count_samples(eval_dir, n_videos) - before
        if rank == 0 and new > 0:
            record = runs.get(scheme, {"sampling_seconds": 0.0, "videos_sampled": 0})
            record["sampling_seconds"] += seconds
            record["videos_sampled"] += new
            record["nfe_per_video"] = video_calls / new
            if gradient_video_calls:
                record["gradient_evaluations_per_video"] = gradient_video_calls / new
            record["world_size"] = dist_util.get_world_size()
            runs[scheme] = record
            write_json_atomic(os.path.join(out_dir, RUNS_FILE), runs)
        bar.n = (k + 1) * n_videos
        bar.refresh()
    bar.close()
    return runs


# ---------------------------------------------------------------------------
# Evaluation and pictures
# ---------------------------------------------------------------------------


def evaluate_schemes(schemes, out_dir, metrics, i3d_path=None, n_videos=None, data_root=None,
                     on_manifold_tolerance="generator"):
    """{scheme: evaluation result} for every scheme's eval dir; metrics.json and plots are written too."""
    lpips_model = detector = None
    if "lpips" in metrics:
        try:
            lpips_model = load_lpips()
        except MetricUnavailable:
            pass  # evaluate() records why it was skipped
    if "fvd" in metrics and i3d_path:
        detector = load_detector(i3d_path)
    results = {}
    for scheme in schemes:
        eval_dir = os.path.join(out_dir, scheme_folder(scheme))
        result = evaluate(eval_dir, ",".join(metrics), i3d_path, n_videos, data_root, lpips_model, detector,
                          on_manifold_tolerance=on_manifold_tolerance)
        write_metrics(eval_dir, result)
        results[scheme] = result
    return results


def draw_scheme_pictures(eval_dir):
    """plan.png and strip.png in eval_dir; returns {"plan": path or None, "strip": path, "notes": [...]}."""
    config = read_sampling_config(eval_dir)
    notes = []
    plan_path = os.path.join(eval_dir, "plan.png")
    try:
        scheme = Scheme.from_dict(config)
        draw_plan(scheme.stages(), scheme.T, plan_path)
        if scheme.adaptive:
            counterpart = sampling_schemes[scheme.plan].counterpart()
            notes.append(f"{scheme.plan} picks its observed frames from the videos; the picture shows the "
                         f"plan of {counterpart}, which generates the same frames.")
    except (UserError, TypeError) as e:  # TypeError: a config whose entries are not a scheme's
        plan_path = None
        notes.append(f"no plan picture ({e}).")
    sample_dir = os.path.join(eval_dir, "samples")
    first = sorted(n for n in os.listdir(sample_dir) if SAMPLE_RE.fullmatch(n))[0]
    strip_path = os.path.join(eval_dir, "strip.png")
    video = np.load(os.path.join(sample_dir, first))
    shown = frame_strip(video, int(config["n_obs"]), strip_path)
    which = "All frames" if len(shown) == len(video) else "Frames " + ", ".join(map(str, shown))
    notes.append(f"{which} of {first}; blue border: observed, red: generated.")
    return {"plan": plan_path, "strip": strip_path, "notes": notes}


# ---------------------------------------------------------------------------
# The report: one list of blocks, rendered as markdown and as HTML
# ---------------------------------------------------------------------------


def build_report(out_dir, schemes, results, runs, settings):
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", header, rows), ("img", path, alt).

    Paths are relative to out_dir, so the folder can be moved or shared as a whole.
    """
    blocks = [("h1", f"Sampling schemes on {os.path.basename(str(settings.get('checkpoint', '')))}")]
    first = results[schemes[0]]
    blocks.append(("p", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "."))
    blocks.append(("p", f"Dataset {first['dataset']}; {first['n_videos']} test videos per scheme; "
                        f"overall values of per-frame metrics are means over the {first['overall_frames']}. "
                        "Bold: the best value of a column."))
    table, metric_names = results_table(out_dir, schemes, results, runs)
    blocks.append(table)
    blocks += table_notes(schemes, results, metric_names, with_gradients="grad evals / video" in table[1],
                          with_mcmc="MCMC acceptance" in table[1])
    skipped = {m: reason for s in schemes for m, reason in results[s]["skipped"].items()}
    notes = list(dict.fromkeys(n for s in schemes for n in results[s]["notes"]))
    if skipped or notes:
        blocks.append(("h2", "Notes"))
        blocks += [("p", text) for text in list(skipped.values()) + notes]
    blocks += per_frame_plots(out_dir, schemes, results, n_obs=first["n_obs"])
    for s in schemes:
        pictures = draw_scheme_pictures(os.path.join(out_dir, scheme_folder(s)))
        blocks.append(("h2", f"Scheme {s}"))
        if pictures["plan"]:
            blocks.append(("img", os.path.relpath(pictures["plan"], out_dir), f"plan of {s}"))
        blocks.append(("img", os.path.relpath(pictures["strip"], out_dir), f"frames of {s}"))
        blocks += [("p", note) for note in pictures["notes"]]
    return blocks


def results_table(out_dir, schemes, results, runs):
    """(the ("table", header, rows) block of metrics and costs per scheme, the metric names in it)."""
    metric_names = list(dict.fromkeys(m for s in schemes for m in results[s]["overall"]))
    header = ["scheme", "plan", "scheduling matrix", *metric_names, "videos", "sampling s", "s / video", "NFE / video"]
    mcmc = {s: mcmc_summary(os.path.join(out_dir, scheme_folder(s))) for s in schemes}
    with_gradients = any(runs.get(s, {}).get("gradient_evaluations_per_video") for s in schemes)
    with_mcmc = any(mcmc.values())
    if with_gradients:
        header.append("grad evals / video")
    if with_mcmc:
        header.append("MCMC acceptance")
    best = {}
    for m in metric_names:
        values = [results[s]["overall"].get(m) for s in schemes]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if values:
            best[m] = max(values) if HIGHER_IS_BETTER.get(m, True) else min(values)
    rows = []
    for s in schemes:
        config = read_sampling_config(os.path.join(out_dir, scheme_folder(s)))
        run = runs.get(s, {})
        cells = [s, config.get("plan", ""), canonical(config).get("scheduling_matrix", "")]
        for m in metric_names:
            v = results[s]["overall"].get(m)
            text = format_value(v)
            cells.append(f"**{text}**" if v is not None and best.get(m) == v and len(schemes) > 1 else text)
        seconds, sampled = run.get("sampling_seconds"), run.get("videos_sampled")
        cells += [str(results[s]["n_videos"]), format_value(seconds),
                  format_value(seconds / sampled) if seconds is not None and sampled else "-",
                  format_value(run.get("nfe_per_video"))]
        if with_gradients:
            cells.append(format_value(run.get("gradient_evaluations_per_video", 0)))
        if with_mcmc:
            cells.append(format_value(mcmc[s]["acceptance_rate"]) if mcmc[s] else "-")
        rows.append(cells)
    return ("table", header, rows), metric_names


def table_notes(schemes, results, metric_names, with_gradients, with_mcmc):
    """The paragraphs that say what the table's less obvious columns measure."""
    blocks = []
    if "time_to_drift" in metric_names:
        details = next(results[s]["details"]["on_manifold"] for s in schemes if "on_manifold" in results[s]["details"])
        frames = details["last_quarter_frames"]
        blocks.append(("p", f"on_manifold_last_quarter: the fraction of frames {frames[0]}..{frames[1]} (the last "
                            "quarter) that are valid frames of the dataset, judged from pixels at "
                            f"{details.get('tolerance', 'generator')!r} tolerances (on_manifold.py). "
                            "time_to_drift: the median over videos of the first generated frame that is not; a "
                            "video that never leaves counts as its length (censored)."))
    if "action_following" in metric_names:
        chances = ", ".join(f"{s} {format_value(results[s]['details']['action_following']['chance'])}"
                            for s in schemes if "action_following" in results[s]["details"])
        blocks.append(("p", "action_following: the fraction of generated moves of the controlled ball that match the "
                            "action that drove them, from pixels (action_following.py); ground truth scores 1. "
                            f"Chance (the agreement if moves ignored the actions): {chances}."))
    blocks.append(("p", "sampling s: wall time of the sampling runs that produced the samples (model loading "
                        "included; with several MPI ranks, of all ranks together), accumulated over resumed runs; "
                        "s / video divides it by the videos those runs sampled. NFE / video: network evaluations "
                        "per video, counted with a forward hook on the model while sampling."
                        + (" grad evals / video: the evaluations of an energy model that also ran a backward pass "
                           "(its predictions and MCMC gradients; energy-only MCMC evaluations are the rest)."
                           if with_gradients else "")
                        + (" MCMC acceptance: accepted over proposed frame steps of the MCMC refinement."
                           if with_mcmc else "")))
    return blocks


def per_frame_plots(out_dir, schemes, results, n_obs):
    """One plot per per-frame metric (a line per scheme) under <out_dir>/plots/, as report blocks."""
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    per_frame = list(dict.fromkeys(m for s in schemes for m in results[s]["per_frame"]))
    blocks = []
    if per_frame:
        blocks.append(("h2", "Metrics per frame"))
        blocks.append(("p", "Mean over videos of each frame's value; shaded: the observed frames."
                       + (" on_manifold: the fraction of videos whose frame is still a valid frame of the dataset."
                          if "on_manifold" in per_frame else "")))
    for m in per_frame:
        path = os.path.join(plot_dir, f"{m}.png")
        series = {s: results[s]["per_frame"][m] for s in schemes if m in results[s]["per_frame"]}
        plot_per_frame(series, path, title=f"{m} per frame", ylabel=m, n_obs=n_obs)
        blocks.append(("img", os.path.relpath(path, out_dir), f"{m} per frame"))
    return blocks


def render_markdown(blocks):
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
        elif kind == "table":
            header, rows = block[1], block[2]

            def row(cells):
                return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

            lines += [row(header), "|" + "|".join("---" for _ in header) + "|", *map(row, rows), ""]
    return "\n".join(lines)


def _inline_html(text):
    """Escape text, keeping markdown **bold** as <b>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(text)))


def render_html(blocks):
    title = next((b[1] for b in blocks if b[0] == "h1"), "Report")
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
             "</head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "img":
            parts.append(f"<p><img src=\"{html.escape(block[1])}\" alt=\"{html.escape(block[2])}\"></p>")
        elif kind == "table":
            header, rows = block[1], block[2]
            parts.append("<table>")
            parts.append("<tr>" + "".join(f"<th>{_inline_html(c)}</th>" for c in header) + "</tr>")
            for cells in rows:
                parts.append("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in cells) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out_dir, schemes, results, runs, settings):
    """Write out_dir/report.md and out_dir/report.html (same content); returns their paths."""
    return write_blocks(out_dir, build_report(out_dir, schemes, results, runs, settings))


def write_blocks(out_dir, blocks):
    """Render report blocks to out_dir/report.md and out_dir/report.html; returns their paths."""
    md_path, html_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    with open(md_path, "w") as f:
        f.write(render_markdown(blocks))
    with open(html_path, "w") as f:
        f.write(render_html(blocks))
    return md_path, html_path
