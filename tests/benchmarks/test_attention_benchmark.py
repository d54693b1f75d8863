"""benchmarks/attention.py runs end to end at small n and writes its table's JSON."""

from __future__ import annotations

import json

import pytest

from musenet_jax import cpu_attention
from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


def _run(*args: str):
    return run_benchmark("attention", *args)


@pytest.mark.slow
def test_small_run_writes_rows_ratios_and_floors(tmp_path):
    res = _run("--lengths=96,160", "--stride=16", "--summary=4", "--heads=2", "--head_dim=16", "--repeats=1",
               "--min_time=0", "--dense_max_n=96", "--pallas_max_n=96", f"--out={tmp_path / 'bench'}")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "bench" / "attention.json").read_text())
    rows = {(r["n"], r["method"]): r for r in report["rows"]}
    methods = ("strided", "fixed", "strided-cpu", "fixed-cpu")
    assert set(rows) == {(96, "dense"), (96, "pallas")} | {(n, m) for n in (96, 160) for m in methods}
    assert report["notes"] == ["n=160: dense skipped (above --dense_max_n=96)"]
    for (n, method), r in rows.items():
        assert r["seconds"] > 0 and r["pct_matmul"] > 0
        # Computed tiles cover every allowed pair; dense computes the whole square.
        assert r["useful_gflop"] <= r["gflop"]
        if method == "dense":
            assert r["gflop"] == pytest.approx(12 * 16 * 2 * n * n / 1e9)
        if method in ("strided", "fixed"):
            assert r["floor_seconds"] > 0 and r["floor_pct_matmul"] > 0
        if method.endswith("-cpu"):
            assert r["hw_pct_matmul"] == pytest.approx(r["pct_matmul"] * 14 / 12)
        if n == 96:
            assert r["speedup"] == pytest.approx(rows[(96, "dense")]["seconds"] / r["seconds"])
        else:
            assert "speedup" not in r
    # The strided 'xla' tiles at n = 160, l = 16: a band of l + b keys (b = 8) and a 10 x 10 grid per column.
    assert rows[(160, "strided")]["gflop"] == pytest.approx(12 * 16 * 2 * (160 * 24 + 16 * 10 * 10) / 1e9)
    # The 'cpu' kernel's count comes from its own tiling (cpu_attention.logits_per_head).
    assert rows[(160, "strided-cpu")]["gflop"] == pytest.approx(
        12 * 16 * 2 * cpu_attention.logits_per_head("strided", 160, 16) / 1e9)
    assert "floor s" in res.stdout and "wrote" in res.stdout


def test_bad_flags_are_one_line_errors(tmp_path):
    for flag, message in (("--stride=0", "--stride must be a positive integer or 'sqrt'"),
                          ("--lengths=12,x", "--lengths must be integers"), ("--heads=0", "--heads must be >= 1"),
                          ("--min_time=-1", "--min_time must be >= 0")):
        res = _run(flag, f"--out={tmp_path / 'bench'}")
        assert res.returncode != 0
        assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), res.stderr
        assert not (tmp_path / "bench").exists()
    (tmp_path / "file").write_text("")  # --out is a folder: refused before the run, not after it
    res = _run("--lengths=64", f"--out={tmp_path / 'file'}")
    assert res.returncode == 2 and "is a file; give a folder" in res.stderr.strip().splitlines()[-1], res.stderr
