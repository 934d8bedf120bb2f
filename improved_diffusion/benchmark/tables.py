"""The benchmark's output: the table's columns and ratios, its markdown, and the .json / .md files.

A cell that a variant's change cannot affect reads "n/a"; one whose measure failed reads "failed".
"""

import json
from pathlib import Path

COLUMNS = (  # (key, markdown heading, format)
    ("forward_ms", "forward ms", "{:.2f}"),
    ("train_ms", "train step ms", "{:.1f}"),
    ("train_mem_mb", "peak train mem MB", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("autoreg_fps", "frames/s autoreg", "{:.2f}"),
    ("stabilized_fps", "frames/s stabilized-autoreg", "{:.2f}"),
    ("compile_s", "compile s", "{:.1f}"),
)
# Ratios against fp32 eager: speed-ups (> 1: faster) for times and rates, plain ratio for memory.
RATIOS = (("forward_ms", "fwd x", True), ("train_ms", "train x", True), ("train_mem_mb", "mem x", False),
          ("autoreg_fps", "autoreg x", False), ("stabilized_fps", "stab x", False))


NOISY = 1.5  # repetitions of a measure whose slowest is this many times its fastest are flagged

COLUMN_MEASURE = {"forward_ms": "forward", "train_ms": "train", "train_mem_mb": "train", "mfu": "train",
                  "autoreg_fps": "autoreg", "stabilized_fps": "stabilized", "compile_s": "train"}


def cell(row, key, fmt):
    value = row[key]
    if value is not None:
        return fmt.format(value)
    measure = COLUMN_MEASURE[key]
    if (key == "mfu" and not row["on_cuda"]) or (key == "compile_s" and not row["compiled"]):
        return "n/a"
    if measure in row["failed"]:
        return "failed"
    if row["unavailable"] and measure in row["measures"]:
        return row["unavailable"]
    if key == "mfu" and measure in row["measures"]:
        return "unknown"  # measured on a GPU whose peak FLOP/s is not in PEAK_FLOPS
    return "n/a"


def markdown(result):
    """The result as a header and a markdown table (numbers: medians; x columns: against fp32 eager)."""
    h = result["header"]
    s = h["sampling"]
    b = h["train_batch"]
    load = "unknown" if h["load_average"] is None else f"{h['load_average']:.1f}"
    lines = [
        f"# benchmark: config {h['config']}{' (quick)' if h['quick'] else ''}",
        "",
        f"- torch {h['torch']}, device {h['device']} ({h['device_name']}), {h['threads']} threads, "
        f"{h['cpu_cores']} CPU cores, load average {load} before the run",
        f"- model {h['model']}, {h['parameters'] / 1e6:.2f} M parameters",
        f"- training batch {b[0]} videos x {b[1]} frames x {b[2]}x{b[3]}x{b[4]}, "
        f"{h['train_flops'] / 1e9:.2f} GFLOP per step (forward + backward)",
        f"- sampling {s['videos']} videos of {s['T']} frames from {s['n_obs']} given, window {s['max_frames']}, "
        f"autoreg {s['autoreg_new_frames_per_stage']} new frames per stage, stabilized-autoreg 1, "
        f"DDIM {s['ddim_steps']} steps",
        f"- medians of {h['reps']} interleaved repetitions after a warm-up; peak train memory: "
        f"{h['memory_method']}, above what was held before the step",
        "",
    ]
    if h["load_average"] is not None and h["load_average"] > 0.5 * h["cpu_cores"]:
        lines.insert(-1, "- other processes were using the CPU: expect noisy times (and, with several torch "
                         "threads, much slower ones)")
    headings = ["variant"] + [c[1] for c in COLUMNS] + [r[1] for r in RATIOS]
    lines.append("| " + " | ".join(headings) + " |")
    lines.append("|" + "---|" * len(headings))
    for row in result["rows"]:
        cells = [row["variant"]] + [cell(row, key, fmt) for key, _, fmt in COLUMNS]
        cells += [f"{row['ratios'][key]:.2f}" if key in row["ratios"] else "n/a" for key, _, _ in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("x columns: fwd/train/autoreg/stab are speed-ups over fp32 eager (> 1: faster), "
                 "mem is memory / fp32's.")
    for row in result["rows"]:
        extra = [row["what"]]
        if row.get("compile_s_by_measure"):
            extra.append("compile time (first call minus steady state): " + ", ".join(
                f"{m} {s:.1f} s" for m, s in row["compile_s_by_measure"].items()))
        extra += [f"{m} failed: {error}" for m, error in row["failed"].items()]
        noisy = {m: ts for m, ts in row["times_s"].items() if max(ts) > NOISY * min(ts)}
        if noisy:
            extra.append("repetitions disagree (the median is unreliable): " + ", ".join(
                f"{m} {min(ts):.2f}-{max(ts):.2f} s" for m, ts in noisy.items()))
        if row["note"]:
            extra.append(row["note"])
        lines.append(f"- {row['variant']}: " + "; ".join(extra))
    return "\n".join(lines) + "\n"


def write_outputs(result, out):
    """Write `out`.json and `out`.md (a .json or .md suffix on `out` is dropped); returns the two paths."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    return paths
