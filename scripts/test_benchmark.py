"""The benchmark on its tiny configuration: the table's rows and cells, its files, and one sentence for bad input.

Never asserts a speed: benchmarks are measurements, not timed tests.
"""

import json
import math

import pytest
import torch

from improved_diffusion.benchmark import configs, probes, run, tables
from improved_diffusion.benchmark.runner import Runner
from improved_diffusion.errors import ConfigError

COLUMN_MEASURE = tables.COLUMN_MEASURE


def positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_benchmark_fills_every_cell_its_variant_measures():
    # One thread: on a busy CPU, OpenMP threads of tiny ops spend most of their time waiting for each other.
    threads = torch.get_num_threads()
    result = run.run_benchmark("tiny", device="cpu", reps=1, quick=True, threads=1, log=lambda line: None)
    assert torch.get_num_threads() == threads and result["header"]["threads"] == 1
    rows = {row["variant"]: row for row in result["rows"]}
    expected = probes.choose_variants("", torch.device("cpu"), quick=True)
    assert list(rows) == expected and expected[0] == "fp32"
    assert {"checkpoint", "per-video", "kv-cache"} <= set(rows)
    assert not any(configs.VARIANTS[n].compile for n in rows)  # --quick compiles nothing on CPU by default
    for name, row in rows.items():
        if row["unavailable"]:  # only the cache may be missing, while it is being written
            assert name == "kv-cache" and row["unavailable"] == "not available"
            continue
        for key, measure in COLUMN_MEASURE.items():
            value = row[key]
            if key == "mfu" or (key == "compile_s" and not row["compiled"]):
                assert value is None  # MFU is CUDA-only
            elif key == "train_mem_mb" and measure in row["measures"]:
                assert value is not None and math.isfinite(value) and value >= 0  # growth may round to 0
            elif measure in row["measures"]:
                assert positive_finite(value), (name, key, value)
            else:
                assert value is None, (name, key, value)
        assert set(row["ratios"]) == {key for key, _, _ in tables.RATIOS if row[key] is not None}
        assert {m: len(ts) for m, ts in row["times_s"].items()} == {m: 1 for m in row["measures"]}
    assert all(r == 1 for r in rows["fp32"]["ratios"].values())
    header = result["header"]
    assert header["config"] == "tiny" and header["parameters"] > 0 and header["train_flops"] > 0
    assert header["train_batch"] == [2, 4, 3, 8, 8]

    table = tables.markdown(result)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    headings = [c.strip() for c in lines[0].strip("|").split("|")]
    assert headings == ["variant"] + [c[1] for c in tables.COLUMNS] + [r[1] for r in tables.RATIOS]
    assert [line.split("|")[1].strip() for line in lines[1:]] == expected
    assert all(len(line.strip("|").split("|")) == len(headings) for line in lines)


def test_script_prints_the_table_and_writes_json_and_markdown(run_script, tmp_path):
    code, out, err = run_script("benchmark", "--config", "tiny", "--quick", "--reps", "1", "--variants",
                                "fp32,per-video", "--threads", "1", "--out", tmp_path / "bench.json")
    assert code == 0, err
    assert "| per-video |" in out and "frames/s stabilized-autoreg" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [row["variant"] for row in data["rows"]] == ["fp32", "per-video"]
    assert (tmp_path / "bench.md").read_text() == tables.markdown(data)


@pytest.mark.parametrize("argv, words", [
    (["--config", "huge"], "unknown config 'huge'"),
    (["--config", "tiny", "--variants", "fp32,fp64"], "unknown variant 'fp64'"),
    (["--config", "tiny", "--reps", "0"], "--reps must be a positive integer"),
])
def test_bad_input_is_one_sentence(run_script, argv, words):
    code, out, err = run_script("benchmark", *argv)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="GPU"):
        run.run_benchmark("tiny", device="cuda", reps=1, log=lambda line: None)


def test_a_failing_measure_is_reported_and_the_rest_still_measured():
    class Broken(Runner):
        def __init__(self):  # no models: only what repeat_interleaved uses
            self.name, self.measures, self.failed = "compile", ("forward", "train"), {}

        def run(self, measure):
            if measure == "train":
                raise RuntimeError("cannot determine truth value\n\nSet TORCHDYNAMO_VERBOSE=1")
            return 0.5

    runner = Broken()
    first, times = run.repeat_interleaved([runner], reps=2, log=lambda line: None)
    assert first == {"compile": {"forward": 0.5}} and times == {"compile": {"forward": [0.5, 0.5]}}
    assert runner.failed == {"train": "RuntimeError: cannot determine truth value"}
    assert runner.measures == ("forward",)
