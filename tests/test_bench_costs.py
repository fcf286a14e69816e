"""benchmarks/bench.py's two cost figures (per-key usage counting, a rate limit on the leased path):
the same-round pairing of runs, and the rendering of bench.json into docs/performance.md's results
section, for a run that has them and for the committed bench.json written before they existed
(`--render-docs` must keep working on it). Pure: no process is started, nothing is measured."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "benchmarks" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(bench: ModuleType, rnd: int, scenario: str, proxy: str, cpu: float) -> Any:
    wrk = {"requests": 1000, "duration_us": 1_000_000, "bytes": 261_000, "s200": 1000, "p50_us": 1.0, "p99_us": 2.0}
    return bench.Run(rnd, scenario, proxy, 64, wrk, cpu, None, 0.0, None, 0.0)


def test_pairs_take_each_round_s_runs_against_each_other(bench: ModuleType) -> None:
    runs = [
        run(bench, 0, "200", "gateway", 52.0),
        run(bench, 0, "200", bench.NO_USAGE, 50.0),
        run(bench, 1, "200", "gateway", 70.0),  # a slow round: both slow
        run(bench, 1, "200", bench.NO_USAGE, 66.0),
        run(bench, 2, "200", "gateway", 40.0),  # round 3 has no run without counting: left out
    ]
    got = bench.paired(runs, {1}, *bench.USAGE_PAIR)
    assert got["added_cpu_us_per_req"]["values"] == [2.0, 4.0]
    assert got["added_cpu_us_per_req"]["median"] == 3.0
    assert got["added_cpu_us_per_req_undisturbed"]["values"] == [2.0]  # round 2 (index 1) disturbed
    assert got["ratio"]["values"] == pytest.approx([1.04, 70 / 66])
    assert bench.paired(runs, set(), *bench.LIMIT_PAIR) is None  # no run with the limit


def test_the_committed_bench_json_renders_without_the_new_figures(bench: ModuleType) -> None:
    saved = json.loads((ROOT / "benchmarks" / "results" / "bench.json").read_text())
    old = copy.deepcopy(saved)
    for name in ("usage_counting", "ratelimit_leased"):
        old["key_figures"].pop(name, None)
    text = bench.markdown(old)
    assert "per-key usage counting" not in text and "| 200, 100 B JSON |" in text
    assert bench.costs(old) == []


def test_a_run_with_both_figures_renders_them(bench: ModuleType) -> None:
    saved = json.loads((ROOT / "benchmarks" / "results" / "bench.json").read_text())
    runs = [
        run(bench, 0, "200", "nginx", 20.0),
        run(bench, 0, "200", "gateway", 52.0),
        run(bench, 0, "200", bench.NO_USAGE, 50.0),
        run(bench, 0, "200 limit", "gateway", 55.0),
    ]
    runs[3].ratelimit_redis_ops = 0.0
    report = copy.deepcopy(saved)
    report["summary"] = bench.summarize(runs, set())
    report["key_figures"]["usage_counting"] = bench.paired(runs, set(), *bench.USAGE_PAIR)
    report["key_figures"]["ratelimit_leased"] = bench.paired(runs, set(), *bench.LIMIT_PAIR)
    text = bench.markdown(report)
    usage = next(line for line in text.splitlines() if line.startswith("| per-key usage counting"))
    assert "**2.0 [2.0-2.0]** (1)" in usage and "2.60 [2.60-2.60] / 2.50 [2.50-2.50]" in usage
    limit = next(line for line in text.splitlines() if line.startswith("| a rate limit, leased path"))
    assert "**3.0 [3.0-3.0]** (1)" in limit and "2.75 [2.75-2.75] / 2.60 [2.60-2.60]" in limit  # x nginx of "200"
    assert "0.00000 per request" in text
    lines = bench.costs(report)
    assert len(lines) == 2 and "2.0 [2.0-2.0] us per request" in lines[0]
