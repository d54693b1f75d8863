"""Block-sparse causal flash attention in Pallas for the Sparse Transformer patterns (`patterns.py`).

Anatomy (after jax's pallas/ops attention kernels): block sizes, forward kernel, backward dq and dk/dv
kernels, the per-component `pallas_call` wrappers, the `jax.custom_vjp`, and the validated public entry
`sparse_attention`. The ground truth is `reference.reference_attention`.

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
(tests/pallas_kernels/test_lowering.py); none has run on a device yet. On a GPU, `lowering=None` picks
'mosaic_gpu' where its kernels run (Hopper, 16-bit inputs, H a multiple of 64), else 'gpu'. When compiling,
tiles must suit the target (`_check_compilable`): 'tpu' rows a multiple of 8 (fp32) / 16 (bf16); 'gpu'
block_q, block_k and H powers of two >= 16; 'mosaic_gpu' 16-bit inputs, block_q 64, block_k and H multiples of
64; 'mosaic_gpu_ws' 16-bit inputs, block_q and block_k 64 or 128 (default 128), H a multiple of 64; both
within Hopper's SMEM. Default tiles are rounded accordingly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from pallas_kernels import patterns as patterns_lib
from pallas_kernels import reference as reference_lib

# Default tile sizes (tokens). 128 matches the TPU MXU and the lane width; they are capped below at the
# (8-rounded) component length so that short sequences do not pay for mostly-padding tiles.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128

# Names of the residuals the custom VJP saves, for `jax.checkpoint_policies.save_only_these_names`.
OUT_NAME = "sparse_attention_out"
LSE_NAME = "sparse_attention_lse"

_DIMS = ("parallel", "parallel", "arbitrary")
_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


# --- Host-side plan: per component, orderings and scalar-prefetch tables. ---------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity (static arg of the custom_vjp).
class _ComponentPlan:
    """One component compiled for (n, block_q, block_k), in the kernel's padded coordinates.

    q_pos: int32[nq * bq], natural position of each tile row (-1 = padding). k_pos: int32[nk * bk] likewise.
    q_rows: int32[n], for each natural position its tile row (q orderings are permutations of 0..n-1).
    fwd: layout by q-block (kv_blocks [nq, W], kv_counts [nq]); bwd: the transposed layout by k-block.
    """

    name: str
    allows: patterns_lib.Predicate
    q_pos: np.ndarray
    k_pos: np.ndarray
    q_rows: np.ndarray
    fwd: patterns_lib.BlockLayout
    bwd: patterns_lib.BlockLayout


@functools.lru_cache(maxsize=64)
def _plan(pattern: patterns_lib.Pattern, n: int, block_q: int, block_k: int) -> tuple[_ComponentPlan, ...]:
    # Per component rather than `pattern.block_layout`, which fails on a component with no keys at all
    # (fixed A2 when n <= l - c); the tables are the same.
    plans = []
    for comp in pattern.components():
        q_positions, k_positions = comp.q_order(n), comp.k_order(n)
        if len(k_positions) == 0:
            continue  # No summary keys yet: the component contributes nothing.
        fwd = comp.block_layout(n, block_q, block_k)
        nq, nk = fwd.tiles.shape
        if fwd.num_blocks == 0:
            continue  # Nothing allowed: contributes nothing.
        q_pos = np.full(nq * block_q, -1, np.int32)
        q_pos[: len(q_positions)] = q_positions
        k_pos = np.full(nk * block_k, -1, np.int32)
        k_pos[: len(k_positions)] = k_positions
        if sorted(q_positions.tolist()) != list(range(n)):
            raise ValueError(f"component {comp.name!r}: query order must be a permutation of 0..{n - 1}")
        q_rows = np.empty(n, np.int32)
        q_rows[q_positions] = np.arange(n, dtype=np.int32)
        bwd = patterns_lib.layout_from_tiles(np.ascontiguousarray(fwd.tiles.T), block_k, block_q)
        plans.append(_ComponentPlan(comp.name, comp.allows, q_pos, k_pos, q_rows, fwd, bwd))
    return tuple(plans)


# --- Kernels. --------------------------------------------------------------------------------------------
# Refs are per tile, with the (batch * head) axis squeezed: q/o/do [bq, H], k/v [bk, H], q_pos/lse/delta
# [bq, 1], k_pos [1, bk]. Logits s = q k^T / sqrt(H) are [bq, bk] fp32.


def _out(like, shape, dtype) -> jax.ShapeDtypeStruct:
    """A kernel's result type. Inside shard_map it varies over the same manual mesh axes as `like` (the
    kernel's q or k), as shard_map's type check requires of a pallas_call's outputs."""
    aval = jax.typeof(like)
    if aval.manual_axis_type.empty:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(aval.sharding.mesh, P()),
                                manual_axis_type=aval.manual_axis_type)


def _vary_like(x, like):
    """x typed to vary over the manual mesh axes `like` varies over (inside shard_map; else x itself):
    `plgpu.kernel` types its results with shard_map's check off, as invariant."""
    axes = tuple(sorted(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _allowed(allows, i, j):
    """bool (broadcast of i, j): query i may see key j and neither is padding (natural positions, -1)."""
    return allows(i, j) & (i >= 0) & (j >= 0)


def _tile_mask(allows, q_pos_ref, k_pos_ref):
    """bool[bq, bk]: allowed and not padding, from the tile's natural positions."""
    return _allowed(allows, q_pos_ref[...], k_pos_ref[...])


def _where(mask, x, fill):
    """x where mask, else fill; mask None (a FULL tile) keeps x as is."""
    return x if mask is None else jnp.where(mask, x, fill)


def _mask_partial(s, full, mask):
    """The logits tile s with -inf where mask() is False (exp() then gives 0), unless the tile is FULL
    (`full` != 0): there every entry is allowed and in range, and the predicate is not evaluated."""
    return jax.lax.cond(full != 0, lambda: s, lambda: jnp.where(mask(), s, -jnp.inf))


def _on_listed_tile(counts_ref, full_ref, row, j, body):
    """Runs body(masked) at step j of `row` if that step is a listed (non-empty) tile.

    FULL tiles (every entry allowed and in range) run body(False), which skips evaluating the predicate;
    on accelerators that saves the integer div/mod VPU work of the mask on most tiles of a long sequence.
    """
    live = j < counts_ref[row]
    full = full_ref[row, j] != 0
    pl.when(live & full)(lambda: body(False))
    pl.when(live & jnp.logical_not(full))(lambda: body(True))


def _logits(q, k, scale):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale


def _fwd_kernel(
    kv_blocks_ref, kv_counts_ref, kv_full_ref,  # scalar prefetch
    q_ref, k_ref, v_ref, q_pos_ref, k_pos_ref,  # inputs
    *refs,  # outputs o, lse (and visits when count_visits), then scratch m, l, acc
    allows, scale, count_visits,
):
    del kv_blocks_ref  # Used by the index maps only.
    if count_visits:
        o_ref, lse_ref, visits_ref, m_scr, l_scr, acc_scr = refs
    else:
        (o_ref, lse_ref, m_scr, l_scr, acc_scr), visits_ref = refs, None
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, -jnp.inf)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)
        if count_visits:
            visits_ref[...] = jnp.zeros_like(visits_ref)

    def visit(masked: bool):
        if count_visits:
            visits_ref[...] += 1
        mask = _tile_mask(allows, q_pos_ref, k_pos_ref) if masked else None
        s = _logits(q_ref[...], k_ref[...], scale)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(_where(mask, s, -jnp.inf), axis=1, keepdims=True))
        # A row with nothing allowed so far keeps m = -inf; shift by 0 there so exp() stays finite.
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m_prev - m_safe)  # exp(-inf) = 0 on the first live tile of a row.
        p = _where(mask, jnp.exp(s - m_safe), 0.0)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = alpha * acc_scr[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_scr[...] = m_new

    _on_listed_tile(kv_counts_ref, kv_full_ref, i, j, visit)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        denom, live = l_scr[...], l_scr[...] > 0
        denom = jnp.where(live, denom, 1.0)  # Rows with no allowed key: output 0, lse -inf.
        o_ref[...] = (acc_scr[...] / denom).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(live, m_scr[...] + jnp.log(denom), -jnp.inf)


def _probs_and_dlogits(s, v, do, lse, delta):
    """Recomputed probabilities p and logit gradients ds (both fp32 [bq, bk]) from the logits s (-inf where
    masked: p is 0 there) and the global lse."""
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0))
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta)


def _dq_kernel(
    kv_blocks_ref, kv_counts_ref, kv_full_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref,
    dq_ref,
    acc_scr,
    *, allows, scale,
):
    del kv_blocks_ref
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)

    def visit(masked: bool):
        mask = _tile_mask(allows, q_pos_ref, k_pos_ref) if masked else None
        k = k_ref[...]
        s = _where(mask, _logits(q_ref[...], k, scale), -jnp.inf)
        _, ds = _probs_and_dlogits(s, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...])
        acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _on_listed_tile(kv_counts_ref, kv_full_ref, i, j, visit)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_blocks_ref, q_counts_ref, q_full_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref,
    dk_ref, dv_ref,
    dk_scr, dv_scr,
    *, allows, scale,
):
    del q_blocks_ref
    kb, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    def visit(masked: bool):
        mask = _tile_mask(allows, q_pos_ref, k_pos_ref) if masked else None
        q, do = q_ref[...], do_ref[...]
        s = _where(mask, _logits(q, k_ref[...], scale), -jnp.inf)
        p, ds = _probs_and_dlogits(s, v_ref[...], do, lse_ref[...], delta_ref[...])
        t = (((0,), (0,)), ((), ()))  # Contract the query axis: [bq, bk]^T @ [bq, H].
        dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, t, preferred_element_type=jnp.float32)
        dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, t, preferred_element_type=jnp.float32)

    _on_listed_tile(q_counts_ref, q_full_ref, kb, j, visit)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# --- pallas_call wrappers for one component. q/k/v etc. are [BN, Tq or Tk (padded), H]. ------------------


