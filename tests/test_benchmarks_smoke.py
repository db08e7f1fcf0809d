"""Every benchmarks/bench_*.py runs with `--quick` and prints one JSON line of figures (those that need
../shared/data say they skipped when it is absent). The figures themselves are not checked: they come from
`make bench` on a quiet machine (docs/performance.md)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
NEEDS_SHARED = {"bench_data", "bench_medmnist"}


def _bench_class(module):
    from _common import Bench

    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Bench) and v is not Bench]
    assert len(classes) == 1, f"{module.__name__} should define one Bench subclass"
    return classes[0]


def test_every_script_starts_with_its_command():
    assert {"bench_step", "bench_padding", "bench_data", "bench_generate", "bench_medmnist",
            "bench_memory"} <= set(SCRIPTS)
    for name in SCRIPTS:
        doc = (BENCH_DIR / f"{name}.py").read_text().split('"""')[1]
        assert doc.startswith(f"python benchmarks/{name}.py"), name


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_prints_one_json_line(name, capsys, monkeypatch, shared_data_path):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    module = importlib.import_module(name)
    argv = ["--quick", "--device", "cpu"] + (["--data-dir", str(shared_data_path)] if shared_data_path else [])
    assert _bench_class(module)().main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"bench": ')]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["bench"] == _bench_class(module).name and out["quick"] is True and "machine" in out
    if "skipped" in out:
        assert name in NEEDS_SHARED and shared_data_path is None, out["skipped"]
        return
    CHECKS.get(name, lambda out: None)(out)


def _padding(out):
    for key in ("vqa_rad", "mixed"):
        share = {k: _spread(out[key][k])["median"] for k in ("random", "grouped", "packed")}
        assert share["random"] <= share["grouped"] <= 1 and share["packed"] <= 1
    assert out["mixed"]["random"]["max"] < 0.8  # long reports beside short answers: random batches waste a lot


def _spread(stats, repeats=2):
    """A figure printed as median with min and max over the interleaved rounds."""
    assert stats["n"] == repeats and 0 < stats["min"] <= stats["median"] <= stats["max"], stats
    return stats


def _step(out):
    res = out["mixed"]
    for key in ("medm_step_s", "hf_llava_step_s", "splice_step_s", "medm_over_hf_llava", "medm_grouped_tokens_per_s",
                "medm_packed_tokens_per_s", "medm_grouped_over_hf_llava_random", "medm_packed_over_hf_llava_random"):
        _spread(res[key])
    # The same samples in every arm: the tokens/s ratio is the ratio of the arms' tokens/s.
    assert res["medm_grouped_tokens_per_s"]["median"] > 0 and res["samples"] == 2 * out["batch_size"]


def _memory(out):
    row = out["settings"][0]
    assert row["measured_bytes"] > 0 and row["estimated_bytes"] > 0


def _generate(out):
    for key in ("batch8_cache_tokens_per_s", "batch1_no_cache_tokens_per_s", "batch8_cache_speedup"):
        _spread(out[key])


def _medmnist(out):
    assert 0 <= out["test"]["acc"] <= 1 and out["steps"] > 0


def _data(out):
    assert out["2d_first_pass_per_s"] > 0
    for key in ("3d_cached_per_s", "2d_step_per_s", "2d_second_pass_workers_needed", "3d_cold_loader_share"):
        _spread(out[key])
    peak = out["3d_peak_memory"][0]
    assert peak["shape"] == [32, 32, 32] and peak["peak_mb"] >= 0


def _records(out):
    row = out["per_n"][0]
    assert row["n"] == 300 and set(row["build"]) == {"1_proc", "2_proc"}
    for build in row["build"].values():
        _spread(build["records_per_s"], repeats=1)
    _spread(row["warm_start_s"])
    _spread(row["encode_only_per_s"]["per_cpu_s"])
    for mem in (row["memory"], out["baseline_in_memory"]["memory"]):
        assert mem["n"] > 0 and "RssAnon_mb" in mem["iterated"] and len(mem["workers"]) == out["workers"] == 2
        assert all(w["RssAnon_mb"] > 0 for w in mem["workers"])


CHECKS = {"bench_padding": _padding, "bench_step": _step, "bench_memory": _memory, "bench_generate": _generate,
          "bench_medmnist": _medmnist, "bench_data": _data, "bench_records": _records}


@pytest.fixture
def shared_data_path():
    # Same rule as tests/conftest.py; importing `conftest` by name picks whichever conftest loaded first.
    path = Path(os.environ.get("MEDM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_modules():
    """Tiny models run fastest on one thread (and the machine may be shared); each script imports afresh."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for name in [*SCRIPTS, "_common"]:
        sys.modules.pop(name, None)
