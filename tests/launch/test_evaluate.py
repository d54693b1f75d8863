"""musenet-eval end to end: an export on a MIDI folder, a training workdir on a dataset split, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import datasets, windows
from data_pipeline.vocab import Vocab
from musenet_jax import evaluation, export, ngram
from tests.checkpoint_faults import damage

FIELDS = {"path", "tokens", "notes", "seconds", "total_bits", "total_bits_no_velocity", "bits_per_token",
          "bits_per_note", "bits_per_second", "bits_per_second_no_velocity"}
NGRAM_FIELDS = {"order", "validation_bits_per_token", "train_tokens", "train_pieces", "train_source"}


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
    assert {"model", "step", "source", "context_tokens", "stride", "files", "skipped", "total", "baselines",
            "model_vs_ngram"} <= set(result)
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
    if result["baselines"] is None:
        assert result["model_vs_ngram"] is None
        return
    unigram, ngram_total = result["baselines"]["unigram"], result["baselines"]["ngram"]
    assert set(unigram) == FIELDS - {"path"} and set(ngram_total) == (FIELDS - {"path"}) | NGRAM_FIELDS
    for baseline in (unigram, ngram_total):  # scored on exactly the model's tokens
        assert all(baseline[k] == total[k] for k in ("tokens", "notes", "seconds"))
        assert baseline["total_bits_no_velocity"] < baseline["total_bits"]
    ratios = result["model_vs_ngram"]
    assert ratios["bits_per_token_ratio"] == pytest.approx(total["bits_per_token"] / ngram_total["bits_per_token"])
    assert ratios["bits_per_second_no_velocity_ratio"] == pytest.approx(
        total["bits_per_second_no_velocity"] / ngram_total["bits_per_second_no_velocity"])


def check_summary(stdout: str, result: dict) -> None:
    """The summary table after the per-file one: model / unigram / n-gram rows and the verdict line."""
    lines = stdout.strip().splitlines()
    order = result["baselines"]["ngram"]["order"]
    rows = {line.rsplit(None, 3)[0]: line.split()[-3:] for line in lines[-4:-1]}
    assert list(rows) == ["model", "unigram", f"n-gram (order {order})"], lines[-5:]
    for name, key in (("model", "total"), ("unigram", "unigram"), (f"n-gram (order {order})", "ngram")):
        metrics = result[key] if key == "total" else result["baselines"][key]
        assert rows[name] == [f"{metrics['bits_per_token']:.3f}", f"{metrics['bits_per_second']:.1f}",
                              f"{metrics['bits_per_second_no_velocity']:.1f}"]
    ratios = result["model_vs_ngram"]
    change = (f"{100 * (ratios['bits_per_token_ratio'] - 1):+.1f}% bits/token, "
              f"{100 * (ratios['bits_per_second_no_velocity_ratio'] - 1):+.1f}% bits/s (no velocity)")
    beats = ratios["bits_per_token_ratio"] < 1 and ratios["bits_per_second_no_velocity_ratio"] < 1
    assert lines[-1] == (f"model vs best n-gram: {change}" if beats else
                         f"model does NOT beat the n-gram baseline ({change})")


@pytest.mark.slow
def test_load_checkpoint_matches_the_export(run):
    """`load_checkpoint` gives the parameters, vocabulary and step that the export of that step holds."""
    model, vocab, step = export.load_checkpoint(run.workdir)
    assert step == run.steps[-1] == 10 and vocab == Vocab.load(run.workdir / "vocab.json")
    exported, exported_vocab = export.load_export(run.export)
    assert exported_vocab == vocab
    piece = windows.parse_record(datasets.data_source(run.data_dir, "directory", "train")[0], vocab)
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
    # No data to train an n-gram on: said in one line, and null in the JSON.
    assert result["baselines"] is None and result["model_vs_ngram"] is None
    note = [line for line in res.stderr.splitlines() if "no n-gram baseline" in line]
    assert len(note) == 1 and "--baseline_data_dir" in note[0] and "--baseline_train" in note[0]
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

    # Baselines: trained on the whole train split (12 records, prefixes included), the order chosen on the
    # validation split (1 record), scored on the same windows and tokens as the model.
    vocab = datasets.load_vocab(run.data_dir, "directory")
    train = ngram.read_sequences(source, vocab)
    held_out = ngram.read_sequences(datasets.data_source(run.data_dir, "directory", "validation"), vocab)
    best, bits = ngram.select_order(ngram.NgramModel.fit(train.tokens, vocab.size, 5), held_out.tokens,
                                    context_lengths=held_out.prefix_lengths)
    baseline = result["baselines"]["ngram"]
    assert (baseline["order"], baseline["train_pieces"], baseline["train_tokens"]) == (best, 12, train.num_tokens)
    assert baseline["validation_bits_per_token"] == pytest.approx({str(k): v for k, v in bits.items()}, rel=1e-9)
    assert baseline["train_source"] == {"data_dir": str(run.data_dir), "dataset": "directory", "split": "train",
                                        "order_chosen_on": "validation split"}
    # Both baselines scored by the same windows (context 64, stride 20) of the same 3 pieces.
    model = ngram.NgramModel.fit(train.tokens, vocab.size, best)
    pieces = [windows.parse_record(source[i], vocab) for i in range(3)]
    for name, order in (("unigram", 1), ("ngram", best)):
        scorer = evaluation.NgramScorer(model.with_order(order), vocab, seq_len=64, batch_size=5)
        expected = evaluation.total_metrics(evaluation.score_pieces(scorer, pieces, stride=20))
        for key in ("total_bits", "total_bits_no_velocity"):
            assert result["baselines"][name][key] == pytest.approx(expected[key], rel=1e-9), (name, key)
    check_summary(res.stdout, result)
    assert f"baselines: {best}-gram (held-out bits/token 1: " in res.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_baselines_trained_on_a_midi_folder(run, midi_fixtures, tmp_path):
    midi = tmp_path / "scored"
    midi.mkdir()
    shutil.copy(midi_fixtures / "freedoom1_D_E1M6.mid", midi / "a.mid")
    out = tmp_path / "results.json"
    res = musenet_eval("--model", run.export, "--midi_dir", midi, "--label", "freedoom", "--baseline_train",
                       midi_fixtures, "--baseline_order", 2, "--out", out)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    check_result(result)
    baseline = result["baselines"]["ngram"]
    files = sorted(midi_fixtures.glob("*.mid"))
    assert baseline["order"] == 2 and baseline["validation_bits_per_token"] is None
    assert baseline["train_source"] == {"midi_dir": str(midi_fixtures), "label": "freedoom"}
    assert baseline["train_pieces"] == len(files)  # every fixture file is usable
    # The scored file is among the training files, encoded the same way (same label): the bigram knows it well.
    assert baseline["bits_per_token"] < result["baselines"]["unigram"]["bits_per_token"]
    check_summary(res.stdout, result)
    assert "not measured: order given" in res.stderr


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
def test_a_damaged_checkpoint_is_one_line_and_step_chooses_another(run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run.workdir, damaged)
    path = damage(damaged / "checkpoints" / "10", "random bytes")
    args = ("--workdir", damaged, "--split", "train", "--data_dir", run.data_dir, "--dataset", "directory",
            "--max_files", 1, "--baselines=false", "--out", tmp_path / "out.json")
    res = musenet_eval(*args)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {damaged} step 10: the checkpoint cannot be read "
                               f"({path.relative_to(damaged / 'checkpoints' / '10')}: contents differ from the "
                               "manifest (CRC-32 "), lines[0]
    assert lines[0].endswith("; choose another with --step: 5") and not (tmp_path / "out.json").exists()
    res = musenet_eval(*args, "--step", 5)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out.json").read_text())["step"] == 5


@pytest.mark.parametrize("task", ["infill", "accompany"])
def test_task_scores_spans_by_infilling_beside_continuation(run, tmp_path, task):
    """--task=infill|accompany: the JSON's totals are `infill_scoring`'s on the same pieces and spans."""
    from musenet_jax import export, infill_scoring

    out = tmp_path / "task.json"
    res = musenet_eval("--model", run.export, "--split", "train", "--data_dir", run.data_dir, "--dataset",
                       "directory", "--max_files", 6, "--task", task, "--spans_per_piece", 2, "--task_seed", 5,
                       "--out", out)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert (result["task"], result["spans_per_piece"], result["task_seed"]) == (task, 2, 5)
    model, vocab = export.load_export(run.export)
    source = datasets.data_source(run.data_dir, "directory", "train")
    pieces = [windows.parse_record(source[i], vocab) for i in range(6)]
    examples, skipped = infill_scoring.span_examples(pieces, task, vocab, 64, spans_per_piece=2, seed=5)
    expected = infill_scoring.score_spans(evaluation.Scorer(model, vocab, batch_size=8), examples)
    assert result["skipped_spans"] == skipped and result["total"]["spans"] == len(examples) > 0
    for key in ("event_tokens", "infill_bits_per_event", "continuation_bits_per_event", "middle_tokens"):
        assert result["total"][key] == pytest.approx(expected[key], rel=1e-6), key
    assert f"{task} vs continuation:" in res.stdout


@pytest.mark.parametrize("extra, message", [
    (("--task", "infill", "--stride", 8), "--stride do(es) not apply to --task=infill"),
    (("--task", "accompany", "--baselines=false"), "--baselines do(es) not apply to --task=accompany"),
    (("--spans_per_piece", 3), "--spans_per_piece goes with --task=infill or --task=accompany"),
    (("--task", "infill", "--spans_per_piece", 0), "--spans_per_piece must be >= 1"),
    (("--task", "fill"), "value should be one of <continue|infill|accompany>"),
])
def test_task_flag_errors_are_one_line(run, tmp_path, extra, message):
    res = musenet_eval("--model", run.export, "--split", "train", "--data_dir", run.data_dir, "--dataset",
                       "directory", *extra, "--out", tmp_path / "x.json")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("case", ["no_args", "both_models", "missing_model_dir", "no_checkpoints", "split_only",
                                  "missing_midi_dir", "unknown_label", "other_vocab", "bad_stride",
                                  "bad_attention_impl", "empty_split", "baseline_train_with_split",
                                  "baseline_flag_without_baselines", "bad_baseline_order", "baseline_split_alone",
                                  "no_usable_baseline_midi"])
def test_errors_are_one_line_without_output(run, midi_fixtures, tmp_path, case):
    empty = tmp_path / "empty_workdir"
    empty.mkdir()
    midi = tmp_path / "midi"
    midi.mkdir()
    shutil.copy(midi_fixtures / "freedoom1_D_INTRO.mid", midi / "x.mid")
    bad_midi = tmp_path / "bad_midi"
    bad_midi.mkdir()
    (bad_midi / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06 this is not a midi file")
    (bad_midi / "empty.midi").write_bytes(b"")
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
        "baseline_train_with_split": (*model, "--split", "train", "--data_dir", run.data_dir, "--dataset",
                                      "directory", "--baseline_train", midi),
        "baseline_flag_without_baselines": (*model, "--midi_dir", midi, "--baselines=false", "--baseline_order", 3),
        "bad_baseline_order": (*model, "--midi_dir", midi, "--baseline_train", midi, "--baseline_order", 11),
        "baseline_split_alone": (*model, "--midi_dir", midi, "--baseline_split", "validation"),
        "no_usable_baseline_midi": (*model, "--midi_dir", midi, "--baseline_train", bad_midi),
    }[case]
    expected = {"no_args": "exactly one of --workdir or --model", "both_models": "exactly one",
                "missing_model_dir": "no such directory", "no_checkpoints": "no checkpoints",
                "split_only": "--split needs --data_dir", "missing_midi_dir": "no such directory",
                "unknown_label": "unknown label 'baroque'",
                "other_vocab": "vs dataset: labels: ['classical', 'freedoom'] vs ['classical', 'freedoom', 'zzz']",
                "bad_stride": "--stride must be at most",
                "empty_split": "split 'test' has no records (this build: train 12, validation 1, test 0)",
                "bad_attention_impl": "--attention_impl must be one of reference, xla, cpu, pallas",
                "baseline_train_with_split": "--baseline_data_dir and --baseline_train go with --midi_dir",
                "baseline_flag_without_baselines": "--baseline_order goes with --baselines",
                "bad_baseline_order": "--baseline_order must be in 0..10",
                "baseline_split_alone": "--baseline_split names a split of a dataset",
                "no_usable_baseline_midi": f"{bad_midi}: no usable MIDI files to train the baselines on (2 .mid / "
                                           ".midi files, 2 unreadable)"}[case]
    out = tmp_path / "out.json"
    res = musenet_eval(*args, "--out", out)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob("out.json*"))
