"""benchmarks/tokenize.py and benchmarks/roundtrip_check.py run end to end on the fixture MIDI files."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.data_pipeline import midi_factory

pytestmark = pytest.mark.e2e

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def midi_dir(midi_fixtures, tmp_path):
    """Three fixture files in nested folders, plus a file that is not MIDI."""
    root = tmp_path / "midi"
    for i, name in enumerate(["bach_bwv1.6.mid", "freedoom1_D_E1M1.mid", "mozart_k525short_pedal.mid"]):
        (root / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(midi_fixtures / name, root / f"set{i % 2}" / name)
    (root / "set0" / "broken.mid").write_bytes(b"RIFF not a midi file")
    return root


def test_tokenize_benchmark_table_and_json(midi_dir, tmp_path):
    out = tmp_path / "results.json"
    res = _run("tokenize.py", f"--midi_dir={midi_dir}", f"--out={out}", "--repeats=1")
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert result["files_found"] == 4 and result["files_excluded"] == 1 and result["io_excluded"]
    assert result["failures"]["ours_symusic"] == 1
    rows = {r["tokenizer"]: r for r in result["rows"]}
    assert set(rows) == {"ours_symusic", "ours_miditoolkit", "miditok_remi"}
    # The same files and notes for every tokenizer; our two readers give the same tokens.
    assert {(r["files"], r["notes"]) for r in rows.values()} == {(3, rows["miditok_remi"]["notes"])}
    assert rows["ours_symusic"]["tokens"] == rows["ours_miditoolkit"]["tokens"] > 0
    assert rows["miditok_remi"]["ratio"] == 1.0
    for r in rows.values():
        assert r["notes_per_s"] == pytest.approx(r["notes"] / r["seconds"])
        assert r["seconds"] == min(r["cpu_seconds"])
    for name in rows:
        assert name in res.stdout  # the table


def test_tokenize_benchmark_bad_flags(tmp_path):
    res = _run("tokenize.py", f"--midi_dir={tmp_path / 'missing'}", f"--out={tmp_path / 'r.json'}")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    res = _run("tokenize.py", f"--midi_dir={tmp_path}", "--tokenizers=ours_symusic,nope")
    assert res.returncode == 2 and "nope" in res.stderr


def test_roundtrip_check_passes_and_snapshots(midi_dir, tmp_path):
    (midi_dir / "set0" / "broken.mid").unlink()
    snapshot = tmp_path / "tokens.npz"
    res = _run("roundtrip_check.py", f"--midi_dir={midi_dir}", f"--save={snapshot}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "files encoded: 3" in res.stdout and "problems: 0" in res.stdout
    res = _run("roundtrip_check.py", f"--midi_dir={midi_dir}", f"--compare={snapshot}")
    assert res.returncode == 0 and "snapshot entries compared: 6" in res.stdout

    # A snapshot that differs in one token is caught.
    with np.load(snapshot) as saved:
        entries = {k: saved[k] for k in saved.files}
    key = next(k for k in entries if k.startswith("symusic:") and "bach" in k)
    entries[key] = entries[key].copy()
    entries[key][-2] += 1
    np.savez(tmp_path / "tampered.npz", **entries)
    res = _run("roundtrip_check.py", f"--midi_dir={midi_dir}", f"--compare={tmp_path / 'tampered.npz'}")
    assert res.returncode == 1 and f"MISMATCH {key}: differs from the snapshot" in res.stdout


def test_roundtrip_check_reports_a_reader_disagreement(midi_dir):
    (midi_dir / "set0" / "broken.mid").unlink()  # rejected by both readers: not a disagreement
    # A program change while a note sounds: miditoolkit moves the note to the new program.
    tracks = [[(0, "program", 0, 24), (0, "on", 0, 43, 100), (200, "program", 0, 32), (480, "off", 0, 43)]]
    (midi_dir / "program_change.mid").write_bytes(midi_factory.midi_bytes(tracks))
    res = _run("roundtrip_check.py", f"--midi_dir={midi_dir}")
    assert res.returncode == 1 and "MISMATCH program_change.mid: readers disagree" in res.stdout
    # Listed as a known difference, it passes.
    res = _run("roundtrip_check.py", f"--midi_dir={midi_dir}", "--reader_mismatch_ok=program_change.mid")
    assert res.returncode == 0 and "known reader mismatch: 1" in res.stdout, res.stdout
