"""musenet-eval end to end: an export on a MIDI folder, a training workdir on a dataset split, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import datasets
from data_pipeline.vocab import Vocab
from musenet_jax import evaluation, export

FIELDS = {"path", "tokens", "notes", "seconds", "total_bits", "total_bits_no_velocity", "bits_per_token",
          "bits_per_note", "bits_per_second", "bits_per_second_no_velocity"}


@pytest.fixture
def run(trained_run):
    """The shared run (tests/conftest.py): a 10-step workdir on the fixtures' `directory` dataset (labels
    `freedoom`, `classical`), checkpoints at steps 5 and 10, and a float32 export of step 10. Read-only."""
    return trained_run


def musenet_eval(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.evaluate", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def check_result(result: dict) -> None:
    """The JSON's fields and the invariants between its numbers."""
    assert {"model", "step", "source", "context_tokens", "stride", "files", "skipped", "total"} <= set(result)
    for row in result["files"]:
        assert set(row) == FIELDS
        assert row["tokens"] > 0 and row["notes"] > 0 and row["seconds"] > 0
        assert row["bits_per_second"] * row["seconds"] == pytest.approx(row["total_bits"], rel=1e-9)
        assert row["total_bits_no_velocity"] < row["total_bits"]
    total = result["total"]
    assert set(total) == FIELDS - {"path"}
    for key in ("tokens", "notes", "seconds", "total_bits"):
        assert total[key] == pytest.approx(sum(row[key] for row in result["files"]), rel=1e-9)
    assert total["bits_per_token"] == pytest.approx(total["total_bits"] / total["tokens"], rel=1e-9)


@pytest.mark.slow
def test_load_checkpoint_matches_the_export(run):
    """`load_checkpoint` gives the parameters, vocabulary and step that the export of that step holds."""
    model, vocab, step = export.load_checkpoint(run.workdir)
    assert step == run.steps[-1] == 10 and vocab == Vocab.load(run.workdir / "vocab.json")
    exported, exported_vocab = export.load_export(run.export)
    assert exported_vocab == vocab
    piece = evaluation.EvalPiece.from_record(datasets.data_source(run.data_dir, "directory", "train")[0], vocab)
    a, b = (evaluation.score_pieces(evaluation.Scorer(m, vocab, batch_size=2), [piece])[0] for m in (model, exported))
    np.testing.assert_allclose(a.bits, b.bits, rtol=1e-6)
    # Another attention implementation over the same parameters (here the fused CPU kernel): same scores.
    other, _, _ = export.load_checkpoint(run.workdir, attention_impl="cpu")
    assert other.config.attention_impl == "cpu" and model.config.attention_impl == "xla"
    c = evaluation.score_pieces(evaluation.Scorer(other, vocab, batch_size=2), [piece])[0]
    np.testing.assert_allclose(c.bits, a.bits, rtol=1e-4, atol=1e-5)
    with pytest.raises(export.ExportError, match="no checkpoint at step 7"):
        export.load_checkpoint(run.workdir, step=7)


