"""benchmarks/generate.py runs end to end at tiny sizes (--quick) and writes its table's JSON."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


def _run(*args: str):
    return run_benchmark("generate", *args)


@pytest.mark.slow
def test_quick_run_writes_rows_and_ratios(tmp_path):
    out = tmp_path / "sub" / "results.json"
    res = _run("--quick", "--repeats=1", "--steps=2", f"--out={out}")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    positions, batches = report["config"]["positions"], report["config"]["batches"]
    assert positions == [16, 64, 128] and batches == [1, 2]
    keys = {(r["method"], r["batch"], r["position"]) for r in report["rows"]}
    for batch in batches:
        for p in positions:
            assert {("cached-strided", batch, p), ("cached-dense", batch, p)} <= keys
    # Naive rows only where batch * position <= 128; the others are skipped with a note.
    assert {k for k in keys if k[0] == "naive-strided"} == {("naive-strided", 1, p) for p in positions} | {
        ("naive-strided", 2, 16), ("naive-strided", 2, 64)}
    assert any("skipped" in note for note in report["notes"])
    for r in report["rows"]:
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["seconds"])
    ratios = report["ratios"]["batch1"]
    assert ratios["strided_step_128_over_16"] > 0 and ratios["naive_over_cached_strided_at_64"] > 0
    # The sparse caches read far fewer entries per step than the dense ones (l + 1 and ceil(L / l) vs L).
    cache = report["cache_tokens"]
    assert cache["strided"]["read_head_tokens_per_step"] < cache["dense"]["read_head_tokens_per_step"]
    assert "ms/step" in res.stdout and "ratios" in res.stdout


def test_bad_flag_is_one_line_error(tmp_path):
    res = _run("--quick", "--steps=0", f"--out={tmp_path / 'r.json'}")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error: --repeats and --steps must be >= 1")
    assert not (tmp_path / "r.json").exists()