def _tables(layout: patterns_lib.BlockLayout):
    """Scalar-prefetch operands: listed k-blocks int32[nq, W], counts int32[nq], FULL flags int32[nq, W]."""
    return jnp.asarray(layout.kv_blocks), jnp.asarray(layout.kv_counts), jnp.asarray(layout.kv_full, jnp.int32)


def _row_spec(block: int, h: int, index):
    """[BN, T, H] (or [BN, T, 1]) tiled along T; `index(i, j, table) -> tile index` picks the tile."""
    return pl.BlockSpec((None, block, h), lambda b, i, j, table, *_: (b, index(i, j, table), 0))


def _k_pos_spec(block_k: int, index):
    """Key positions int32[nk, 1, bk] -> the tile's [1, bk]. Mosaic wants a block's last two dims to be
    multiples of (8, 128) or the array's own; a [1, Tkp] row tiled along lanes would need bk % 128 == 0."""
    return pl.BlockSpec((None, 1, block_k), lambda b, i, j, table, *_: (index(i, j, table), 0, 0))


def _k_pos_tiles(k_pos: np.ndarray, block_k: int):
    """int32[nk * bk] -> int32[nk, 1, bk] (see `_k_pos_spec`)."""
    return jnp.asarray(k_pos.reshape(-1, 1, block_k))


def _component_fwd(plan: _ComponentPlan, qc, kc, vc, scale: float, mode: _Mode, count_visits: bool = False):
    """-> out f32[BN, Tqp, H], lse f32[BN, Tqp, 1], and with count_visits visits int32[BN, nq, 1] (the
    tiles each q-block ran, counted in the kernel; a test hook: its (1, 1) blocks suit interpret mode only)."""
    if mode.lowering != "tpu":
        if count_visits:
            raise ValueError("visit counting is implemented for the 'tpu' kernels only")
        if mode.lowering in _MGPU_LOWERINGS:
            return _component_fwd_mgpu(plan, qc, kc, vc, scale, mode)
        return _component_fwd_gpu(plan, qc, kc, vc, scale, mode.interpret)
    bn, tqp, h = qc.shape
    lay = plan.fwd
    bq, bk = lay.block_q, lay.block_k
    nq, width = lay.kv_blocks.shape
    q_of = lambda i, j, t: i
    k_of = lambda i, j, t: t[i, j]
    kernel = functools.partial(_fwd_kernel, allows=plan.allows, scale=scale, count_visits=count_visits)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(bn, nq, width),
        in_specs=[
            _row_spec(bq, h, q_of),
            _row_spec(bk, h, k_of),
            _row_spec(bk, h, k_of),
            pl.BlockSpec((bq, 1), lambda b, i, j, t, *_: (i, 0)),
            _k_pos_spec(bk, k_of),
        ],
        out_specs=[_row_spec(bq, h, q_of), _row_spec(bq, 1, q_of)]
        + ([pl.BlockSpec((None, 1, 1), lambda b, i, j, t, *_: (b, i, 0))] if count_visits else []),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[_out(qc, (bn, tqp, h), jnp.float32), _out(qc, (bn, tqp, 1), jnp.float32)]
        + ([_out(qc, (bn, nq, 1), jnp.int32)] if count_visits else []),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_DIMS),
        interpret=mode.interpret,
    )(
        *_tables(lay), qc, kc, vc,
        jnp.asarray(plan.q_pos[:, None]), _k_pos_tiles(plan.k_pos, bk),
    )


def _component_bwd(plan: _ComponentPlan, qc, kc, vc, doc, lsec, deltac, scale: float, mode: _Mode):
    """-> dq [BN, Tqp, H], dk, dv [BN, Tkp, H] in the inputs' dtypes, for this component's tiles only."""
    if mode.lowering in _MGPU_LOWERINGS:
        return _component_bwd_mgpu(plan, qc, kc, vc, doc, lsec, deltac, scale, mode)
    if mode.lowering == "gpu":
        return _component_bwd_gpu(plan, qc, kc, vc, doc, lsec, deltac, scale, mode.interpret)
    bn, tqp, h = qc.shape
    tkp = kc.shape[1]
    fwd, bwd = plan.fwd, plan.bwd
    bq, bk = fwd.block_q, fwd.block_k
    q_pos, k_pos = jnp.asarray(plan.q_pos[:, None]), _k_pos_tiles(plan.k_pos, bk)
    params = pltpu.CompilerParams(dimension_semantics=_DIMS)

    # dq: walk k-blocks per q-block (the forward layout).
    same = lambda i, j, t: i
    listed = lambda i, j, t: t[i, j]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, allows=plan.allows, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(bn, fwd.kv_blocks.shape[0], fwd.kv_blocks.shape[1]),
            in_specs=[
                _row_spec(bq, h, same), _row_spec(bk, h, listed), _row_spec(bk, h, listed),
                _row_spec(bq, h, same), _row_spec(bq, 1, same), _row_spec(bq, 1, same),
                pl.BlockSpec((bq, 1), lambda b, i, j, t, *_: (i, 0)),
                _k_pos_spec(bk, listed),
            ],
            out_specs=_row_spec(bq, h, same),
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=_out(qc, (bn, tqp, h), qc.dtype),
        compiler_params=params,
        interpret=mode.interpret,
    )(*_tables(fwd), qc, kc, vc, doc, lsec, deltac, q_pos, k_pos)

    # dk, dv: walk q-blocks per k-block (the transposed layout); grid axis 1 is now the k-block.
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, allows=plan.allows, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(bn, bwd.kv_blocks.shape[0], bwd.kv_blocks.shape[1]),
            in_specs=[
                _row_spec(bq, h, listed), _row_spec(bk, h, same), _row_spec(bk, h, same),
                _row_spec(bq, h, listed), _row_spec(bq, 1, listed), _row_spec(bq, 1, listed),
                pl.BlockSpec((bq, 1), lambda b, i, j, t, *_: (t[i, j], 0)),
                _k_pos_spec(bk, same),
            ],
            out_specs=[_row_spec(bk, h, same), _row_spec(bk, h, same)],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        ),
        out_shape=[_out(kc, (bn, tkp, h), kc.dtype), _out(kc, (bn, tkp, h), vc.dtype)],
        compiler_params=params,
        interpret=mode.interpret,
    )(*_tables(bwd), qc, kc, vc, doc, lsec, deltac, q_pos, k_pos)
    return dq, dk, dv


# --- 'gpu' lowering: one program per (batch * head, row block), a loop over that row's listed blocks. -------
# Triton has no scalar prefetch, so the block list is read inside the kernel and the loop trip count is the
# row's count: only non-empty tiles are loaded and computed. The whole k/v (resp. q/dO) of one (batch * head)
# row is the block; tiles are sliced out with pl.ds. Positions are 1-D here ([bq] / [Tkp]). Written for the
# Triton lowering (power-of-two tiles of at least 16, as tl.dot needs), selected by explicit
# `pltriton.CompilerParams`: without them JAX (0.10; `jax_pallas_use_mosaic_gpu`) sends a GPU pallas_call
# to Mosaic GPU, which rejects these kernels (e.g. copies of fewer than 128 bytes per warpgroup). Lowered
# for CUDA / ROCm in the tests.


def _gpu_tile_logits(q, k, full, allows, i_pos, j_pos, scale):
    """A 'gpu' tile's logits [bq, bk], -inf where masked; a FULL tile (`full` != 0) skips the mask.
    i_pos [bq, 1], j_pos () -> [1, bk]: natural positions (padding -1)."""
    return _mask_partial(_logits(q, k, scale), full,
                         lambda: _allowed(allows, i_pos, j_pos()))


def _fwd_gpu_kernel(blocks_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, q_pos_ref, k_pos_ref, o_ref, lse_ref,
                    *, allows, scale, block_k):
    bq, h = q_ref.shape
    q, i_pos = q_ref[...], q_pos_ref[...][:, None]

    def body(j, carry):
        m_prev, l_prev, acc = carry
        tile = pl.ds(blocks_ref[j] * block_k, block_k)
        s = _gpu_tile_logits(q, k_ref[tile, :], full_ref[j], allows, i_pos, lambda: k_pos_ref[tile][None, :], scale)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        v = v_ref[tile, :]
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, h), jnp.float32))
    m, denom, acc = jax.lax.fori_loop(0, counts_ref[pl.program_id(1)], body, init)
    live = denom > 0
    denom = jnp.where(live, denom, 1.0)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(live, m + jnp.log(denom), -jnp.inf)


