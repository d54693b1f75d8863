"""Block-sparse causal flash attention in Pallas for the Sparse Transformer patterns (`patterns.py`).

Anatomy (after jax's pallas/ops, one backend per file): `block_sparse/plan.py` the host-side plan (components,
orderings, tile tables, gathers), `block_sparse/tiles.py` in-tile helpers, `block_sparse/tpu.py`,
`block_sparse/triton.py` and `block_sparse/mosaic_gpu.py` the kernels of each backend, `block_sparse/targets.py`
which lowering compiles where, `block_sparse/tools.py` lowering without a device and visit counting. This module
holds the `jax.custom_vjp`, the choice of kernels (`KERNELS`, one entry per lowering) and the validated public
entry `sparse_attention`. The ground truth is `reference.reference_attention`.

How a pattern runs. `Pattern.block_layout(n, block_q, block_k)` splits the pattern into disjoint
components, each with its own query / key orderings in which it is tile-sparse (strided A2 uses the
column-major order of the [ceil(n/l), l] grid, fixed A2 gathers the summary keys). For each component we
gather q (rows) and k, v (columns) into that order, zero-padded to whole tiles, and launch ONE kernel
whose grid is (B * N, q_blocks, max_k_blocks): the last axis walks the component's per-q-block list of
non-empty k-blocks, which is passed by scalar prefetch (`PrefetchScalarGridSpec`) so that the k/v index
maps fetch exactly the listed tiles; steps past a row's count (`pl.when(j < count[i])`) do nothing and
re-use the tile already resident. Inside a PARTIAL tile the component's own predicate, evaluated on the
natural positions of its rows and columns (padding = -1), masks it; FULL tiles (flagged in a third
prefetched table) skip the mask. The backward dk/dv kernel walks the transposed layout (per k-block, its
non-empty q-blocks), so it too visits only non-empty tiles.

Each component returns its normalised output and log-sum-exp (lse) per query; the components are merged
by a log-sum-exp merge, which is exactly one softmax over their (disjoint) union. The custom VJP saves
only the merged output and lse (named 'sparse_attention_out' / 'sparse_attention_lse' with
`checkpoint_name`, so remat policies can keep or drop them); the backward pass recomputes each tile's
probabilities from the global lse, so components need no cross-talk: dq, dk, dv are summed over them.

Numerics: matmuls run in the input dtype (e.g. bf16) with fp32 accumulation; softmax statistics and the
accumulators are fp32. Logits are scaled by 1/sqrt(H). A query with no allowed key outputs 0.

Lowerings (`lowering=`): 'tpu' kernels follow the TPU (Mosaic) pipeline model (`pltpu` scalar prefetch, VMEM
scratch); 'gpu' kernels follow the Triton model (grid (B * N, row blocks), a `fori_loop` whose trip count is
the row's count of listed blocks, tiles sliced with `pl.ds`; a FULL tile's mask skipped by a branch on its
flag; explicit Triton compiler params, since JAX 0.10 sends a plain GPU `pallas_call` to Mosaic GPU);
'mosaic_gpu' kernels (forward, dq, dk/dv) use Pallas's Mosaic GPU backend for Hopper (TMA copies, wgmma; the
same walk over listed tiles, one warpgroup per row block; see its section below), and 'mosaic_gpu_ws' the same
kernels warp-specialized (a producer warpgroup streams the tiles to two consumer warpgroups). 'tpu' and 'gpu'
are tested against the reference in interpret mode, the Mosaic GPU ones in JAX's GPU interpreter, and
`lower_attention` lowers them all for TPU / CUDA / ROCm on a CPU-only host
(tests/pallas_kernels/test_lowering.py). On a GPU, `lowering=None` picks
'mosaic_gpu' where its kernels run (Hopper, 16-bit inputs, H a multiple of 64), else 'gpu'. When compiling,
tiles must suit the target (`targets.check_compilable`): 'tpu' rows a multiple of 8 (fp32) / 16 (bf16); 'gpu'
block_q, block_k and H powers of two >= 16; 'mosaic_gpu' 16-bit inputs, block_q 64, block_k and H multiples of
64; 'mosaic_gpu_ws' 16-bit inputs, block_q and block_k 64 or 128 (default 128), H a multiple of 64; both
within Hopper's SMEM. Default tiles are rounded accordingly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import patterns as patterns_lib
from pallas_kernels import reference as reference_lib
from pallas_kernels.block_sparse import mosaic_gpu, targets, tpu, triton
from pallas_kernels.block_sparse import plan as plan_lib
from pallas_kernels.block_sparse.plan import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q  # noqa: F401 (public names)
from pallas_kernels.block_sparse.targets import (  # noqa: F401 (public names)
    KERNEL_CALL_TARGETS,
    LOWERING_DEVICE_KINDS,
    LOWERINGS,
    PLATFORM_LOWERINGS,
    compiled_lowerings,
)

# Names of the residuals the custom VJP saves, for `jax.checkpoint_policies.save_only_these_names`.
OUT_NAME = "sparse_attention_out"
LSE_NAME = "sparse_attention_lse"

# The kernels of each lowering: (forward of one component, backward of one component).
KERNELS = {
    "tpu": (tpu.component_fwd, tpu.component_bwd),
    "gpu": (triton.component_fwd, triton.component_bwd),
    **{lowering: (mosaic_gpu.component_fwd, mosaic_gpu.component_bwd) for lowering in mosaic_gpu.LOWERINGS},
}


def _forward(q, k, v, plans, scale, mode, count_visits=False):
    """q, k, v [BN, T, H] -> out f32[BN, T, H], lse f32[BN, T, 1], visits per component ([BN, nq, 1] or None)."""
    outs, lses, visits = [], [], []
    for plan in plans:
        gathered = (plan_lib.gather(q, plan.q_pos), plan_lib.gather(k, plan.k_pos), plan_lib.gather(v, plan.k_pos))
        qc, kc, vc = mode.after(gathered, outs[-1] if outs else None)
        if count_visits:  # a test hook of the 'tpu' kernels (`block_sparse.tools.visited_blocks`)
            o, lse, vis = tpu.component_fwd(plan, qc, kc, vc, scale, mode, count_visits=True)
        else:
            (o, lse), vis = KERNELS[mode.lowering][0](plan, qc, kc, vc, scale, mode), None
        rows = jnp.asarray(plan.q_rows)
        outs.append(jnp.take(o, rows, axis=1))
        lses.append(jnp.take(lse, rows, axis=1))
        visits.append(vis)
    # Log-sum-exp merge: components are disjoint, so this is exactly one softmax over their union.
    lse = functools.reduce(jnp.logaddexp, lses)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(jnp.exp(lc - lse_safe) * oc for oc, lc in zip(outs, lses, strict=True))
    return out, lse, visits


# --- custom_vjp: saves only the output and the lse. --------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, plans, scale, mode):
    out, _, _ = _forward(q, k, v, plans, scale, mode)
    return out.astype(q.dtype)


def _attention_fwd(q, k, v, plans, scale, mode):
    out, lse, _ = _forward(q, k, v, plans, scale, mode)
    out = checkpoint_name(out.astype(q.dtype), OUT_NAME)
    lse = checkpoint_name(lse, LSE_NAME)
    return out, (q, k, v, out, lse)


def _attention_bwd(plans, scale, mode, res, do):
    q, k, v, out, lse = res
    # delta_i = sum_h dO_ih O_ih: the softmax backward's row term, shared by all components (one softmax).
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqc = None
    for plan in plans:
        qp, kp = plan.q_pos, plan.k_pos
        gathered = (plan_lib.gather(q, qp), plan_lib.gather(k, kp), plan_lib.gather(v, kp),
                    plan_lib.gather(do.astype(q.dtype), qp))
        dqc, dkc, dvc = KERNELS[mode.lowering][1](
            plan, *mode.after(gathered, dqc), plan_lib.gather(lse, qp), plan_lib.gather(delta, qp), scale, mode,
        )
        dq = plan_lib.scatter_add(dq, dqc, qp)
        dk = plan_lib.scatter_add(dk, dkc, kp)
        dv = plan_lib.scatter_add(dv, dvc, kp)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
# Jitted so that eager calls run as one compiled program (op-by-op interpret mode is far slower); inside
# an outer jit this is just a nested call. Plans are cached per (pattern, T, blocks), so retracing is rare.
_attention_jit = jax.jit(_attention, static_argnums=(3, 4, 5))


# --- Public entry. ---------------------------------------------------------------------------------------


def _resolve_mode(interpret: bool | None, lowering: str | None, dtype, h: int, block_q: int | None,
                  block_k: int | None) -> plan_lib.Mode:
    backend = jax.default_backend()
    if lowering is None:
        lowering = targets.default_lowering(backend, dtype, h, block_q, block_k)
    if lowering not in targets.LOWERINGS:
        raise ValueError(f"lowering must be one of {targets.LOWERINGS}, got {lowering!r}")
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend != targets.BACKEND[lowering]:
        raise NotImplementedError(
            f"the {lowering!r} kernels compile only on {targets.BACKEND[lowering]!r}, not on {backend!r}; "
            f"use interpret=True"
        )
    threads = targets.xla_cpu_threads()
    if interpret and lowering == "mosaic_gpu_ws" and threads < targets.MGPU_INTERPRET_THREADS:
        raise RuntimeError(
            f"JAX's GPU interpreter runs each warpgroup of the 'mosaic_gpu_ws' kernels as a host thread that blocks "
            f"in XLA:CPU's thread pool, which has {threads} threads here and would hang: start the "
            f"process with PJRT_NPROC={2 * targets.MGPU_INTERPRET_THREADS} (or use lowering='mosaic_gpu')"
        )
    return plan_lib.Mode(lowering, bool(interpret))


def _prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, interpret, lowering=None, mode=None):
    """-> (component plans, mode); `mode` (if given) overrides interpret / lowering resolution."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one shape [B, T, N, H], got {q.shape}, {k.shape}, {v.shape}")
    pat = patterns_lib.make_pattern(pattern, stride, summary, part)
    t = q.shape[1]
    if t < 1:
        raise ValueError(f"need a sequence of at least one token, got shape {q.shape}")
    mode = mode or _resolve_mode(interpret, lowering, q.dtype, q.shape[-1], block_q, block_k)
    bq = targets.block_size(block_q, plan_lib.DEFAULT_BLOCK_Q, t, mode.lowering, q.dtype)
    bk = targets.block_size(block_k, plan_lib.DEFAULT_BLOCK_K, t, mode.lowering, q.dtype)
    if not mode.interpret or mode.lowering in mosaic_gpu.LOWERINGS:
        targets.check_compilable(mode.lowering, bq, bk, q.shape[-1], q.dtype)
    return plan_lib.plan(pat, t, bq, bk), mode


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    lowering: str | None = None,
) -> jax.Array:
    """Block-sparse causal attention with a Pallas flash kernel (differentiable).

    Args:
      q, k, v: [B, T, N, H] (batch, time in tokens, heads, head_dim); any float dtype (bf16 recommended on
        accelerators; matmuls accumulate in fp32).
      pattern: 'dense' | 'strided' | 'fixed' (see `patterns`); stride: l; summary: c (fixed only);
        part: 'both' | 'local' | 'summary'.
      block_q, block_k: tile sizes in tokens (default 128, capped at T rounded up to what the kernels compile:
        'tpu' a multiple of 8 (32-bit) / 16 (16-bit), 'gpu' a power of two >= 16; 'mosaic_gpu' 64;
        'mosaic_gpu_ws' 128).
      interpret: run the kernels in the Pallas interpreter; None = interpret on CPU, compile otherwise.
      lowering: 'tpu' (scalar-prefetch grid, Mosaic), 'gpu' (Triton-style loop over the listed blocks) or
        'mosaic_gpu' (Hopper; bf16 / fp16, 64-tiles, H a multiple of 64: TMA copies and wgmma) or
        'mosaic_gpu_ws' (the same warp-specialized: 64- or 128-tiles, a producer and two consumer
        warpgroups). None = on a GPU backend 'mosaic_gpu' where it runs (sm_90, those dtypes and shapes),
        else 'gpu'; 'tpu' off GPU. 'tpu' and 'gpu' run on CPU in interpret mode, the Mosaic GPU ones in JAX's
        GPU interpreter (slow: tests only).

    Returns:
      [B, T, N, H] in q.dtype; scale 1/sqrt(H); rows with no allowed key are 0.
    """
    plans, mode = _prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, interpret, lowering)
    b, t, n, h = q.shape
    if not plans:
        return jnp.zeros_like(q)
    out = _attention_jit(plan_lib.to_rows(q), plan_lib.to_rows(k), plan_lib.to_rows(v), plans, 1.0 / math.sqrt(h), mode)
    return jnp.swapaxes(out.reshape(b, n, t, h), 1, 2)


def sparse_attention_reference(q, k, v, *, pattern, stride=None, summary=None, part="both", **unused):
    """The dense masked-softmax reference with `sparse_attention`'s signature (block/interpret ignored)."""
    del unused
    return reference_lib.reference_attention(q, k, v, pattern=pattern, stride=stride, summary=summary, part=part)


_TOOLS = ("lower_attention", "visited_blocks", "logits_per_head")


def __getattr__(name: str):
    # The tools moved to `block_sparse.tools`, which imports this module: loaded on first use, not at import.
    if name in _TOOLS:
        from pallas_kernels.block_sparse import tools

        return getattr(tools, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
