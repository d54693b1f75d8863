"""Run-directory files: local paths made absolute, URLs kept, whole-file writes, object-store metrics log."""

from __future__ import annotations

import json
import os
import struct

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


def _events(path) -> list:
    """The Event protos of a TensorBoard event file (TFRecord: length, its CRC, data, the data's CRC)."""
    from tensorboardX.proto import event_pb2

    raw, events, i = path.read_bytes(), [], 0
    while i < len(raw):
        (length,) = struct.unpack("<Q", raw[i:i + 8])
        events.append(event_pb2.Event.FromString(raw[i + 12:i + 12 + length]))
        i += 12 + length + 4
    return events


def test_a_resumed_run_hides_what_was_logged_after_its_checkpoint(tmp_path):
    crashed = reporting.Reporter(tmp_path, 10, start_step=0)
    for step in range(1, 6):  # steps 4 and 5 were logged, then the run died with a checkpoint at step 3
        crashed.scalars(step, {"train/loss": float(step)})
    crashed.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tr')  # torn by the crash
    resumed = reporting.Reporter(tmp_path, 10, start_step=3)
    resumed.scalars(4, {"train/loss": 40.0})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # TensorBoard: the new file starts with a SessionLog START at step 4, which makes readers drop the earlier
    # file's points at steps >= 4.
    newest = max((tmp_path / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    starts = [e.step for e in _events(newest) if e.HasField("session_log")
              and e.session_log.status == e.session_log.START]
    assert starts == [4]
