"""benchmarks/pallas_attention.py runs end to end on CPU (interpret mode) and writes its table's JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import pallas_attention
from pallas_kernels import block_sparse_attention as bsa
from tests.benchmarks import run_benchmark

pytestmark = pytest.mark.e2e


def _run(*args: str):
    return run_benchmark("pallas_attention", *args)


@pytest.mark.slow
def test_small_run_writes_rows_flops_errors_and_failed_lowerings_as_notes(tmp_path):
    # One pattern (interpret-mode compiles dominate; the others share this code path). The Mosaic GPU kernels
    # need H a multiple of 64: their rows fail, as notes, and the rest of the table is still written.
    res = _run("--lengths=96,160", "--patterns=strided", "--lowerings=gpu,mosaic_gpu", "--stride=16", "--heads=2",
               "--head_dim=16", "--repeats=1", "--min_time=0", "--dense_xla_max_n=96", "--check_max_n=96",
               "--peak_tflops=1", f"--out={tmp_path / 'bench'}")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "bench" / "pallas_attention.json").read_text())
    assert report["done_lengths"] == [96, 160]
    rows = {(r["n"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(96, "dense-xla"), (96, "strided-gpu"), (160, "strided-gpu")}
    notes = report["notes"]
    assert notes[0] == "n=96 strided-mosaic_gpu: failed: the 'mosaic_gpu' kernels need block_q = 64 and " \
        "block_k, head_dim multiples of 64, got 64, 64, 16"
    assert notes[1:] == ["n=160: dense-xla skipped (above --dense_xla_max_n=96)", notes[0].replace("96", "160", 1)]
    assert rows[(96, "dense-xla")]["tflop"] == pytest.approx(12 * 16 * 2 * 96 * 96 / 1e12)
    for (n, method), r in rows.items():
        assert r["seconds"] > 0
        assert r["tflops"] == pytest.approx(r["tflop"] / r["seconds"])
        assert r["pct_peak"] == pytest.approx(100 * r["tflops"])  # --peak_tflops=1
        if method == "dense-xla":
            continue
        logits = bsa.logits_per_head(n, pattern="strided", stride=16, lowering="gpu", dtype="bfloat16")
        assert r["tflop"] == pytest.approx(12 * 16 * 2 * logits / 1e12)
        if n == 96:  # Checked against the plain-JAX attention: bf16 kernel vs fp32.
            assert 0 < r["err"] < 3e-2
            assert r["speedup"] == pytest.approx(rows[(96, "dense-xla")]["seconds"] / r["seconds"])
        else:
            assert "err" not in r and "speedup" not in r
    assert "TFLOP/s" in res.stdout and "wrote" in res.stdout


def test_defaults_on_this_host():
    # On CPU the interpret-mode kernels; the peak comes from the device kind (first match wins).
    assert pallas_attention.default_lowerings() == ["tpu", "gpu"]
    assert pallas_attention.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert pallas_attention.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert pallas_attention.peak_tflops("TPU v5 lite") == 197.0
    assert pallas_attention.peak_tflops("TPU v5p") == 459.0
    assert pallas_attention.peak_tflops("cpu") is None


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--lowerings=cuda", "--lowerings must be among tpu, gpu, mosaic_gpu, mosaic_gpu_ws"),
        ("--patterns=sliding", "--patterns must be among strided, fixed, dense"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
    # --lengths and --stride are read by `attention_timing`, tested with benchmarks/attention.py.
    res = _run(flag, f"--out={tmp_path / 'bench'}")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), res.stderr
    assert not (tmp_path / "bench").exists()
