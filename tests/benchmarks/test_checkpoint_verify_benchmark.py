"""benchmarks/checkpoint_verify.py runs end to end at a small size and writes its JSON; bad flags are one line."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


def test_small_run_times_verification_against_plain_reads(tmp_path):
    out = tmp_path / "sub" / "verify.json"
    res = run_benchmark("checkpoint_verify", "--megabytes=4", "--arrays=3", "--repeats=1", f"--out={out}",
                        f"--dir={tmp_path / 'ck'}")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert 2e6 < report["bytes"] < 5e6 and report["files"] >= 3
    rows = {r["row"]: r for r in report["results"]}
    assert list(rows) == ["read", "verify", "manifest", "orbax restore"]
    assert rows["read"]["vs_read"] == 1.0
    for r in rows.values():
        assert r["seconds"] > 0 and r["s_per_gb"] == pytest.approx(r["seconds"] / (report["bytes"] / 1e9))
        assert r["vs_read"] == pytest.approx(r["seconds"] / rows["read"]["seconds"])
    assert "verify" in res.stdout and "s/GB" in res.stdout
    assert (tmp_path / "ck" / "checkpoints" / "1" / "manifest.0-of-1.json").is_file()  # --dir: kept


@pytest.mark.parametrize("flag, message", [
    ("--megabytes=0", "--megabytes, --arrays and --repeats must be >= 1"),
    ("--out={tmp}", "--out {tmp} is a folder; give a file name"),
    ("--dir={tmp}", "--dir {tmp} is not empty; give a new or empty folder"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
    (tmp_path / "something").write_text("")
    flag, message = flag.format(tmp=tmp_path), message.format(tmp=tmp_path)
    res = run_benchmark("checkpoint_verify", f"--out={tmp_path / 'r.json'}", flag)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), res.stderr
    assert not (tmp_path / "r.json").exists()
