"""benchmarks/train_step.py runs end to end at a small size and writes its JSON; bad flags are one line."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


def _run(*args: str):
    return run_benchmark("train_step", *args)


@pytest.mark.slow
def test_small_run_writes_tokens_per_second_and_fraction_of_matmul(tmp_path):
    out = tmp_path / "sub" / "train_step.json"
    res = _run("--configs=tiny", "--batch_size=1", "--seq_len=48", "--steps=1", f"--out={out}")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["matmul_gflops"] > 0
    (row,) = report["results"]
    assert (row["config"], row["batch_size"], row["seq_len"], row["dtype"]) == ("tiny", 1, 48, "float32")
    assert row["tokens_per_s"] == pytest.approx(48 / row["step_s"])
    assert row["fraction_of_matmul"] == pytest.approx(row["achieved_gflops"] / report["matmul_gflops"])
    assert 0 < row["fraction_of_matmul"] < 2
    assert "of matmul" in res.stdout


@pytest.mark.parametrize("flag, message", [
    ("--configs=nope", "--configs: no config module configs/nope.py"),
    ("--steps=0", "--steps, --batch_size and --seq_len must be >= 1"),
    ("--dtype=bogus", "--dtype must be a JAX dtype such as float32 or bfloat16, got 'bogus'"),
    ("--out={tmp}", "--out {tmp} is a folder; give a file name"),  # refused before the run, not after it
])
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
    flag, message = flag.format(tmp=tmp_path), message.format(tmp=tmp_path)
    res = _run(f"--out={tmp_path / 'r.json'}", flag)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), res.stderr
    assert not (tmp_path / "r.json").exists()
