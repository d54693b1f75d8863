"""benchmarks/infill.py runs end to end on the shared trained run: each rewrite checked (kept notes verbatim,
written notes inside the span, exact to the time unit), its music beside the source's, the pieces written."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_rewrites_of_the_first_pieces_are_checked_and_written(tmp_path, trained_run):
    out = tmp_path / "infill"
    res = run_benchmark("infill", f"--model={trained_run.export}", f"--data_dir={trained_run.data_dir}",
                        "--dataset=directory", "--split=train", "--num_pieces=2", "--accompany_seconds=2",
                        f"--out={out}")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "infill.json").read_text())
    rewrites = report["rewrites"]
    infills = [r for r in rewrites if r["task"] == "infill"]
    assert len(infills) == 2 and len(rewrites) > 2  # the fixtures' Freedoom pieces have several parts
    for r in rewrites:
        assert r["checks"] == {"kept": True, "inside": True, "length": True}, r
        assert 0 <= r["span"][0] < r["span"][1] and r["written"]["notes"] >= 0
    assert report["checks"] == {"kept": True, "inside": True, "length": True}
    names = sorted(p.name for p in (out / "pieces").iterdir())
    assert len(names) == 2 * len(rewrites) and len(set(names)) == len(names)  # MIDI and PNG, none overwritten
    assert "all rewrites: kept verbatim True" in res.stdout