def _dq_gpu_kernel(blocks_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref,
                   k_pos_ref, dq_ref, *, allows, scale, block_k):
    q, do, i_pos = q_ref[...], do_ref[...], q_pos_ref[...][:, None]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(j, acc):
        tile = pl.ds(blocks_ref[j] * block_k, block_k)
        k = k_ref[tile, :]
        s = _gpu_tile_logits(q, k, full_ref[j], allows, i_pos, lambda: k_pos_ref[tile][None, :], scale)
        _, ds = _probs_and_dlogits(s, v_ref[tile, :], do, lse, delta)
        return acc + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, counts_ref[pl.program_id(1)], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _dkv_gpu_kernel(blocks_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref,
                    k_pos_ref, dk_ref, dv_ref, *, allows, scale, block_q):
    k, v, j_pos = k_ref[...], v_ref[...], k_pos_ref[...][None, :]
    t = (((0,), (0,)), ((), ()))  # Contract the query axis: [bq, bk]^T @ [bq, H].

    def body(j, carry):
        dk, dv = carry
        tile = pl.ds(blocks_ref[j] * block_q, block_q)
        q, do = q_ref[tile, :], do_ref[tile, :]
        s = _gpu_tile_logits(q, k, full_ref[j], allows, q_pos_ref[tile][:, None], lambda: j_pos, scale)
        p, ds = _probs_and_dlogits(s, v, do, lse_ref[tile][:, None], delta_ref[tile][:, None])
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, t, preferred_element_type=jnp.float32)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, t, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, counts_ref[pl.program_id(1)], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_table_specs(layout: patterns_lib.BlockLayout):
    """BlockSpecs of `_tables(layout)` for a (BN, row blocks) grid: the row's listed blocks and FULL flags
    [W], every row's count [n]."""
    row = pl.BlockSpec((None, layout.kv_blocks.shape[1]), lambda b, i: (i, 0))
    return row, pl.BlockSpec((layout.kv_blocks.shape[0],), lambda b, i: (0,)), row


def _component_fwd_gpu(plan: _ComponentPlan, qc, kc, vc, scale: float, interpret: bool):
    """'gpu' forward of one component: -> out f32[BN, Tqp, H], lse f32[BN, Tqp, 1] (as `_component_fwd`)."""
    bn, tqp, h = qc.shape
    lay = plan.fwd
    bq, bk, nq, tkp = lay.block_q, lay.block_k, lay.kv_blocks.shape[0], kc.shape[1]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_gpu_kernel, allows=plan.allows, scale=scale, block_k=bk),
        grid=(bn, nq),
        in_specs=[
            *_gpu_table_specs(lay),
            pl.BlockSpec((None, bq, h), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, tkp, h), lambda b, i: (b, 0, 0)),
            pl.BlockSpec((None, tkp, h), lambda b, i: (b, 0, 0)),
            pl.BlockSpec((bq,), lambda b, i: (i,)),
            pl.BlockSpec((tkp,), lambda b, i: (0,)),
        ],
        out_specs=[pl.BlockSpec((None, bq, h), lambda b, i: (b, i, 0)), pl.BlockSpec((None, bq), lambda b, i: (b, i))],
        out_shape=[_out(qc, (bn, tqp, h), jnp.float32), _out(qc, (bn, tqp), jnp.float32)],
        compiler_params=_TRITON,
        interpret=interpret,
    )(*_tables(lay), qc, kc, vc, jnp.asarray(plan.q_pos), jnp.asarray(plan.k_pos))
    return o, lse[..., None]


def _component_bwd_gpu(plan: _ComponentPlan, qc, kc, vc, doc, lsec, deltac, scale: float, interpret: bool):
    """'gpu' backward of one component: -> dq [BN, Tqp, H], dk, dv [BN, Tkp, H] (as `_component_bwd`)."""
    bn, tqp, h = qc.shape
    tkp = kc.shape[1]
    fwd, bwd = plan.fwd, plan.bwd
    bq, bk = fwd.block_q, fwd.block_k
    lse, delta = lsec[..., 0], deltac[..., 0]
    q_pos, k_pos = jnp.asarray(plan.q_pos), jnp.asarray(plan.k_pos)
    row = lambda n, h=h: pl.BlockSpec((None, n, h), lambda b, i: (b, i, 0))
    whole = lambda n, h=h: pl.BlockSpec((None, n, h), lambda b, i: (b, 0, 0))
    row1 = lambda n: pl.BlockSpec((None, n), lambda b, i: (b, i))
    whole1 = lambda n: pl.BlockSpec((None, n), lambda b, i: (b, 0))
    nq, nk = fwd.kv_blocks.shape[0], bwd.kv_blocks.shape[0]
    dq = pl.pallas_call(
        functools.partial(_dq_gpu_kernel, allows=plan.allows, scale=scale, block_k=bk),
        grid=(bn, nq),
        in_specs=[*_gpu_table_specs(fwd), row(bq), whole(tkp), whole(tkp), row(bq), row1(bq), row1(bq),
                  pl.BlockSpec((bq,), lambda b, i: (i,)), pl.BlockSpec((tkp,), lambda b, i: (0,))],
        out_specs=row(bq),
        out_shape=_out(qc, (bn, tqp, h), qc.dtype),
        compiler_params=_TRITON,
        interpret=interpret,
    )(*_tables(fwd), qc, kc, vc, doc, lse, delta, q_pos, k_pos)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_gpu_kernel, allows=plan.allows, scale=scale, block_q=bq),
        grid=(bn, nk),
        in_specs=[*_gpu_table_specs(bwd), whole(tqp), row(bk), row(bk), whole(tqp), whole1(tqp), whole1(tqp),
                  pl.BlockSpec((tqp,), lambda b, i: (0,)), pl.BlockSpec((bk,), lambda b, i: (i,))],
        out_specs=[row(bk), row(bk)],
        out_shape=[_out(kc, (bn, tkp, h), kc.dtype), _out(kc, (bn, tkp, h), vc.dtype)],
        compiler_params=_TRITON,
        interpret=interpret,
    )(*_tables(bwd), qc, kc, vc, doc, lse, delta, q_pos, k_pos)
    return dq, dk, dv


# --- 'mosaic_gpu' lowerings (Hopper: TMA copies, wgmma; Pallas's Mosaic GPU backend via `plgpu.kernel`). ----
# The same walk over listed tiles as the other lowerings, per (batch * head, row block). The row block's own
# tiles and positions are copied to SMEM once; then for each listed tile its operands are copied in (one
# barrier per copy) and every product runs on the tensor cores with both operands in SMEM:
#   forward (per q-block):  S = Q K^T, masked online softmax in registers, O += P V;
#   dq      (per q-block):  S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K;
#   dk, dv  (per k-block):  the same products transposed, S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
#                           dK += dS^T Q, so that the keys are wgmma's M rows and no register transposes.
# P and dS reach the tensor cores through SMEM, in the input dtype; so do the results (O, dQ, dK, dV leave
# through the row block's own Q / K / V tiles once the walk is over). Two ways to split the work over
# warpgroups (`_Warpgroups`, `_pipeline`):
#   'mosaic_gpu'     one warpgroup per row block (block_q = 64) issues its own copies, double-buffered
#                    (`_walk_tiles`): tile j + 1's operands are in flight into one SMEM slot while tile j
#                    computes from the other.
#   'mosaic_gpu_ws'  warp-specialized, as FlashAttention-3: a row block of 128 (or 64) rows is split over two
#                    (one) consumer warpgroups of 64 rows that share each streamed tile, and a producer
#                    warpgroup with few registers copies the tiles up to `slots` ahead, into a slot once both
#                    consumers have released it. Twice the rows per tile copied, and copies never wait on
#                    compute. In the forward the two consumers take turns on the tensor cores (ping-pong,
#                    `_take_turns`): one's softmax runs under the other's matmuls.
# A kernel whose two slots would not fit in SMEM (large tiles or H; `_mgpu_slots`) gets one. Layouts are
# inferred ('Warpgroup' lowering semantics). Kept simple enough for JAX's GPU interpreter (which lacks
# `transpose_ref`, register wgmma operands, `layout_cast`, `run_state`) to run every kernel on CPU: the
# operands wgmma needs transposed (K^T, V^T, Q^T, dO^T) are transposed in HBM by the caller. FULL tiles skip
# the mask (a branch on the tile's flag, read from GMEM as the block list is). Exponentials are approximate
# base-2 ones (`MGPU_COMPILER_PARAMS`). Not yet done (needs a GPU to tune, and the interpreter cannot check
# them): P as a register operand, transposed SMEM views instead of the HBM transposes, ping-pong in the
# backward kernels.

# Approximate exp2 / log2 / division (the `ex2.approx` / `lg2.approx` / `div.approx` PTX instructions, a few
# ulp of fp32): the softmax's exponentials are the kernels' bottleneck besides the matmuls, and their error
# is far below bf16's. Logits are scaled by log2(e) along with 1/sqrt(H) (one multiply), so that exp2 needs
# no further one; lse leaves in natural-log units, as every other lowering's.
MGPU_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
LOG2E, LN2 = math.log2(math.e), math.log(2.0)
MGPU_BLOCK = 64  # wgmma M per warpgroup; also the k-tile (128-byte swizzled rows of 16-bit K^T / P).
# SMEM per thread block on Hopper (227 KiB opt-in), what Mosaic GPU checks a kernel against.
MGPU_SMEM_BYTES = 227 * 1024
# Registers per thread in a warp-specialized launch (of 64 Ki per SM; multiples of 8, at most 255): the
# producer only issues copies; the consumers hold the accumulators.
MGPU_PRODUCER_REGISTERS = 40
MGPU_CONSUMER_REGISTERS = {1: 240, 2: 232}  # By consumer count: 128 * (40 + 2 * 232) <= 64 Ki.
_MGPU_LOWERINGS = ("mosaic_gpu", "mosaic_gpu_ws")


