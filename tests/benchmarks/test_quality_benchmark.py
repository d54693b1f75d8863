"""benchmarks/quality.py runs end to end on the shared trained run: musenet-eval's numbers, generated pieces with
their statistics and the checks, the pieces written to look at."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_small_run_writes_prediction_generation_and_checks(tmp_path, trained_run):
    out = tmp_path / "quality"
    # The fixture dataset's test split may be empty (13 files): score and compare with its train split.
    res = run_benchmark("quality", f"--workdir={trained_run.workdir}", f"--data_dir={trained_run.data_dir}",
                        "--dataset=directory", "--split=train", "--num_pieces=2", "--seconds=2", f"--out={out}")
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
    assert [p["seed"] for p in pieces] == [0, 1]
    for piece in pieces:
        stats = piece["stats"]
        assert stats["seconds"] <= 2.0 + 0.1 + 1e-9  # a last drum hit may ring its written 0.1 s past the end
        guard = report["generation"]["settings"]["max_note_seconds"]
        assert stats["max_duration_s"] is None or stats["max_duration_s"] <= guard
    # Each piece beside the train split's pieces of its label (the fixture's labels: freedoom, classical).
    by_label = report["generation"]["by_label"]
    assert sorted(by_label) == ["00-none", "01-freedoom"]  # seed 0 asks for bach: not a label here
    assert by_label["00-none"]["train_pieces"] == 0 and by_label["00-none"]["notes_per_second"]["inside"] is None
    freedoom = by_label["01-freedoom"]["notes_per_second"]
    assert by_label["01-freedoom"]["train_pieces"] > 0 and freedoom["p10"] <= freedoom["p90"]
    assert freedoom["inside"] == (freedoom["p10"] <= freedoom["value"] <= freedoom["p90"])
    checks = report["checks"]
    assert set(checks) == {"no_note_longer_than_guard", "long_notes_at_most_1_percent", "median_polyphony_in_range",
                           "notes_per_second_in_range", "pitch_class_entropy_at_most_p90",
                           "model_10_percent_below_ngram"}
    assert all(isinstance(v, bool) for v in checks.values()) and checks["no_note_longer_than_guard"]
    assert len(list((out / "pieces").glob("*.mid"))) == 2 and len(list((out / "pieces").glob("*.png"))) == 2
    assert "model / best n-gram" in res.stdout and "PASS" in res.stdout


def test_bad_flags_are_one_line_usage_errors(tmp_path):
    res = run_benchmark("quality", "--model=x", f"--out={tmp_path}")
    assert res.returncode == 2 and "--data_dir and --out are required" in res.stderr
    assert "Traceback" not in res.stderr
