"""Block-sparse attention kernels for TPU (Mosaic): forward, dq and dk/dv, and their `pallas_call`s.

One kernel per pattern component, grid (B * N, q_blocks, max_k_blocks): the last axis walks the component's
per-q-block list of non-empty k-blocks, passed by scalar prefetch (`PrefetchScalarGridSpec`) so that the k/v
index maps fetch exactly the listed tiles; steps past a row's count (`pl.when(j < count[i])`) do nothing and
re-use the tile already resident. Inside a PARTIAL tile the component's own predicate, evaluated on the natural
positions of its rows and columns (padding = -1), masks it; FULL tiles (flagged in a third prefetched table)
skip the mask. The dk/dv kernel walks the transposed layout (per k-block, its non-empty q-blocks). q/k/v etc.
are [BN, Tq or Tk (padded), H].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import plan as plan_lib
from pallas_kernels.block_sparse import tiles

_DIMS = ("parallel", "parallel", "arbitrary")

# Refs are per tile, with the (batch * head) axis squeezed: q/o/do [bq, H], k/v [bk, H], q_pos/lse/delta
# [bq, 1], k_pos [1, bk]. Logits s = q k^T / sqrt(H) are [bq, bk] fp32.


def _tile_mask(allows, q_pos_ref, k_pos_ref):
    """bool[bq, bk]: allowed and not padding, from the tile's natural positions."""
    return tiles.allowed(allows, q_pos_ref[...], k_pos_ref[...])


def _where(mask, x, fill):
    """x where mask, else fill; mask None (a FULL tile) keeps x as is."""
    return x if mask is None else jnp.where(mask, x, fill)


def _on_listed_tile(counts_ref, full_ref, row, j, body):
    """Runs body(masked) at step j of `row` if that step is a listed (non-empty) tile.

    FULL tiles (every entry allowed and in range) run body(False), which skips evaluating the predicate;
    on accelerators that saves the integer div/mod VPU work of the mask on most tiles of a long sequence.
    """
    live = j < counts_ref[row]
    full = full_ref[row, j] != 0
    pl.when(live & full)(lambda: body(False))
    pl.when(live & jnp.logical_not(full))(lambda: body(True))


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
        s = tiles.logits(q_ref[...], k_ref[...], scale)
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
        s = _where(mask, tiles.logits(q_ref[...], k, scale), -jnp.inf)
        _, ds = tiles.probs_and_dlogits(s, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...])
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
        s = _where(mask, tiles.logits(q, k_ref[...], scale), -jnp.inf)
        p, ds = tiles.probs_and_dlogits(s, v_ref[...], do, lse_ref[...], delta_ref[...])
        t = (((0,), (0,)), ((), ()))  # Contract the query axis: [bq, bk]^T @ [bq, H].
        dv_scr[...] += jax.lax.dot_general(p.astype(do.dtype), do, t, preferred_element_type=jnp.float32)
        dk_scr[...] += jax.lax.dot_general(ds.astype(q.dtype), q, t, preferred_element_type=jnp.float32)

    _on_listed_tile(q_counts_ref, q_full_ref, kb, j, visit)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


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


def component_fwd(plan: plan_lib.ComponentPlan, qc, kc, vc, scale: float, mode: plan_lib.Mode,
                  count_visits: bool = False):
    """-> out f32[BN, Tqp, H], lse f32[BN, Tqp, 1], and with count_visits visits int32[BN, nq, 1] (the
    tiles each q-block ran, counted in the kernel; a test hook: its (1, 1) blocks suit interpret mode only)."""
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
        out_shape=[tiles.out_type(qc, (bn, tqp, h), jnp.float32), tiles.out_type(qc, (bn, tqp, 1), jnp.float32)]
        + ([tiles.out_type(qc, (bn, nq, 1), jnp.int32)] if count_visits else []),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_DIMS),
        interpret=mode.interpret,
    )(
        *tiles.tables(lay), qc, kc, vc,
        jnp.asarray(plan.q_pos[:, None]), _k_pos_tiles(plan.k_pos, bk),
    )


def component_bwd(plan: plan_lib.ComponentPlan, qc, kc, vc, doc, lsec, deltac, scale: float, mode: plan_lib.Mode):
    """-> dq [BN, Tqp, H], dk, dv [BN, Tkp, H] in the inputs' dtypes, for this component's tiles only."""
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
        out_shape=tiles.out_type(qc, (bn, tqp, h), qc.dtype),
        compiler_params=params,
        interpret=mode.interpret,
    )(*tiles.tables(fwd), qc, kc, vc, doc, lsec, deltac, q_pos, k_pos)

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
        out_shape=[tiles.out_type(kc, (bn, tkp, h), kc.dtype), tiles.out_type(kc, (bn, tkp, h), vc.dtype)],
        compiler_params=params,
        interpret=mode.interpret,
    )(*tiles.tables(bwd), qc, kc, vc, doc, lsec, deltac, q_pos, k_pos)
    return dq, dk, dv
