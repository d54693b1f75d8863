"""Tests of the benchmark scripts: each runs end to end at a small size as a subprocess."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[2]


def run_benchmark(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<module> args...` from the repository root."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