@pytest.mark.slow
@pytest.mark.e2e
def test_export_on_a_midi_folder_skips_unreadable_files(run, midi_fixtures, tmp_path):
    midi = tmp_path / "folder"
    (midi / "sub").mkdir(parents=True)
    shutil.copy(midi_fixtures / "freedoom1_D_E1M6.mid", midi / "b.mid")
    shutil.copy(midi_fixtures / "music21_test03_pedal.mid", midi / "sub" / "a.MIDI")
    (midi / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06 this is not a midi file")
    (midi / "empty.midi").write_bytes(b"")
    (midi / "notes.txt").write_text("not music")
    (midi / "gone.mid").symlink_to(tmp_path / "deleted.mid")  # a broken link is listed, not left out
    out = tmp_path / "results.json"
    res = musenet_eval("--model", run.export, "--midi_dir", midi, "--label", "freedoom", "--batch_size", 3,
                       "--out", out)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    check_result(result)
    assert result["step"] == 10 and result["model"] == str(run.export) and result["attention_impl"] == "xla"
    assert result["source"] == {"midi_dir": str(midi), "label": "freedoom"}
    assert [row["path"] for row in result["files"]] == [str(midi / "b.mid"), str(midi / "sub" / "a.MIDI")]
    assert sorted(s["path"] for s in result["skipped"]) == [str(midi / "corrupt.mid"), str(midi / "empty.midi"),
                                                            str(midi / "gone.mid")]
    assert all(s["reason"] for s in result["skipped"])
    assert "skipped" in res.stderr and "corrupt.mid" in res.stderr and "Traceback" not in res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["file", "tokens", "notes"] and lines[-1].startswith("TOTAL")
    assert f"{result['total']['bits_per_token']:.3f}" in lines[-1]


@pytest.mark.slow
@pytest.mark.e2e
def test_workdir_on_a_dataset_split(run, tmp_path):
    out = tmp_path / "split.json"
    res = musenet_eval("--workdir", run.workdir, "--split", "train", "--data_dir", run.data_dir,
                       "--dataset", "directory", "--max_files", 3, "--stride", 20, "--attention_impl", "cpu",
                       "--out", out)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    check_result(result)
    assert result["attention_impl"] == "cpu"
    assert (result["step"], result["stride"], result["context_tokens"]) == (10, 20, 64)
    assert result["source"] == {"data_dir": str(run.data_dir), "dataset": "directory", "split": "train"}
    source = datasets.data_source(run.data_dir, "directory", "train")
    # Scored tokens are the records' body tokens, all of them.
    assert [row["tokens"] for row in result["files"]] == [len(source[i]["tokens"]) for i in range(3)]
    assert result["skipped"] == []


def _dataset_with_other_vocab(run, tmp_path):
    """A copy of the built dataset whose vocab.json has an extra label (so every id but the labels agrees)."""
    src = datasets.dataset_dir(run.data_dir, "directory")
    copy = tmp_path / "tfds"
    dst = copy / datasets.DATASET_NAME / "directory" / src.rsplit("/", 1)[-1]
    shutil.copytree(src, dst)
    vocab = json.loads((dst / "vocab.json").read_text())
    vocab["labels"] = [*vocab["labels"], "zzz"]
    vocab["size"] += 1
    (dst / "vocab.json").write_text(json.dumps(vocab))
    return copy


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("case", ["no_args", "both_models", "missing_model_dir", "no_checkpoints", "split_only",
                                  "missing_midi_dir", "unknown_label", "other_vocab", "bad_stride",
                                  "bad_attention_impl", "empty_split"])
def test_errors_are_one_line_without_output(run, midi_fixtures, tmp_path, case):
    empty = tmp_path / "empty_workdir"
    empty.mkdir()
    midi = tmp_path / "midi"
    midi.mkdir()
    shutil.copy(midi_fixtures / "freedoom1_D_INTRO.mid", midi / "x.mid")
    model = ("--model", run.export)
    args = {
        "no_args": (),
        "both_models": (*model, "--workdir", run.workdir, "--midi_dir", midi),
        "missing_model_dir": ("--model", tmp_path / "nope", "--midi_dir", midi),
        "no_checkpoints": ("--workdir", empty, "--midi_dir", midi),
        "split_only": (*model, "--split", "test"),
        "missing_midi_dir": (*model, "--midi_dir", tmp_path / "nope"),
        "unknown_label": (*model, "--midi_dir", midi, "--label", "baroque"),
        "other_vocab": (*model, "--split", "train", "--data_dir", _dataset_with_other_vocab(run, tmp_path),
                        "--dataset", "directory"),
        "bad_stride": (*model, "--midi_dir", midi, "--stride", 64),
        # The fixture dataset's 13 files split 12 / 1 / 0 (by content hash).
        "empty_split": (*model, "--split", "test", "--data_dir", run.data_dir, "--dataset", "directory"),
        "bad_attention_impl": (*model, "--midi_dir", midi, "--attention_impl", "cuda"),
    }[case]
    expected = {"no_args": "exactly one of --workdir or --model", "both_models": "exactly one",
                "missing_model_dir": "no such directory", "no_checkpoints": "no checkpoints",
                "split_only": "--split needs --data_dir", "missing_midi_dir": "no such directory",
                "unknown_label": "unknown label 'baroque'",
                "other_vocab": "vs dataset: labels: ['classical', 'freedoom'] vs ['classical', 'freedoom', 'zzz']",
                "bad_stride": "--stride must be at most",
                "empty_split": "split 'test' has no records (this build: train 12, validation 1, test 0)",
                "bad_attention_impl": "--attention_impl must be one of reference, xla, cpu, pallas"}[case]
    out = tmp_path / "out.json"
    res = musenet_eval(*args, "--out", out)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob("out.json*"))
