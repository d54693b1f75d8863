#!/usr/bin/env bash
# The Pallas kernels on a GPU or TPU host in one command, for a short session on rented hardware: the versions
# and chip, the compiled kernels against the reference (tests/pallas_kernels/test_on_device.py), then the
# TFLOP/s benchmark (benchmarks/pallas_attention.py). It needs only JAX with the chip's plugin, numpy, absl-py
# and pytest (the kernel tests and the benchmark import nothing else), so the host's own JAX will do.
#
#   bash benchmarks/accelerator_check.sh OUTDIR [LENGTHS [BENCHMARK FLAGS...]]
#
# OUTDIR gets env.txt, on_device.log, pallas_attention.log and pallas_attention.json (rewritten after each
# length, so a run stopped by a time limit keeps the lengths it finished). LENGTHS defaults to the issue's
# 4k ... 64k. The tests get at most $ON_DEVICE_TIMEOUT_S seconds (default 300): a kernel that hangs on the
# device (e.g. a barrier protocol the CPU interpreter let pass) must not eat the benchmark's time. The exit
# status is non-zero if the tests or the benchmark failed (or the tests timed out); both always run.
set -uo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: accelerator_check.sh OUTDIR [LENGTHS [BENCHMARK FLAGS...]]" >&2
  exit 2
fi
out=$1
lengths=${2:-4096,8192,16384,32768,65536}
shift $(( $# < 2 ? $# : 2 ))
python=${PYTHON:-python3}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1

"$python" - >"$out/env.txt" 2>&1 <<'EOF'
import platform

import jax

from pallas_kernels import block_sparse_attention as bsa

print(f"python {platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}")
for d in jax.devices():
    print(f"device {d.id}: {d.device_kind}")
print(f"compiled lowerings: {', '.join(bsa.compiled_lowerings()) or 'none'}")
EOF
env_status=$?
cat "$out/env.txt"
[[ $env_status == 0 ]] || { echo "error: JAX or pallas_kernels does not import here (see env.txt)" >&2; exit 1; }

tests_timeout=${ON_DEVICE_TIMEOUT_S:-300}
timeout -k 10 "$tests_timeout" "$python" -m pytest -q -p no:cacheprovider tests/pallas_kernels/test_on_device.py \
  2>&1 | tee "$out/on_device.log"
tests=${PIPESTATUS[0]}
if (( tests == 124 || tests == 137 )); then
  echo "error: the on-device tests did not finish in ${tests_timeout} s (a hung kernel?); stopped them" \
    | tee -a "$out/on_device.log" >&2
fi
"$python" -m benchmarks.pallas_attention --out="$out" --lengths="$lengths" "$@" 2>&1 | tee "$out/pallas_attention.log"
bench=${PIPESTATUS[0]}
echo "on-device tests: exit $tests; benchmark: exit $bench; results in $out"
(( tests == 0 && bench == 0 ))
