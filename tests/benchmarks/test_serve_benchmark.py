"""benchmarks/serve.py runs end to end on the shared small export: both servers, every client count, the JSON."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_quick_run_measures_both_servers_at_each_client_count(tmp_path, trained_run):
    out = tmp_path / "serve"
    res = run_benchmark("serve", f"--model={trained_run.export}", "--quick", "--clients=1,3", "--max_batch=4",
                        "--label=freedoom", "--instruments=piano,drums", f"--out={out}")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "serve.json").read_text())
    assert [(r["server"], r["clients"]) for r in report["rows"]] == [
        ("one-at-a-time", 1), ("one-at-a-time", 3), ("batched", 1), ("batched", 3)]
    for row in report["rows"]:
        assert row["pieces"] == row["clients"] and row["pieces_per_s"] > 0
        assert 0 < row["latency_p50_s"] <= row["latency_p95_s"]
        # Every piece was decoded once; one row a window one at a time, up to max_batch rows batched.
        assert row["rows"] == row["pieces"]
        assert max(map(int, row["windows_by_rows"])) <= row["max_batch"]
    assert set(report["ratios"]) == {"1", "3"} and "throughput" in res.stdout


def test_bad_flags_are_one_line_usage_errors():
    res = run_benchmark("serve", "--clients=0")
    assert res.returncode == 2 and "--model is required" in res.stderr and "Traceback" not in res.stderr
