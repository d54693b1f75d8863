"""benchmarks/accelerator_check.sh on this CPU host: the on-device tests skip, the benchmark runs in interpret mode."""

import json
import os
import subprocess
import sys

import pytest

from tests.benchmarks import ROOT

SCRIPT = ROOT / "benchmarks" / "accelerator_check.sh"
SMALL = ["--patterns=strided", "--lowerings=gpu", "--stride=16", "--heads=1", "--head_dim=16", "--repeats=1",
         "--min_time=0", "--dense_xla_max_n=64", "--check_max_n=0"]


def _check(*args: str, **env: str) -> subprocess.CompletedProcess:
    # Run from elsewhere: the script finds the repository itself.
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT.parent, env=dict(os.environ, PYTHON=sys.executable, **env))


@pytest.mark.e2e
def test_writes_versions_test_log_and_benchmark_json(tmp_path):
    res = _check(str(tmp_path / "out"), "64", *SMALL)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    env = (out / "env.txt").read_text()
    assert "jax " in env and "compiled lowerings: none" in env
    assert " skipped" in (out / "on_device.log").read_text()
    report = json.loads((out / "pallas_attention.json").read_text())
    assert report["done_lengths"] == [64]
    assert {r["method"] for r in report["rows"]} == {"dense-xla", "strided-gpu"}
    assert "TFLOP/s" in (out / "pallas_attention.log").read_text()
    assert "benchmark: exit 0" in res.stdout


@pytest.mark.e2e
def test_a_failed_step_is_a_non_zero_exit_after_both_ran(tmp_path):
    res = _check(str(tmp_path / "out"), "64", "--lowerings=nope")
    assert res.returncode == 1
    assert " skipped" in (tmp_path / "out" / "on_device.log").read_text()
    assert "--lowerings must be among" in (tmp_path / "out" / "pallas_attention.log").read_text()
    assert "on-device tests: exit 0; benchmark: exit 2" in res.stdout


@pytest.mark.e2e
def test_on_device_tests_past_their_time_are_stopped_and_the_benchmark_still_runs(tmp_path):
    res = _check(str(tmp_path / "out"), "64", *SMALL, ON_DEVICE_TIMEOUT_S="0.01")  # before pytest even starts
    assert res.returncode == 1, res.stdout + res.stderr
    assert "error: the on-device tests did not finish in 0.01 s" in res.stderr
    assert "on-device tests: exit 124; benchmark: exit 0" in res.stdout
    assert json.loads((tmp_path / "out" / "pallas_attention.json").read_text())["done_lengths"] == [64]


def test_usage():
    res = _check()
    assert res.returncode == 2 and res.stderr.startswith("usage: accelerator_check.sh OUTDIR")
