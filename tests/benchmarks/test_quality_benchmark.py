"""benchmarks/quality.py runs end to end on the shared trained run: musenet-eval's numbers, generated pieces with
their statistics and the checks, the pieces written to look at."""

from __future__ import annotations

import json

import pytest

from data_pipeline import datasets, music_stats
from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_small_run_writes_prediction_generation_and_checks(tmp_path, trained_run):
    out = tmp_path / "quality"
    # The fixture dataset's test split may be empty (13 files): score and compare with its train split.
    res = run_benchmark("quality", f"--workdir={trained_run.workdir}", f"--data_dir={trained_run.data_dir}",
                        "--dataset=directory", "--split=train", "--num_pieces=2", "--num_style_pieces=2", "--seconds=2",
                        f"--out={out}")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "quality.json").read_text())
    assert report["step"] == trained_run.steps[-1] and report["split"] == "train"
    pred = report["prediction"]
    for name in ("model", "unigram", "ngram"):
        assert pred[name]["bits_per_token"] > 0 and pred[name]["bits_per_second_no_velocity"] > 0
    # All three are scored on the same tokens, and the ratios are the model's over the n-gram's.
    assert pred["model"]["tokens"] == pred["unigram"]["tokens"] == pred["ngram"]["tokens"]
    assert report["ratios"]["bits_per_token"] == pytest.approx(
        pred["model"]["bits_per_token"] / pred["ngram"]["bits_per_token"])
    assert 1 <= pred["ngram"]["order"] <= 5
    pieces = report["generation"]["pieces"]
    assert [p["seed"] for p in pieces] == [0, 1] == [p["seed"] for p in report["generation"]["style_pieces"]]
    # The matched pieces take the split's own conditions: its labels and the instruments its pieces play.
    records = datasets.data_source(str(trained_run.data_dir), "directory", "train")
    vocab = datasets.load_vocab(str(trained_run.data_dir), "directory")
    split_labels = {records[i]["label"].decode() for i in range(len(records))}
    for piece in pieces:
        assert (piece["label"] or "") in split_labels
        assert any(set(piece["instruments"]) == {vocab.instruments.names[int(j)] for j in records[i]["instruments"]}
                   for i in range(len(records)))
    for piece in pieces + report["generation"]["style_pieces"]:
        stats = piece["stats"]
        assert stats["seconds"] <= 2.0 + 0.1 + 1e-9  # a last drum hit may ring its written 0.1 s past the end
        guard = report["generation"]["settings"]["max_note_seconds"]
        assert stats["max_duration_s"] is None or stats["max_duration_s"] <= guard
    # Each piece beside the train split's pieces of its label (the fixture's labels: freedoom, classical).
    by_label = report["generation"]["by_label"]
    assert sorted(by_label) == ["s00-none", "s01-freedoom"]  # seed 0 asks for bach: not a label here
    assert by_label["s00-none"]["train_pieces"] == 0 and by_label["s00-none"]["notes_per_second"]["inside"] is None
    freedoom = by_label["s01-freedoom"]["notes_per_second"]
    assert by_label["s01-freedoom"]["train_pieces"] > 0 and freedoom["p10"] <= freedoom["p90"]
    assert freedoom["inside"] == (freedoom["p10"] <= freedoom["value"] <= freedoom["p90"])
    checks = report["checks"]
    assert set(checks) == {"no_note_longer_than_guard", "long_notes_at_most_1_percent", "median_polyphony_in_range",
                           "notes_per_second_in_range", "pitch_class_entropy_at_most_p90",
                           "model_10_percent_below_ngram"}
    assert all(isinstance(v, bool) for v in checks.values()) and checks["no_note_longer_than_guard"]
    assert len(list((out / "pieces").glob("m*.mid"))) == 2 == len(list((out / "pieces").glob("s*.mid")))
    assert len(list((out / "pieces").glob("*.png"))) == 4
    assert "model / best n-gram" in res.stdout and "PASS" in res.stdout


def test_bad_flags_are_one_line_usage_errors(tmp_path):
    res = run_benchmark("quality", "--model=x", f"--out={tmp_path}")
    assert res.returncode == 2 and "--data_dir and --out are required" in res.stderr
    assert "Traceback" not in res.stderr


def test_matched_conditions_follow_the_reference_mix_with_every_condition_once():
    # 22 chorales, one quartet, one piece with drums: 8 pieces give each rare condition one and the rest to Bach.
    reference = [("bach", ("piano",))] * 22 + [("beethoven", ("violin", "cello")), ("freedoom", ("drums",))]
    picked = music_stats.matched_conditions(reference, 8)
    assert picked == [("bach", ("piano",))] * 6 + [("beethoven", ("violin", "cello")), ("freedoom", ("drums",))]
    # Largest remainder: 2 pieces left over 3:1 go 2:0 (shares 1.5 / 0.5, remainders tie: the first keeps it).
    assert music_stats.matched_conditions(list("aaab"), 4) == list("aaab")
    assert music_stats.matched_conditions(list("aaabbc"), 5) == list("aabbc")  # shares 2*3/6=1, 2*2/6=0.67, 0.33
    # More distinct conditions than pieces: the most frequent ones, ties in order of first appearance.
    assert music_stats.matched_conditions(list("abccd"), 2) == list("ca")
    assert music_stats.matched_conditions(list("ab"), 5) == list("aaabb")
