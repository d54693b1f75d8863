"""musenet-stats as a user runs it: a MIDI folder, a dataset split, a reference comparison, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_pipeline import datasets
from tests.data_pipeline import midi_factory

pytestmark = pytest.mark.e2e


def musenet_stats(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.stats", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def folder(tmp_path):
    """Three hand-made pieces (tests/data_pipeline/midi_factory.py), one corrupt file and a text file."""
    root = tmp_path / "pieces"
    (root / "sub").mkdir(parents=True)
    (root / "scale.mid").write_bytes(midi_factory.c_major_scale())
    (root / "sub" / "chord.MIDI").write_bytes(midi_factory.held_chord_and_melody())
    (root / "gaps.mid").write_bytes(midi_factory.notes_with_gaps_and_drums())
    (root / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06 this is not a midi file")
    (root / "notes.txt").write_text("not music")
    return root


def test_a_folder_per_file_pooled_and_percentiles(folder, tmp_path):
    out = tmp_path / "stats.json"
    res = musenet_stats(folder, "--out", out)
    assert res.returncode == 0, res.stderr
    skipped = res.stderr.strip().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {folder / 'corrupt.mid'}: "), res.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"source", "long_note_s", "files", "skipped", "pooled", "percentiles"}
    assert result["source"] == {"paths": [str(folder)]} and result["long_note_s"] == 4.0
    assert [f["path"] for f in result["files"]] == [str(folder / "gaps.mid"), str(folder / "scale.mid"),
                                                    str(folder / "sub" / "chord.MIDI")]
    assert [s["path"] for s in result["skipped"]] == [str(folder / "corrupt.mid")]
    gaps, scale, chord = result["files"]
    assert (scale["seconds"], scale["notes"], scale["duration_median_s"], scale["pitch_range"]) == (4.0, 8, 0.5, 12)
    assert chord["long_note_share"] == pytest.approx(3 / 7) and chord["polyphony_mean"] == pytest.approx(3.2)
    assert chord["instruments"] == ["piano", "violin"] and gaps["instruments"] == ["piano", "drums"]
    assert gaps["silence_share"] == pytest.approx(3.9 / 7)
    pooled = result["pooled"]
    # 7 + 4 + 7 s; 5 + 8 + 7 notes; 3 of the 18 pitched notes are long (the chord).
    assert (pooled["seconds"], pooled["notes"]) == (18.0, 20) and pooled["long_note_share"] == pytest.approx(3 / 18)
    # Notes per file 5, 7, 8: p10 at rank 0.2 -> 5.4.
    assert result["percentiles"]["p50"]["seconds"] == 7.0
    assert result["percentiles"]["p10"]["notes"] == pytest.approx(5.4)

    lines = res.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["file", "seconds", "notes", "notes/s"]
    names = [line.split()[0] for line in lines[1:]]
    assert names[3:] == ["POOLED", "p10", "p50", "p90"]
    # Long paths keep their end.
    assert all(f["path"].endswith(name.removeprefix("...")) for name, f in zip(names[:3], result["files"], strict=True))
    assert names[2].endswith("sub/chord.MIDI")
    assert lines[3].split()[1:4] == ["7.0", "7", "1.00"]  # chord: 7 s, 7 notes
    assert lines[4].split()[1:3] == ["18.0", "20"]

    # Without per-file rows; files given one by one, and a higher long-note threshold.
    res = musenet_stats(folder / "scale.mid", folder / "sub" / "chord.MIDI", "--noper_file", "--long_note_s", 6)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["file", "POOLED", "p10", "p50", "p90"]
    assert lines[1].split()[1:3] == ["11.0", "15"] and lines[1].split()[7] == "0.0"  # 6 s notes are not > 6 s


def test_a_dataset_split_against_a_midi_reference(data_dir, folder, tmp_path):
    out = tmp_path / "split.json"
    res = musenet_stats("--data_dir", data_dir, "--dataset", "directory", "--split", "train", "--max_files", 4,
                        "--reference", folder / "scale.mid", "--reference", folder / "sub", "--out", out)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert result["source"] == {"data_dir": data_dir, "dataset": "directory", "split": "train"}
    source = datasets.data_source(data_dir, "directory", "train")
    records = [source[i] for i in range(4)]
    assert [f["path"] for f in result["files"]] == [r["path"].decode() for r in records]
    for row, record in zip(result["files"], records):
        # The record's own note count and length (time of its last event; a drum hit there lasts 0.1 s more).
        assert row["notes"] == record["num_notes"]
        assert record["duration_s"] - 1e-4 <= row["seconds"] <= record["duration_s"] + 0.1 + 1e-4
    assert result["reference"]["pieces"] == 2 and result["reference"]["source"] == {
        "paths": [str(folder / "scale.mid"), str(folder / "sub")]}
    by_stat = {r["stat"]: r for r in result["comparison"]}
    # Reference: the scale (0.5 s) and the chord piece (1 s): p10 0.55, p90 0.95.
    assert by_stat["duration_median_s"]["low"] == pytest.approx(0.55)
    assert by_stat["duration_median_s"]["high"] == pytest.approx(0.95)
    median = by_stat["polyphony_mean"]["median"]
    assert by_stat["polyphony_mean"]["inside"] == (1.22 - 1e-9 <= median <= 2.98 + 1e-9)  # 1 and 3.2 -> 1.22, 2.98
    table = res.stdout[res.stdout.index("against the reference"):].splitlines()
    assert table[1].split() == ["statistic", "pooled", "median", "ref", "p10", "ref", "p90", "inside?"]
    assert [line.split()[0] for line in table[2:]] == [r["stat"] for r in result["comparison"]]


def test_a_midi_folder_against_a_dataset_reference(data_dir, folder):
    res = musenet_stats(folder / "scale.mid", "--reference_data_dir", data_dir, "--reference_dataset", "directory",
                        "--reference_split", "train")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout[res.stdout.index("statistic"):].splitlines()}
    # A scale of single quarter notes has polyphony 1: far below any of the fixtures' pieces.
    assert rows["polyphony_mean"][1:3] == ["1", "1"] and rows["polyphony_mean"][-1] == "NO"
    assert "(12 pieces)" in res.stdout


@pytest.mark.parametrize("case", ["no_args", "unknown_flag", "split_without_data_dir", "both_sources",
                                  "reference_split_alone", "vocab_with_split", "missing_path", "all_unreadable",
                                  "no_midi_files", "out_is_a_folder", "unreadable_reference"])
def test_errors_are_one_line(case, folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mid").write_bytes(b"not midi")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hi")
    args, code, expected = {
        "no_args": ((), 2, "nothing to measure"),
        "unknown_flag": ((folder, "--per_files"), 2, "Unknown command line flag 'per_files'"),
        "split_without_data_dir": (("--split", "test"), 2, "nothing to measure"),
        "both_sources": ((folder, "--data_dir", tmp_path, "--split", "test"), 2, "not both"),
        "reference_split_alone": ((folder, "--reference_split", "test"), 2,
                                  "--reference_data_dir and --reference_split go together"),
        "vocab_with_split": (("--data_dir", tmp_path, "--split", "test", "--vocab", "v.json"), 2,
                             "--vocab is for reading MIDI files"),
        "missing_path": ((folder, tmp_path / "nope.mid"), 1, "nope.mid: no such file or folder"),
        "all_unreadable": ((bad,), 1, "nothing to measure: all 1 files were skipped"),
        "no_midi_files": ((tmp_path / "text",), 1, "no .mid or .midi files"),
        "out_is_a_folder": ((folder, "--out", tmp_path), 2, "is a folder"),
        "unreadable_reference": ((folder, "--reference", bad, "--out", tmp_path / "out.json"), 1,
                                 "nothing to measure in the reference: all 1 files were skipped"),
    }[case]
    res = musenet_stats(*args)
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.strip().splitlines() if not line.startswith("skipped ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], res.stderr
    assert res.stdout == "" and not (tmp_path / "out.json").exists()
