"""Fused block-sparse attention for the CPU backend: a C++ kernel behind XLA FFI custom calls.

`sparse_attention_cpu(q, k, v, ...)` computes exactly what `attention.attend(..., impl='reference')` does,
for the dense, strided and fixed patterns and each `part`, in one fused pass per (batch, head): only the
tiles that hold allowed (query, key) pairs are multiplied, the pieces of a pattern share one softmax, and
the backward recomputes probabilities from the saved log-sum-exp (no [T, T] array, forward or backward).
See musenet_jax/csrc/sparse_attention_cpu.cc for the tiling.

The kernel is compiled for the host CPU (`-march=native`) by the C++ compiler on first use (`$CXX`, else
`c++`/`g++`/`clang++`), against the XLA FFI headers that ship with jaxlib, and cached under
`$MUSENET_JAX_KERNEL_CACHE` (default `~/.cache/musenet_jax/kernels`) by a hash of the source, the compiler,
its flags, the jaxlib headers and the CPU. A missing compiler or a failed build raises `KernelBuildError`
with a one-line reason; nothing else in the project needs a compiler.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline import outputs

_SOURCE = Path(__file__).parent / "csrc" / "sparse_attention_cpu.cc"
_FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fPIC", "-shared", "-fno-math-errno")
_FORWARD = "musenet_sparse_attention_forward"
_BACKWARD = "musenet_sparse_attention_backward"
_PATTERNS = {"dense": 0, "strided": 1, "fixed": 2}
_PARTS = {"both": 0, "local": 1, "summary": 2}
_lock = threading.Lock()
_registered = False


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be compiled or loaded (one-line reason)."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelBuildError("attention impl 'cpu' needs a C++ compiler (set $CXX or install g++ or clang++)")


def _cpu_id() -> str:
    """What -march=native depends on: the machine and, where readable, the CPU's model and feature flags."""
    ident = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                ident += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return ident


def _cache_dir() -> Path:
    root = os.environ.get("MUSENET_JAX_KERNEL_CACHE") or os.path.join(Path.home(), ".cache", "musenet_jax", "kernels")
    return Path(root)


def build_library() -> Path:
    """Compiles the kernel (once per source/compiler/CPU; cached) and returns the shared library's path."""
    cxx = _compiler()
    include = Path(jax.ffi.include_dir())
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run the C++ compiler {cxx}: {e}") from None
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), (include / "xla/ffi/api/ffi.h").read_bytes(), version.encode(),
                 " ".join(_FLAGS).encode(), _cpu_id().encode()):
        key.update(part)
    lib = _cache_dir() / f"sparse_attention_cpu-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may build at once (multi-host tests, data-parallel launches): each compiles to its
    # own temporary name and renames it into place, so a reader never sees a partial library.
    with outputs.atomic_path(lib) as tmp:
        cmd = [cxx, *_FLAGS, "-isystem", str(include), str(_SOURCE), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise KernelBuildError("compiling the CPU attention kernel timed out") from None
        if res.returncode != 0:
            first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:200])
            raise KernelBuildError(f"compiling the CPU attention kernel failed: {first}")
    return lib


def _ensure_registered() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        path = build_library()
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError:
            # A damaged cache entry (say, a disk that filled up mid-copy): build it once more.
            path.unlink(missing_ok=True)
            path = build_library()
            try:
                lib = ctypes.cdll.LoadLibrary(str(path))
            except OSError as e:
                raise KernelBuildError(f"cannot load the CPU attention kernel {path}: {e}") from None
        jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.MusenetSparseAttentionForward), platform="cpu")
        jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.MusenetSparseAttentionBackward), platform="cpu")
        _registered = True


@dataclasses.dataclass(frozen=True)
class _Params:
    pattern: int
    stride: int
    summary: int
    part: int
    block_q: int
    scale: float

    def attrs(self) -> dict:
        return dict(pattern=np.int64(self.pattern), stride=np.int64(self.stride), summary=np.int64(self.summary),
                    part=np.int64(self.part), block_q=np.int64(self.block_q), scale=np.float32(self.scale))


# Queries per block. The kernel skips the 6 x 16 tiles of a block's key window that hold no allowed pair,
# so a larger block wastes no more logits and gives the dK / dV products a longer contraction; 64 measured
# as fast as any larger size at l = 128 (benchmarks/attention.py).
DEFAULT_BLOCK_Q = 64


def _result(like: jax.Array, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """An f32 result type; inside shard_map it varies over the same manual axes as `like`."""
    aval = jax.typeof(like)
    if aval.manual_axis_type.empty:
        return jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()),
                                manual_axis_type=aval.manual_axis_type)