@dataclasses.dataclass(frozen=True)
class _Warpgroups:
    """The warpgroups of one Mosaic GPU launch: `consumers` compute, each on its own slice of the row block
    (rows / consumers), sharing the streamed tiles; with `producer` one more warpgroup issues those tiles'
    copies ('mosaic_gpu_ws'), else the one consumer issues its own ('mosaic_gpu')."""

    consumers: int
    producer: bool

    @classmethod
    def for_rows(cls, lowering: str, rows: int) -> _Warpgroups:
        return cls(rows // MGPU_BLOCK, True) if lowering == "mosaic_gpu_ws" else cls(1, False)


def _smem_tiled(shape, dtype):
    """An SMEM tile with the (8, 128-byte) tiling and swizzle wgmma reads (minor dim >= 64 16-bit elements);
    leading dims (e.g. the slot or consumer axis) are plain."""
    bits = jnp.finfo(dtype).bits
    swizzle = plgpu.find_swizzle(shape[-1] * bits)
    tiling = plgpu.TilingTransform((8, swizzle * 8 // bits))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def _mma(a_smem, b_smem, shape, issued=lambda: None):
    """a @ b on the tensor cores (wgmma; a [M, K], b [K, N] in SMEM) -> f32[M, N] in registers; `issued()`
    runs between issuing the wgmma and waiting for it.

    Reading the accumulator waits for the wgmma, so a, b may be overwritten as soon as this returns."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        issued()
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _copy_in(copies, barriers, first=0):
    """Starts a GMEM -> SMEM copy per (src, dst) pair, on barriers first, first + 1, ..., then waits for all."""
    for n, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[first + n])
    for n in range(len(copies)):
        plgpu.barrier_wait(barriers.at[first + n])


def _copy_out(copies):
    """Copies (src SMEM, dst GMEM) pairs out once the registers -> SMEM stores are visible, and waits."""
    plgpu.commit_smem()
    for src, dst in copies:
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


def _walk_tiles(count, sources, buffers, barriers, body, init):
    """fori_loop over a row block's `count` listed tiles, copies double-buffered where SMEM allows.

    sources: per streamed operand, j -> the GMEM view of listed tile j; buffers: per operand, its SMEM
    [slots, ...] (slots 2, or 1 where two do not fit: `_mgpu_slots`); barriers: slots * len(sources), one per
    (slot, operand). body(j, tile refs, carry) -> carry. With two slots, tile j runs from slot j % 2 while tile
    j + 1 is copied into the other. That slot was last read by tile j - 1: its wgmmas are complete (`_mma`
    waits) and its register reads of positions / lse precede that step's `commit_smem`, a warpgroup
    barrier, so no copy overwrites a slot still being read. With one slot each step copies, then computes.
    """
    m, slots = len(sources), buffers[0].shape[0]

    def start(j, slot):
        for n, (src, buf) in enumerate(zip(sources, buffers, strict=True)):
            plgpu.copy_gmem_to_smem(src(j), buf.at[slot], barriers.at[slot * m + n])

    if slots > 1:

        @pl.when(count > 0)
        def _first():
            start(0, 0)

    def step(j, carry):
        slot = j % slots
        if slots > 1:

            @pl.when(j + 1 < count)
            def _next():
                start(j + 1, (j + 1) % slots)

        else:
            start(j, 0)
        for n in range(m):
            plgpu.barrier_wait(barriers.at[slot * m + n])
        return body(j, tuple(buf.at[slot] for buf in buffers), carry)

    return jax.lax.fori_loop(0, count, step, init)


def _pipeline(wgs: _Warpgroups, count, sources, buffers, full, free, compute):
    """Runs compute(wg, walk) on each consumer warpgroup wg, where walk(body, init) folds body(j, tile refs,
    carry) over the row block's `count` listed tiles (sources / buffers / full barriers as `_walk_tiles`).

    Without a producer that is `_walk_tiles` on the one warpgroup. With one, the producer copies tile j into
    slot j % slots once every consumer has released the tile that slot held before (`free`: one arrival per
    consumer per use), so up to `slots` tiles ahead of the slower consumer; the consumers wait for the
    copies, run body and release the slot. Body's wgmmas are complete when it returns (`_mma` waits) and its
    SMEM loads are synchronous, so a released slot is no longer read.
    """
    if not wgs.producer:
        compute(0, lambda body, init: _walk_tiles(count, sources, buffers, full, body, init))
        return
    wg = jax.lax.axis_index("wg")
    m, slots = len(sources), buffers[0].shape[0]

    @pl.when(wg == wgs.consumers)
    def _producer():
        plgpu.set_max_registers(MGPU_PRODUCER_REGISTERS, action="decrease")

        def fetch(j, carry):
            slot = j % slots

            @pl.when(j >= slots)
            def _reuse():
                plgpu.barrier_wait(free.at[slot])

            for n, (src, buf) in enumerate(zip(sources, buffers, strict=True)):
                plgpu.copy_gmem_to_smem(src(j), buf.at[slot], full.at[slot * m + n])
            return carry

        def drain(j, carry):
            plgpu.barrier_wait(free.at[j % slots])
            return carry

        jax.lax.fori_loop(0, count, fetch, 0)
        # Also wait out the last `slots` releases, so the producer observes every phase of `free` (JAX's GPU
        # interpreter requires it; on the device it only delays the producer's exit).
        jax.lax.fori_loop(jnp.maximum(count - slots, 0), count, drain, 0)

    @pl.when(wg < wgs.consumers)
    def _consumers():
        plgpu.set_max_registers(MGPU_CONSUMER_REGISTERS[wgs.consumers], action="increase")

        def walk(body, init):
            def step(j, carry):
                slot = j % slots
                for n in range(m):
                    plgpu.barrier_wait(full.at[slot * m + n])
                carry = body(j, tuple(buf.at[slot] for buf in buffers), carry)
                plgpu.barrier_arrive(free.at[slot])
                return carry

            return jax.lax.fori_loop(0, count, step, init)

        compute(wg, walk)


def _mgpu_scoped(scoped, smem, wgs: _Warpgroups, slots: int, once: int, streamed: int, turns: bool = False):
    """pl.run_scoped(scoped, *smem, barriers): `once` barriers per consumer (its own row slice's copies),
    `streamed` per slot (the tile copies), with a producer the slots' release barriers (shared by all
    warpgroups of the block), and with `turns` the consumers' turn barrier (`_take_turns`)."""
    barriers = [plgpu.Barrier(num_barriers=wgs.consumers * once), plgpu.Barrier(num_barriers=slots * streamed)]
    if wgs.producer:
        barriers.append(plgpu.Barrier(num_arrivals=wgs.consumers, num_barriers=slots))
    if turns:
        barriers.append(plgpu.Barrier(num_arrivals=wgs.consumers))
    pl.run_scoped(scoped, *smem, *barriers, collective_axes="wg" if wgs.producer else ())


def _take_turns(wgs: _Warpgroups, slots: int) -> bool:
    """Whether a forward launch's two consumers take turns on the tensor cores (FlashAttention-3's ping-pong):
    each passes the turn barrier (both arrive, then wait) after issuing its S = Q K^T and before issuing its
    P V, and consumer 1 once before its walk, consumer 0 once after it, so that one's softmax runs while the
    other's matmuls do. Needs two copy slots: with one, consumer 0 would wait for the next tile, whose copy
    waits for consumer 1 to release the slot, which waits for consumer 0's turn."""
    return wgs.consumers == 2 and slots == 2


def _lse_or_zero(lse):
    """A row with no allowed key has lse = -inf; its probabilities are masked to 0, so shift by 0 instead."""
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def _fwd_mgpu_kernel(blocks_ref, counts_ref, full_ref, q_ref, kt_ref, v_ref, q_pos_ref, k_pos_ref, o_ref, lse_ref,
                     *, allows, scale, block_q, block_k, slots, wgs):
    """GMEM refs: blocks int32[nq, W], counts int32[nq], FULL flags int32[nq, W], q/v [BN, T, H],
    kt [BN, H, Tkp], positions int32[T]; out o [BN, Tqp, H] in q's dtype, lse f32[BN, Tqp]."""
    b, i = jax.lax.axis_index("rows"), jax.lax.axis_index("q_blocks")
    h, dtype = q_ref.shape[-1], q_ref.dtype
    sub = block_q // wgs.consumers
    tile = (sub, block_k)
    cols = lambda j: pl.ds(blocks_ref[i, j] * block_k, block_k)

    def scoped(q_smem, q_pos_smem, kt_smem, v_smem, k_pos_smem, p_smem, lse_smem, once, full, free=None,
               turn=None):
        def take_turn():
            if turn is not None:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def compute(wg, walk):
            rows = pl.ds(i * block_q + wg * sub, sub)
            q_tile, p_tile, lse_tile = q_smem.at[wg], p_smem.at[wg], lse_smem.at[wg]
            _copy_in([(q_ref.at[b, rows], q_tile), (q_pos_ref.at[rows], q_pos_smem.at[wg])], once, 2 * wg)
            i_pos = jax.lax.broadcast_in_dim(q_pos_smem.at[wg][...], tile, (0,))
            if turn is not None:
                pl.when(wg == 1)(take_turn)

            def visit(j, refs, carry):
                kt, v, k_pos = refs
                m_prev, l_prev, acc = carry
                j_pos = lambda: jax.lax.broadcast_in_dim(k_pos[...], tile, (1,))
                s = _mask_partial(_mma(q_tile, kt, tile, take_turn) * (scale * LOG2E), full_ref[i, j],  # base 2
                                  lambda: _allowed(allows, i_pos, j_pos()))
                m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
                m_safe = _lse_or_zero(m_new)  # As in `_fwd_kernel`: keep exp2() finite.
                alpha = jnp.exp2(m_prev - m_safe)
                p = jnp.exp2(s - jax.lax.broadcast_in_dim(m_safe, s.shape, (0,)))
                p_tile[...] = p.astype(dtype)
                plgpu.commit_smem()  # Make the register -> SMEM store visible to the tensor cores.
                take_turn()
                acc = jax.lax.broadcast_in_dim(alpha, acc.shape, (0,)) * acc + _mma(p_tile, v, (sub, h))
                return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

            init = (jnp.full((sub,), -jnp.inf, jnp.float32), jnp.zeros((sub,), jnp.float32),
                    jnp.zeros((sub, h), jnp.float32))
            m, denom, acc = walk(visit, init)
            if turn is not None:
                pl.when(wg == 0)(take_turn)
            live = denom > 0
            denom = jnp.where(live, denom, 1.0)  # Rows with no allowed key: output 0, lse -inf.
            q_tile[...] = (acc / jax.lax.broadcast_in_dim(denom, acc.shape, (0,))).astype(dtype)
            lse_tile[...] = jnp.where(live, (m + jnp.log2(denom)) * LN2, -jnp.inf)  # natural log units
            _copy_out([(q_tile, o_ref.at[b, rows]), (lse_tile, lse_ref.at[b, rows])])

        _pipeline(
            wgs, counts_ref[i],
            [lambda j: kt_ref.at[b, :, cols(j)], lambda j: v_ref.at[b, cols(j)], lambda j: k_pos_ref.at[cols(j)]],
            [kt_smem, v_smem, k_pos_smem], full, free, compute,
        )

    _mgpu_scoped(scoped, _fwd_mgpu_smem(block_q, block_k, h, dtype, slots, wgs.consumers), wgs, slots, 2, 3,
                 turns=_take_turns(wgs, slots))


def _fwd_mgpu_smem(block_q, block_k, h, dtype, slots, consumers=1):
    """The forward kernel's SMEM, in `scoped`'s argument order (barriers apart)."""
    sub = block_q // consumers
    return [
        _smem_tiled((consumers, sub, h), dtype), plgpu.SMEM((consumers, sub), jnp.int32),  # once: Q (then O), q pos
        _smem_tiled((slots, h, block_k), dtype), _smem_tiled((slots, block_k, h), dtype),  # streamed: K^T, V,
        plgpu.SMEM((slots, block_k), jnp.int32),  # key positions
        _smem_tiled((consumers, sub, block_k), dtype),  # P
        plgpu.SMEM((consumers, sub), jnp.float32),  # out: lse
    ]


def _dq_mgpu_kernel(blocks_ref, counts_ref, full_ref, q_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kt_ref, vt_ref,
                    k_ref, k_pos_ref, dq_ref, *, allows, scale, block_q, block_k, slots, wgs):
    """GMEM refs: blocks int32[nq, W], counts int32[nq], FULL flags int32[nq, W], q/do [BN, Tqp, H],
    lse/delta f32[BN, Tqp], kt/vt [BN, H, Tkp], k [BN, Tkp, H], positions int32[Tqp] / [Tkp]; out dq
    [BN, Tqp, H] in q's dtype."""
    b, i = jax.lax.axis_index("rows"), jax.lax.axis_index("q_blocks")
    h, dtype = q_ref.shape[-1], q_ref.dtype
    sub = block_q // wgs.consumers
    tile = (sub, block_k)
    cols = lambda j: pl.ds(blocks_ref[i, j] * block_k, block_k)

    def scoped(q_smem, do_smem, q_pos_smem, lse_smem, delta_smem, kt_smem, vt_smem, k_smem, k_pos_smem, ds_smem,
               once, full, free=None):
        def compute(wg, walk):
            rows = pl.ds(i * block_q + wg * sub, sub)
            q_tile, do_tile, ds_tile = q_smem.at[wg], do_smem.at[wg], ds_smem.at[wg]
            _copy_in([(q_ref.at[b, rows], q_tile), (do_ref.at[b, rows], do_tile),
                      (q_pos_ref.at[rows], q_pos_smem.at[wg]), (lse_ref.at[b, rows], lse_smem.at[wg]),
                      (delta_ref.at[b, rows], delta_smem.at[wg])], once, 5 * wg)
            by_row = lambda x: jax.lax.broadcast_in_dim(x, tile, (0,))
            i_pos, lse2 = by_row(q_pos_smem.at[wg][...]), by_row(_lse_or_zero(lse_smem.at[wg][...]) * LOG2E)
            delta = by_row(delta_smem.at[wg][...])

            def visit(j, refs, acc):
                kt, vt, k, k_pos = refs
                j_pos = lambda: jax.lax.broadcast_in_dim(k_pos[...], tile, (1,))
                p = jnp.exp2(_mask_partial(_mma(q_tile, kt, tile) * (scale * LOG2E), full_ref[i, j],
                                           lambda: _allowed(allows, i_pos, j_pos())) - lse2)
                ds_tile[...] = (p * (_mma(do_tile, vt, tile) - delta)).astype(dtype)
                plgpu.commit_smem()
                return acc + _mma(ds_tile, k, (sub, h))

            acc = walk(visit, jnp.zeros((sub, h), jnp.float32))
            q_tile[...] = (acc * scale).astype(dtype)  # Q's tile is free now: dq leaves through it.
            _copy_out([(q_tile, dq_ref.at[b, rows])])

        _pipeline(
            wgs, counts_ref[i],
            [lambda j: kt_ref.at[b, :, cols(j)], lambda j: vt_ref.at[b, :, cols(j)], lambda j: k_ref.at[b, cols(j)],
             lambda j: k_pos_ref.at[cols(j)]],
            [kt_smem, vt_smem, k_smem, k_pos_smem], full, free, compute,
        )

    _mgpu_scoped(scoped, _dq_mgpu_smem(block_q, block_k, h, dtype, slots, wgs.consumers), wgs, slots, 5, 4)


def _dq_mgpu_smem(block_q, block_k, h, dtype, slots, consumers=1):
    """The dq kernel's SMEM, in `scoped`'s argument order (barriers apart)."""
    sub = block_q // consumers
    return [
        _smem_tiled((consumers, sub, h), dtype), _smem_tiled((consumers, sub, h), dtype),  # once: Q, dO,
        plgpu.SMEM((consumers, sub), jnp.int32), plgpu.SMEM((consumers, sub), jnp.float32),  # positions, lse,
        plgpu.SMEM((consumers, sub), jnp.float32),  # delta
        _smem_tiled((slots, h, block_k), dtype), _smem_tiled((slots, h, block_k), dtype),  # streamed: K^T, V^T,
        _smem_tiled((slots, block_k, h), dtype), plgpu.SMEM((slots, block_k), jnp.int32),  # K, key positions
        _smem_tiled((consumers, sub, block_k), dtype),  # dS
    ]


def _dkv_mgpu_kernel(blocks_ref, counts_ref, full_ref, k_ref, v_ref, k_pos_ref, qt_ref, q_ref, dot_ref, do_ref,
                     lse_ref, delta_ref, q_pos_ref, dk_ref, dv_ref, *, allows, scale, block_q, block_k, slots, wgs):
    """GMEM refs: blocks int32[nk, W] (listed q-blocks per k-block), counts int32[nk], their FULL flags
    int32[nk, W], k/v [BN, Tkp, H], qt/dot [BN, H, Tqp], q/do [BN, Tqp, H], lse/delta f32[BN, Tqp], positions;
    out dk, dv [BN, Tkp, H] in k's dtype."""
    b, kb = jax.lax.axis_index("rows"), jax.lax.axis_index("k_blocks")
    h, dtype = k_ref.shape[-1], k_ref.dtype
    sub = block_k // wgs.consumers
    tile = (sub, block_q)  # Transposed: keys are the rows.
    rows = lambda j: pl.ds(blocks_ref[kb, j] * block_q, block_q)

    def scoped(k_smem, v_smem, k_pos_smem, qt_smem, q_smem, dot_smem, do_smem, q_pos_smem, lse_smem, delta_smem,
               s_smem, once, full, free=None):
        def compute(wg, walk):
            cols = pl.ds(kb * block_k + wg * sub, sub)
            k_tile, v_tile, s_tile = k_smem.at[wg], v_smem.at[wg], s_smem.at[wg]
            _copy_in([(k_ref.at[b, cols], k_tile), (v_ref.at[b, cols], v_tile),
                      (k_pos_ref.at[cols], k_pos_smem.at[wg])], once, 3 * wg)
            j_pos = jax.lax.broadcast_in_dim(k_pos_smem.at[wg][...], tile, (0,))
            by_col = lambda x: jax.lax.broadcast_in_dim(x, tile, (1,))

            def visit(j, refs, carry):
                qt, q, dot, do, q_pos, lse, delta = refs
                dk, dv = carry
                i_pos = lambda: by_col(q_pos[...])
                st = _mask_partial(_mma(k_tile, qt, tile) * (scale * LOG2E), full_ref[kb, j],
                                   lambda: _allowed(allows, i_pos(), j_pos))
                pt = jnp.exp2(st - by_col(_lse_or_zero(lse[...]) * LOG2E))
                dst = pt * (_mma(v_tile, dot, tile) - by_col(delta[...]))
                # P^T, then dS^T, through one SMEM tile: `_mma` has waited for the first product's reads.
                s_tile[...] = pt.astype(dtype)
                plgpu.commit_smem()
                dv = dv + _mma(s_tile, do, (sub, h))
                s_tile[...] = dst.astype(dtype)
                plgpu.commit_smem()
                return dk + _mma(s_tile, q, (sub, h)), dv

            zeros = jnp.zeros((sub, h), jnp.float32)
            dk, dv = walk(visit, (zeros, zeros))
            # K's and V's tiles are free now: dk and dv leave through them.
            k_tile[...] = (dk * scale).astype(dtype)
            v_tile[...] = dv.astype(dtype)
            _copy_out([(k_tile, dk_ref.at[b, cols]), (v_tile, dv_ref.at[b, cols])])

        _pipeline(
            wgs, counts_ref[kb],
            [lambda j: qt_ref.at[b, :, rows(j)], lambda j: q_ref.at[b, rows(j)], lambda j: dot_ref.at[b, :, rows(j)],
             lambda j: do_ref.at[b, rows(j)], lambda j: q_pos_ref.at[rows(j)], lambda j: lse_ref.at[b, rows(j)],
             lambda j: delta_ref.at[b, rows(j)]],
            [qt_smem, q_smem, dot_smem, do_smem, q_pos_smem, lse_smem, delta_smem], full, free, compute,
        )

    _mgpu_scoped(scoped, _dkv_mgpu_smem(block_q, block_k, h, dtype, slots, wgs.consumers), wgs, slots, 3, 7)


def _dkv_mgpu_smem(block_q, block_k, h, dtype, slots, consumers=1):
    """The dk/dv kernel's SMEM, in `scoped`'s argument order (barriers apart)."""
    sub = block_k // consumers
    qt, q = _smem_tiled((slots, h, block_q), dtype), _smem_tiled((slots, block_q, h), dtype)
    return [
        _smem_tiled((consumers, sub, h), dtype), _smem_tiled((consumers, sub, h), dtype),  # once: K, V,
        plgpu.SMEM((consumers, sub), jnp.int32),  # key positions
        qt, q, qt, q,  # streamed: Q^T, Q, dO^T, dO,
        plgpu.SMEM((slots, block_q), jnp.int32), plgpu.SMEM((slots, block_q), jnp.float32),  # positions, lse,
        plgpu.SMEM((slots, block_q), jnp.float32),  # delta
        _smem_tiled((consumers, sub, block_q), dtype),  # P^T, then dS^T
    ]


@dataclasses.dataclass(frozen=True)
class _MgpuKernel:
    """One Mosaic GPU kernel: its `body`, its SMEM list `smem(block_q, block_k, h, dtype, slots, consumers)`
    (in the order of `body`'s `scoped`, barriers apart) and whose tokens its row blocks are: queries
    (forward, dq; one grid step per q-block) or keys (dk/dv; per k-block)."""

    name: str
    body: Callable
    smem: Callable
    key_rows: bool

    def warpgroups(self, lowering: str, block_q: int, block_k: int) -> _Warpgroups:
        return _Warpgroups.for_rows(lowering, block_k if self.key_rows else block_q)

    def smem_bytes(self, lowering: str, block_q: int, block_k: int, h: int, dtype, slots: int) -> int:
        """SMEM bytes, each buffer rounded up to 1 KiB (the swizzle alignment): within a few hundred bytes
        (its barriers) of what Mosaic GPU allocates."""
        consumers = self.warpgroups(lowering, block_q, block_k).consumers
        return sum(-(-math.prod(ref.shape) * jnp.dtype(ref.dtype).itemsize // 1024) * 1024
                   for ref in self.smem(block_q, block_k, h, dtype, slots, consumers))


_MGPU_KERNELS = (_MgpuKernel("forward", _fwd_mgpu_kernel, _fwd_mgpu_smem, key_rows=False),
                _MgpuKernel("dq", _dq_mgpu_kernel, _dq_mgpu_smem, key_rows=False),
                _MgpuKernel("dk/dv", _dkv_mgpu_kernel, _dkv_mgpu_smem, key_rows=True))
_MGPU_FWD, _MGPU_DQ, _MGPU_DKV = _MGPU_KERNELS


def _mgpu_slots(kernel: _MgpuKernel, lowering: str, block_q: int, block_k: int, h: int, dtype) -> int:
    """2 (double-buffered copies) if `kernel`'s SMEM fits the budget with two slots per streamed operand,
    else 1 (`_check_compilable` rejects tiles that do not fit even so)."""
    return 2 if kernel.smem_bytes(lowering, block_q, block_k, h, dtype, 2) <= MGPU_SMEM_BYTES else 1


def _check_mgpu_smem(lowering: str, block_q: int, block_k: int, h: int, dtype) -> None:
    """Raises ValueError if a Mosaic GPU kernel would not fit in SMEM even with one slot per operand."""
    for kernel in _MGPU_KERNELS:
        if (need := kernel.smem_bytes(lowering, block_q, block_k, h, dtype, 1)) > MGPU_SMEM_BYTES:
            raise ValueError(f"the {lowering!r} {kernel.name} kernel exceeds available shared memory at "
                             f"block_q={block_q}, block_k={block_k}, head_dim={h}: {need // 1024} KiB > "
                             f"{MGPU_SMEM_BYTES // 1024} KiB; use smaller tiles")


def _mgpu_call(kernel: _MgpuKernel, plan: _ComponentPlan, scale: float, mode: _Mode, grid, grid_names, out_type,
               layout: patterns_lib.BlockLayout, rows, *operands):
    """One `plgpu.kernel` launch of `kernel` over grid (BN, row blocks), with the warpgroups `mode.lowering`
    asks for and the copy slots that fit. The kernel's operands are `layout`'s tables, then `rows` (the
    [BN, T, H] q or k whose tiles the grid's row blocks are), then `operands`."""
    bq, bk, (h, dtype) = plan.fwd.block_q, plan.fwd.block_k, (rows.shape[-1], rows.dtype)
    wgs = kernel.warpgroups(mode.lowering, bq, bk)
    threads = dict(num_threads=wgs.consumers + 1, thread_name="wg") if wgs.producer else {}
    outs = plgpu.kernel(
        functools.partial(kernel.body, allows=plan.allows, scale=scale, block_q=bq, block_k=bk,
                          slots=_mgpu_slots(kernel, mode.lowering, bq, bk, h, dtype), wgs=wgs),
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        compiler_params=MGPU_COMPILER_PARAMS,
        interpret=_mgpu_interpret_params() if mode.interpret else False,
        **threads,
    )(*_tables(layout), rows, *operands)
    return jax.tree.map(lambda out: _vary_like(out, rows), outs)


def _component_fwd_mgpu(plan: _ComponentPlan, qc, kc, vc, scale: float, mode: _Mode):
    """Mosaic GPU forward of one component: -> out [BN, Tqp, H] (q's dtype), lse f32[BN, Tqp, 1]."""
    bn, tqp, h = qc.shape
    lay = plan.fwd
    o, lse = _mgpu_call(
        _MGPU_FWD, plan, scale, mode, (bn, lay.kv_blocks.shape[0]), ("rows", "q_blocks"),
        (jax.ShapeDtypeStruct((bn, tqp, h), qc.dtype), jax.ShapeDtypeStruct((bn, tqp), jnp.float32)),
        lay, qc, jnp.swapaxes(kc, 1, 2), vc,
        jnp.asarray(plan.q_pos), jnp.asarray(plan.k_pos),
    )
    return o, lse[..., None]


def _component_bwd_mgpu(plan: _ComponentPlan, qc, kc, vc, doc, lsec, deltac, scale: float, mode: _Mode):
    """Mosaic GPU backward of one component: -> dq [BN, Tqp, H], dk, dv [BN, Tkp, H] (as `_component_bwd`)."""
    bn, tqp, h = qc.shape
    tkp = kc.shape[1]
    fwd, bwd = plan.fwd, plan.bwd
    lse, delta = lsec[..., 0], deltac[..., 0]
    q_pos, k_pos = jnp.asarray(plan.q_pos), jnp.asarray(plan.k_pos)
    t = lambda x: jnp.swapaxes(x, 1, 2)  # The transposed wgmma operands (see the section comment).
    dq = _mgpu_call(
        _MGPU_DQ, plan, scale, mode, (bn, fwd.kv_blocks.shape[0]), ("rows", "q_blocks"),
        jax.ShapeDtypeStruct((bn, tqp, h), qc.dtype),
        fwd, qc, doc, lse, delta, q_pos, t(kc), t(vc), kc, k_pos,
    )
    kc, vc, qc, doc = mode.after((kc, vc, qc, doc), dq)
    dk, dv = _mgpu_call(
        _MGPU_DKV, plan, scale, mode, (bn, bwd.kv_blocks.shape[0]), ("rows", "k_blocks"),
        (jax.ShapeDtypeStruct((bn, tkp, h), kc.dtype), jax.ShapeDtypeStruct((bn, tkp, h), vc.dtype)),
        bwd, kc, vc, k_pos, t(qc), qc, t(doc), doc, lse, delta, q_pos,
    )
    return dq, dk, dv


def _mgpu_interpret_params():
    """JAX's GPU interpreter (simulates SMEM, TMA, barriers, wgmma on CPU); not public API in JAX 0.10."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # Moved or made public in a later JAX.
        raise NotImplementedError(f"this JAX has no Mosaic GPU interpreter ({e}); use lowering='gpu'") from e
    return InterpretGPUParams()


# --- Gathers between natural order [BN, T, ...] and a component's padded tile order. ----------------------


def _gather(x, pos: np.ndarray):
    """[BN, T, ...] -> [BN, len(pos), ...]: rows at natural positions `pos`, zeros where pos = -1."""
    rows = jnp.take(x, jnp.asarray(np.maximum(pos, 0)), axis=1)
    valid = jnp.asarray(pos >= 0).reshape((1, -1) + (1,) * (x.ndim - 2))
    return jnp.where(valid, rows, jnp.zeros((), x.dtype))


def _scatter_add(acc, xc, pos: np.ndarray):
    """acc[BN, T, ...] += xc's valid rows (pos >= 0) at their natural positions (positions are distinct)."""
    valid = np.flatnonzero(pos >= 0)
    return acc.at[:, jnp.asarray(pos[valid])].add(xc[:, jnp.asarray(valid)].astype(acc.dtype))


def _forward(q, k, v, plans, scale, mode, count_visits=False):
    """q, k, v [BN, T, H] -> out f32[BN, T, H], lse f32[BN, T, 1], visits per component ([BN, nq, 1] or None)."""
    outs, lses, visits = [], [], []
    for plan in plans:
        qc, kc, vc = mode.after((_gather(q, plan.q_pos), _gather(k, plan.k_pos), _gather(v, plan.k_pos)),
                                outs[-1] if outs else None)
        o, lse, *vis = _component_fwd(plan, qc, kc, vc, scale, mode, count_visits)
        rows = jnp.asarray(plan.q_rows)
        outs.append(jnp.take(o, rows, axis=1))
        lses.append(jnp.take(lse, rows, axis=1))
        visits.append(vis[0] if vis else None)
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
        dqc, dkc, dvc = _component_bwd(
            plan, *mode.after((_gather(q, qp), _gather(k, kp), _gather(v, kp), _gather(do.astype(q.dtype), qp)), dqc),
            _gather(lse, qp), _gather(delta, qp), scale, mode,
        )
        dq = _scatter_add(dq, dqc, qp)
        dk = _scatter_add(dk, dkc, kp)
        dv = _scatter_add(dv, dvc, kp)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
# Jitted so that eager calls run as one compiled program (op-by-op interpret mode is far slower); inside
# an outer jit this is just a nested call. Plans are cached per (pattern, T, blocks), so retracing is rare.
_attention_jit = jax.jit(_attention, static_argnums=(3, 4, 5))


# --- Public entry. ---------------------------------------------------------------------------------------


def _sublanes(dtype) -> int:
    """Rows of one TPU vreg tile for dtype: 8 for 32-bit, 16 for 16-bit (bf16 packs two rows per sublane)."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _block_size(block: int | None, default: int, t: int, lowering: str = "tpu", dtype=jnp.float32) -> int:
    if block is None:
        # Cap at the sequence length so that short inputs need no big tiles, rounded to what the target
        # compiles: 'tpu' a multiple of the dtype's sublane tile (8 fp32, 16 bf16), 'gpu' a power of two >= 16;
        # 'mosaic_gpu' one warpgroup's wgmma tile, 'mosaic_gpu_ws' two.
        if lowering in _MGPU_LOWERINGS:
            return MGPU_BLOCK * (2 if lowering == "mosaic_gpu_ws" else 1)
        if lowering == "gpu":
            return max(16, min(default, pl.next_power_of_2(t)))
        g = _sublanes(dtype)
        return max(g, min(default, -(-t // g) * g))
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block sizes must be positive integers, got {block!r}")
    return int(block)


def _check_compilable(lowering: str, bq: int, bk: int, h: int, dtype) -> None:
    """Raises ValueError for tiles the real compiler rejects (interpret mode accepts any size).

    'tpu' (Mosaic): q/k/v tiles [b, H] have b as the sublane dim, so b must be a multiple of the dtype's
    sublane tile (Pallas itself checks only 8; 16-bit dtypes tile (16, 128) natively). 'gpu' (Triton):
    every array in the kernel must have a power-of-two size and tl.dot needs dims >= 16, so bq, bk and H
    must be powers of two >= 16. Pallas's Triton lowering checks only the power of two. 'mosaic_gpu' (also
    checked in interpret mode, whose TMA / wgmma simulation has the same rules): 16-bit dtypes (wgmma's
    SMEM operands), block_q 64 (one warpgroup's M), block_k and H multiples of 64 (M of the dk/dv kernel,
    128-byte swizzled rows). 'mosaic_gpu_ws': the same, but block_q and block_k 64 or 128 (one or two
    consumer warpgroups of 64 rows in the forward / dq and in the dk/dv kernels). Both: every kernel fits in
    SMEM with one slot per streamed operand (at H = 128, 'mosaic_gpu_ws' needs a 64 tile on one side).
    """
    if lowering in _MGPU_LOWERINGS:
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"the {lowering!r} kernels need bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}")
        if lowering == "mosaic_gpu" and (bq != MGPU_BLOCK or bk % MGPU_BLOCK or h % MGPU_BLOCK):
            raise ValueError(f"the 'mosaic_gpu' kernels need block_q = {MGPU_BLOCK} and block_k, head_dim multiples "
                             f"of {MGPU_BLOCK}, got {bq}, {bk}, {h}")
        ws_blocks = (MGPU_BLOCK, 2 * MGPU_BLOCK)
        if lowering == "mosaic_gpu_ws" and (bq not in ws_blocks or bk not in ws_blocks or h % MGPU_BLOCK):
            raise ValueError(f"the 'mosaic_gpu_ws' kernels need block_q, block_k in {ws_blocks} and a head_dim "
                             f"multiple of {MGPU_BLOCK}, got {bq}, {bk}, {h}")
        _check_mgpu_smem(lowering, bq, bk, h, dtype)
    elif lowering == "tpu":
        g = _sublanes(dtype)
        if bq % g or bk % g:
            raise ValueError(f"the 'tpu' kernels need block_q and block_k multiples of {g} for "
                             f"{jnp.dtype(dtype).name}, got {bq}, {bk}")
    else:  # 'gpu'
        bad = {name: x for name, x in (("block_q", bq), ("block_k", bk), ("head_dim", h)) if x < 16 or x & (x - 1)}
        if bad:
            raise ValueError(f"the 'gpu' (Triton) kernels need block_q, block_k and head_dim powers of two >= 16, "
                             f"got {bad}")


LOWERINGS = ("tpu", "gpu", *_MGPU_LOWERINGS)
# The JAX backend each lowering compiles on.
_BACKEND = {"tpu": "tpu", "gpu": "gpu", "mosaic_gpu": "gpu", "mosaic_gpu_ws": "gpu"}


@dataclasses.dataclass(frozen=True)
class _Mode:
    """Which kernels run ('tpu': scalar-prefetch grid; 'gpu': Triton-style loop; 'mosaic_gpu' /
    'mosaic_gpu_ws': Hopper TMA / wgmma kernels, one warpgroup / warp-specialized) and whether interpreted."""

    lowering: str
    interpret: bool

    def after(self, x, deps):
        """x, made to wait for `deps` (the previous kernel launch's results) where launches must not overlap:
        JAX's GPU interpreter runs a warp-specialized kernel's warpgroups as host threads that block on each
        other's barriers, and XLA:CPU runs independent calls concurrently, so two such kernels at once can
        starve each other of threads (a hang, seen on 2 cores). Elsewhere x itself."""
        if deps is None or not (self.interpret and self.lowering == "mosaic_gpu_ws"):
            return x
        return jax.lax.optimization_barrier((x, deps))[0]


def _gpu_compute_capability() -> str | None:
    """The first device's CUDA compute capability ('9.0' on Hopper), None off CUDA (e.g. ROCm, CPU)."""
    return getattr(jax.devices()[0], "compute_capability", None)


def _has_wgmma() -> bool:
    """Whether the GPU is a Hopper (sm_90), whose wgmma the 'mosaic_gpu' kernels need (Blackwell has none)."""
    return _gpu_compute_capability() == "9.0"


def _default_lowering(backend: str, dtype, h: int, block_q: int | None, block_k: int | None) -> str:
    """The kernels `lowering=None` picks: off a GPU backend 'tpu' (also what interpret mode runs on CPU); on
    a GPU, Mosaic GPU (the Pallas GPU backend JAX develops; its Triton path is deprecated) wherever its
    kernels run: Hopper, and inputs and blocks `_check_compilable` accepts for it (16-bit, H and the blocks
    asked for multiples of 64, block_q exactly 64). Elsewhere (other GPUs, fp32, other shapes) the Triton
    kernels."""
    if backend != "gpu":
        return "tpu"
    if not _has_wgmma():
        return "gpu"
    bq, bk = (MGPU_BLOCK if b is None else b for b in (block_q, block_k))
    try:
        _check_compilable("mosaic_gpu", bq, bk, h, dtype)
    except ValueError:
        return "gpu"
    return "mosaic_gpu"


def compiled_lowerings() -> tuple[str, ...]:
    """The lowerings whose kernels compile on this process's default backend: ('tpu',) on TPU; on CUDA
    ('gpu', 'mosaic_gpu', 'mosaic_gpu_ws') on Hopper, else ('gpu',); ('gpu',) on ROCm; () on CPU (which
    interprets them)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return ("tpu",)
    if backend != "gpu":
        return ()
    return ("gpu", *_MGPU_LOWERINGS) if _has_wgmma() else ("gpu",)


def _resolve_mode(interpret: bool | None, lowering: str | None, dtype, h: int, block_q: int | None,
                  block_k: int | None) -> _Mode:
    backend = jax.default_backend()
    if lowering is None:
        lowering = _default_lowering(backend, dtype, h, block_q, block_k)
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend != _BACKEND[lowering]:
        raise NotImplementedError(
            f"the {lowering!r} kernels compile only on {_BACKEND[lowering]!r}, not on {backend!r}; use interpret=True"
        )
    if interpret and lowering == "mosaic_gpu_ws" and (threads := _xla_cpu_threads()) < MGPU_INTERPRET_THREADS:
        raise RuntimeError(
            f"JAX's GPU interpreter runs each warpgroup of the 'mosaic_gpu_ws' kernels as a host thread that blocks "
            f"in XLA:CPU's thread pool, which has {threads} threads here and would hang: start the "
            f"process with PJRT_NPROC={2 * MGPU_INTERPRET_THREADS} (or use lowering='mosaic_gpu')"
        )
    return _Mode(lowering, bool(interpret))


# XLA:CPU pool threads the interpreted 'mosaic_gpu_ws' kernels need: the kernel's own blocking call, two
# warpgroups blocked on barriers, one left to run the third (the launches are chained: `_Mode.after`).
MGPU_INTERPRET_THREADS = 4


def _xla_cpu_threads() -> int:
    """Threads in XLA:CPU's pool: $PJRT_NPROC or $NPROC if set (as XLA reads them), else the usable cores."""
    for name in ("PJRT_NPROC", "NPROC"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, interpret, lowering=None, mode=None):
    """-> (component plans, mode); `mode` (if given) overrides interpret / lowering resolution."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one shape [B, T, N, H], got {q.shape}, {k.shape}, {v.shape}")
    pat = patterns_lib.make_pattern(pattern, stride, summary, part)
    t = q.shape[1]
    if t < 1:
        raise ValueError(f"need a sequence of at least one token, got shape {q.shape}")
    mode = mode or _resolve_mode(interpret, lowering, q.dtype, q.shape[-1], block_q, block_k)
    bq = _block_size(block_q, DEFAULT_BLOCK_Q, t, mode.lowering, q.dtype)
    bk = _block_size(block_k, DEFAULT_BLOCK_K, t, mode.lowering, q.dtype)
    if not mode.interpret or mode.lowering in _MGPU_LOWERINGS:
        _check_compilable(mode.lowering, bq, bk, q.shape[-1], q.dtype)
    return _plan(pat, t, bq, bk), mode


def _to_rows(x):
    """[B, T, N, H] -> [B * N, T, H]."""
    b, t, n, h = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b * n, t, h)


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
    out = _attention_jit(_to_rows(q), _to_rows(k), _to_rows(v), plans, 1.0 / math.sqrt(h), mode)
    return jnp.swapaxes(out.reshape(b, n, t, h), 1, 2)


# Lowering platform (as `jax.jit(...).lower(lowering_platforms=...)` names it) -> the kernels it can take
# (the first is the default).
PLATFORM_LOWERINGS = {"tpu": ("tpu",), "cuda": ("gpu", *_MGPU_LOWERINGS), "rocm": ("gpu",)}
# Custom-call target of each kernel kind, one call per kernel launch: Mosaic TPU, Triton, Mosaic GPU.
KERNEL_CALL_TARGETS = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton", "mosaic_gpu": "mosaic_gpu_v2",
                       "mosaic_gpu_ws": "mosaic_gpu_v2"}
# The chip `lower_attention` lowers for unless told (`device_kind`): a v5e, an H100, an MI300X.
LOWERING_DEVICE_KINDS = {"tpu": "TPU v5 lite", "cuda": "NVIDIA H100", "rocm": "gfx942"}


def lower_attention(
    q: jax.Array | jax.ShapeDtypeStruct,
    k: jax.Array | jax.ShapeDtypeStruct,
    v: jax.Array | jax.ShapeDtypeStruct,
    *,
    platform: str,
    lowering: str | None = None,
    grad: bool = False,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
    block_q: int | None = None,
    block_k: int | None = None,
    device_kind: str | None = None,
) -> jax.stages.Lowered:
    """Lowers the compiled (not interpreted) kernels for `platform` on any host, without that device.

    Runs Pallas's own lowering of every kernel: for 'tpu' to Mosaic MLIR (checks block shapes against
    the (8, 128) tiling, lowers each op, serialises the module into a `tpu_custom_call`); for 'cuda' /
    'rocm' to Triton IR (checks power-of-two array sizes, lowers each op, embeds it in a
    `__gpu$xla.gpu.triton` call). What still needs the device: Mosaic's layout / vreg passes (in libtpu)
    and Triton's compile to PTX / AMDGCN (in XLA's GPU backend), i.e. VMEM / shared-memory limits,
    register pressure and numerics. Lowering reads chip facts (TPU generation and tile sizes; a GPU's compute
    capability, which Triton's lowering asks the device for in newer JAX), so it runs under an abstract mesh
    whose one device is of kind `device_kind`.

    Args:
      q, k, v: [B, T, N, H] arrays or `jax.ShapeDtypeStruct`s (only shapes and dtypes are used).
      platform: 'tpu' | 'cuda' | 'rocm'.
      lowering: which kernels (see `sparse_attention`); default 'tpu' for 'tpu', 'gpu' (Triton) for 'cuda' /
        'rocm'; 'mosaic_gpu' or 'mosaic_gpu_ws' on 'cuda' lowers the Mosaic GPU kernels (forward, dq,
        dk/dv).
      grad: also lower the custom VJP (the dq and dk/dv kernels) via `jax.vjp`; the lowered function is
        then (q, k, v, dout) -> (out, dq, dk, dv), else (q, k, v) -> out.
      pattern ... block_k: as `sparse_attention`; blocks must suit the target (see `_check_compilable`).
      device_kind: the chip lowered for, as JAX's `device_kind` names it (e.g. 'TPU v4', 'TPU v6 lite',
        'NVIDIA A100', 'gfx90a'); default `LOWERING_DEVICE_KINDS[platform]`.

    Returns:
      The `jax.stages.Lowered`; `.as_text()` holds one custom call per kernel launch (see
      `KERNEL_CALL_TARGETS`): per pattern component, the forward kernel, plus the dq and dk/dv kernels
      with grad. For the Mosaic GPU lowerings the module is lowered to its dialect here; its compile to PTX
      (like Triton's) happens in XLA's CUDA backend.
    """
    if platform not in PLATFORM_LOWERINGS:
        raise ValueError(f"platform must be one of {tuple(PLATFORM_LOWERINGS)}, got {platform!r}")
    lowering = lowering or PLATFORM_LOWERINGS[platform][0]
    if lowering not in PLATFORM_LOWERINGS[platform]:
        raise ValueError(f"platform {platform!r} takes lowering {PLATFORM_LOWERINGS[platform]}, got {lowering!r}")
    mode = _Mode(lowering, interpret=False)
    plans, _ = _prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, None, mode=mode)
    if not plans:
        raise ValueError("nothing to lower: the pattern allows no key for any query at this length")
    b, t, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    rows = jax.ShapeDtypeStruct((b * n, t, h), q.dtype)

    def forward(q, k, v):
        return _attention(q, k, v, plans, scale, mode)

    def forward_and_vjp(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return (out, *vjp(do))

    fn, args = (forward_and_vjp, (rows,) * 4) if grad else (forward, (rows,) * 3)
    device = jax.sharding.AbstractDevice(device_kind=device_kind or LOWERING_DEVICE_KINDS[platform], num_cores=1,
                                         platform=_BACKEND[lowering])
    # Traced under the mesh too: the trace context (which the lowering sees) is captured at trace time.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("chip",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def visited_blocks(
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
) -> dict[str, np.ndarray]:
    """Tiles the forward kernel actually computed, per component: {name: int32[B * N, q_blocks]}.

    Counted inside the kernel (a per-q-block counter incremented on every visited tile), for checking that
    only the layout's non-empty tiles run: each row should equal `BlockLayout.kv_counts`.
    """
    plans, mode = _prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, interpret, "tpu")
    h = q.shape[-1]
    fwd = jax.jit(lambda q, k, v: _forward(q, k, v, plans, 1.0 / math.sqrt(h), mode, count_visits=True)[2])
    visits = fwd(_to_rows(q), _to_rows(k), _to_rows(v))
    return {plan.name: np.asarray(vis[..., 0]) for plan, vis in zip(plans, visits, strict=True)}


def logits_per_head(
    n: int,
    *,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
    block_q: int | None = None,
    block_k: int | None = None,
    lowering: str = "tpu",
    dtype=jnp.float32,
) -> int:
    """(query, key) logits the kernel computes per batch row and head for length n: visited tiles * bq * bk.

    `lowering` and `dtype` only matter for default block sizes (rounded to what that target compiles).

    Includes the masked entries of partial tiles. Matmul FLOPs per logit: 4 * H forward (QK^T, PV) and
    14 * H backward (the dq and dk/dv kernels each recompute QK^T and dP = dO V^T, then dQ / dK, dV).
    """
    bq = _block_size(block_q, DEFAULT_BLOCK_Q, n, lowering, dtype)
    bk = _block_size(block_k, DEFAULT_BLOCK_K, n, lowering, dtype)
    plans = _plan(patterns_lib.make_pattern(pattern, stride, summary, part), n, bq, bk)
    return sum(plan.fwd.num_blocks for plan in plans) * bq * bk


def sparse_attention_reference(q, k, v, *, pattern, stride=None, summary=None, part="both", **unused):
    """The dense masked-softmax reference with `sparse_attention`'s signature (block/interpret ignored)."""
    del unused
    return reference_lib.reference_attention(q, k, v, pattern=pattern, stride=stride, summary=summary, part=part)
