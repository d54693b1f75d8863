"""The Mosaic GPU kernels ('mosaic_gpu', 'mosaic_gpu_ws') in JAX's GPU interpreter, against the reference.

The interpreter (a private API in JAX 0.10) simulates SMEM, TMA copies, barriers and wgmma on CPU, and runs
each warpgroup as a thread: a copy into a slot still being read, a slot released too early, a barrier
waited on in the wrong phase or a warpgroup touching its neighbour's rows shows as wrong values, an error,
or, with its race detector on (here), a reported data race. Forward, dq and dk/dv kernels, values and
gradients. Each case runs in a child process: the detector's state is per process, and the warp-specialized
kernels need more XLA:CPU pool threads than CI's two cores give (`block_sparse.targets.xla_cpu_threads`).
Slow: ~20-40 s a case.
"""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from pallas_kernels import block_sparse_attention as bsa
from pallas_kernels import patterns
from pallas_kernels.block_sparse import mosaic_gpu as mgpu
from pallas_kernels.block_sparse import plan as plan_lib

PATTERNS = {
    "dense": dict(pattern="dense"),
    "strided": dict(pattern="strided", stride=16),
    "fixed": dict(pattern="fixed", stride=16, summary=4),
}

_SCRIPT = """
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from pallas_kernels import block_sparse_attention as bsa
from pallas_kernels.block_sparse import mosaic_gpu as mgpu
from tests.pallas_kernels.test_block_sparse_attention import check_against_reference

mgpu._mgpu_interpret_params = lambda: InterpretGPUParams(detect_races=True)
for lowering, b, t, n, blocks, slots, pattern in CASES:
    if slots:
        mgpu._mgpu_slots = lambda *args, slots=slots: slots
    check_against_reference(b, t, n, 64, jnp.bfloat16, lowering=lowering, **blocks, **pattern)
    assert not gpu_callbacks.get_races().races_found, ("data race", lowering, b, t, n, blocks, slots, pattern)
    print("ok", lowering, b, t, n, blocks, slots, pattern["pattern"], flush=True)
"""


def _run(cases):
    """Runs each of `cases` (lowering, B, T, N, blocks, forced slots or None, pattern) in a child process of
    its own, all at once: the interpreter mostly waits on its simulated barriers (~20 % of a core each)."""
    env = {**os.environ, "PJRT_NPROC": "8", "JAX_PLATFORMS": "cpu"}
    children = [subprocess.Popen([sys.executable, "-c", f"CASES = {[case]!r}\n" + _SCRIPT], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 cwd=pathlib.Path(__file__).parents[2]) for case in cases]
    for case, child in zip(cases, children, strict=True):
        out, err = child.communicate(timeout=900)
        assert child.returncode == 0, (case, err[-3000:])
        assert out.count("ok ") == 1, (case, out)


@pytest.mark.slow
def test_one_warpgroup_kernels_match_reference_without_races():
    # Both components (strided A2 in column-major order: non-natural positions), a ragged T, several
    # k-blocks per tile row, several (batch, head) rows; double-buffered copies, then one slot per operand
    # (what large tiles get).
    _run([
        ("mosaic_gpu", 1, 100, 1, dict(block_k=64), None, PATTERNS["strided"]),
        ("mosaic_gpu", 2, 90, 2, dict(block_k=128), 1, PATTERNS["fixed"]),
    ])


@pytest.mark.slow
def test_warp_specialized_kernels_match_reference_without_races():
    # The producer / consumer pipeline: two consumers over up to 4 k-tiles a row (each slot reused) with one
    # consumer in dk/dv, FULL tiles (mask skipped) among partial ones; one consumer in the forward / dq and two
    # in dk/dv, both components, two heads, rows with no allowed key; one slot per operand.
    dense = patterns.make_pattern("dense").block_layout(256, 128, 64).components[0].layout
    assert 0 < dense.kv_full.sum() < dense.kv_counts.sum()
    # Its forward's consumers take turns on the tensor cores (ping-pong); the last case's (one slot) do not.
    fwd = mgpu._MGPU_FWD.warpgroups("mosaic_gpu_ws", 128, 64)
    assert mgpu._take_turns(fwd, mgpu._mgpu_slots(mgpu._MGPU_FWD, "mosaic_gpu_ws", 128, 64, 64, jnp.bfloat16))
    assert not mgpu._take_turns(mgpu._MGPU_FWD.warpgroups("mosaic_gpu_ws", 128, 128), 1)
    _run([
        ("mosaic_gpu_ws", 1, 256, 1, dict(block_q=128, block_k=64), None, PATTERNS["dense"]),
        ("mosaic_gpu_ws", 1, 90, 2, dict(block_q=64, block_k=128), None, PATTERNS["fixed"]),
        ("mosaic_gpu_ws", 1, 200, 1, dict(block_q=128, block_k=128), 1, PATTERNS["strided"]),
    ])


def test_warp_specialized_interpreter_refuses_a_thread_pool_it_would_hang_in(monkeypatch):
    # On two pool threads the kernel's own callback and one warpgroup blocked on a barrier leave none for
    # the other warpgroup: a hang, seen on a 2-core host. A clear error instead.
    x = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    monkeypatch.setenv("PJRT_NPROC", "2")
    with pytest.raises(RuntimeError, match="PJRT_NPROC=8"):
        bsa.sparse_attention(x, x, x, pattern="dense", lowering="mosaic_gpu_ws", interpret=True)
    monkeypatch.setenv("PJRT_NPROC", "8")  # What the child processes above get; plans without running.
    plans, mode = bsa._prepare(x, x, x, "dense", None, None, "both", None, None, True, "mosaic_gpu_ws")
    assert mode == plan_lib.Mode("mosaic_gpu_ws", True) and plans[0].fwd.block_q == 128