def _forward(params: _Params, q, k, v):
    *lead, t, n, _ = q.shape
    call = jax.ffi.ffi_call(
        _FORWARD, (_result(q, q.shape), _result(q, (*lead, n, t))), vmap_method="broadcast_all"
    )
    return call(q, k, v, **params.attrs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(params: _Params, q, k, v):
    return _forward(params, q, k, v)[0]


def _attention_fwd(params: _Params, q, k, v):
    o, lse = _forward(params, q, k, v)
    return o, (q, k, v, o, lse)


def _attention_bwd(params: _Params, res, d_o):
    q, k, v, o, lse = res
    call = jax.ffi.ffi_call(_BACKWARD, (_result(q, q.shape),) * 3, vmap_method="broadcast_all")
    return call(q, k, v, o, lse, d_o.astype(jnp.float32), **params.attrs())


_attention.defvjp(_attention_fwd, _attention_bwd)


def sparse_attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, *, pattern: str, stride: int | None = None,
                         summary: int | None = None, part: str = "both", block_q: int | None = None) -> jax.Array:
    """Causal block-sparse attention on the CPU backend.

    Args:
      q, k, v: [B, T, N, H] (any float dtype; computed in fp32).
      pattern, stride, summary, part: as `attention.AttentionSpec` (validated there).
      block_q: queries per block (default `DEFAULT_BLOCK_Q`).

    Returns:
      [B, T, N, H] in q.dtype, equal to the reference (dense softmax under the pattern's mask, logits
      scaled by 1/sqrt(H)); a query with no allowed key outputs 0. Differentiable (custom VJP).
    """
    if jax.default_backend() != "cpu":
        raise ValueError(f"attention impl 'cpu' runs on the CPU backend only (this one is "
                         f"{jax.default_backend()!r}); use 'xla' or 'pallas'")
    _ensure_registered()
    bq = block_q or DEFAULT_BLOCK_Q
    params = _Params(_PATTERNS[pattern], stride or 1, summary or 1, _PARTS[part], int(bq),
                     1.0 / math.sqrt(q.shape[-1]))
    f32 = jnp.float32
    return _attention(params, q.astype(f32), k.astype(f32), v.astype(f32)).astype(q.dtype)


def _interval(piece: str, i: int, stride: int, summary: int) -> tuple[int, int]:
    """Allowed keys [lo, hi] of query i in a natural piece's own key index space (as in the kernel)."""
    if piece == "dense":
        return 0, i
    if piece == "strided_local":
        return max(0, i - stride), i
    if piece == "fixed_local":
        return i // stride * stride, i
    if piece == "fixed_summary_earlier":
        return 0, i // stride * summary - 1
    return 0, i // stride * summary + min(max(i % stride - (stride - summary) + 1, 0), summary) - 1


def logits_per_head(pattern: str, t: int, stride: int | None = None, summary: int | None = None,
                    part: str = "both", block_q: int | None = None) -> int:
    """(query, key) logits the kernel computes per batch row and head for length t, masked ones included.

    Mirrors the kernel's tiling: per block of queries, a key window aligned down to 16 keys, of which the
    tiles of 6 queries x 16 keys that hold an allowed pair; the strided summary's column tiles of 16 query
    rows, rounded up to 8 key rows. benchmarks/attention.py counts the
    matmul FLOPs from this (4 * H per logit forward, 8 * H backward, not counting the backward's
    recomputation of QK^T).
    """
    bq = block_q or DEFAULT_BLOCK_Q
    stride, c = stride or 1, summary or 1
    if pattern == "dense":
        natural, grid_skip = ["dense"], None
    elif pattern == "strided":
        natural = [] if part == "summary" else ["strided_local"]
        grid_skip = None if part == "local" else (0 if part == "summary" else 2)
    else:
        natural = {"both": ["fixed_local", "fixed_summary_earlier"], "local": ["fixed_local"],
                   "summary": ["fixed_summary_causal"]}[part]
        grid_skip = None
    n_summary = sum(1 for j in range(t) if j % stride >= stride - c) if pattern == "fixed" else 0
    round8 = lambda x: -(-x // 8) * 8
    total = 0
    for piece in natural:
        length = n_summary if "summary" in piece else t
        for i0 in range(0, t, bq):
            i1 = min(t, i0 + bq)
            k0 = max(0, _interval(piece, i0, stride, c)[0]) // 16 * 16
            w = max(0, min(length, _interval(piece, i1 - 1, stride, c)[1] + 1) - k0)
            bounds = [_interval(piece, i, stride, c) for i in range(i0, i1)]
            lo = [max(a - k0, 0) for a, _ in bounds]
            hi = [min(b - k0, w - 1) for _, b in bounds]
            ld = round8(max(w, 1))
            # Tiles of 6 queries x 16 keys (the last 8 wide) that hold an allowed pair.
            for r0 in range(0, i1 - i0, 6):
                r1 = min(i1 - i0, r0 + 6)
                for j0 in range(0, ld, 16):
                    j1 = min(ld, j0 + 16)
                    if lo[r0] < j1 and hi[r1 - 1] >= j0:
                        total += (r1 - r0) * (j1 - j0)
    if grid_skip is not None:
        for col in range(min(stride, t)):
            rc = -(-(t - col) // stride)
            for g0 in range(0, rc, 16):
                g1 = min(rc, g0 + 16)
                if g1 - grid_skip > 0:
                    total += (g1 - g0) * min(round8(rc), round8(g1 - grid_skip))
    return total
