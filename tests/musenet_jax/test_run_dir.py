"""Run-directory files: local paths made absolute, URLs kept, whole-file writes, object-store metrics log."""

from __future__ import annotations

import json
import os

from musenet_jax import reporting, run_dir


def test_resolve_keeps_urls_and_absolutises_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(run_dir.resolve("runs/x")) == os.path.join(str(tmp_path), "runs", "x")
    assert os.fspath(run_dir.resolve("gs://bucket/runs/x")) == "gs://bucket/runs/x"
    assert run_dir.is_remote("gs://b/x") and not run_dir.is_remote("runs/gs:/x")


def test_write_json_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = run_dir.resolve(tmp_path) / "final_metrics.json"
    run_dir.write_json(path, {"a": 1})
    run_dir.write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert sorted(os.listdir(tmp_path)) == ["final_metrics.json"]


def test_reporter_rewrites_metrics_log_on_object_storage(tmp_path, monkeypatch):
    """Object stores cannot append: the log is rewritten whole, keeping what an earlier run wrote."""
    def lines():
        return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    local = reporting.Reporter(tmp_path, 10)
    local.scalars(1, {"train/loss": 3.0})
    local.close()
    monkeypatch.setattr(run_dir, "is_remote", lambda path: True)
    remote = reporting.Reporter(tmp_path, 10)
    remote.scalars(2, {"train/loss": 2.5})
    assert [r["step"] for r in lines()] == [1, 2]
    remote.scalars(3, {"train/loss": 2.0})
    remote.close()
    assert lines() == [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.5},
                       {"step": 3, "train/loss": 2.0}]
