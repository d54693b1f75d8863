"""Block-sparse attention kernels for GPUs through Triton: forward, dq and dk/dv, and their `pallas_call`s.

One program per (batch * head, row block), a loop over that row's listed blocks (see the section comment).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import patterns as patterns_lib
from pallas_kernels.block_sparse import plan as plan_lib
from pallas_kernels.block_sparse import tiles

_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)

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
    return tiles.mask_partial(tiles.logits(q, k, scale), full,
                         lambda: tiles.allowed(allows, i_pos, j_pos()))


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
        _, ds = tiles.probs_and_dlogits(s, v_ref[tile, :], do, lse, delta)
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
        p, ds = tiles.probs_and_dlogits(s, v, do, lse_ref[tile][:, None], delta_ref[tile][:, None])
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, t, preferred_element_type=jnp.float32)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, t, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, counts_ref[pl.program_id(1)], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_table_specs(layout: patterns_lib.BlockLayout):
    """BlockSpecs of `tiles.tables(layout)` for a (BN, row blocks) grid: the row's listed blocks and FULL flags
    [W], every row's count [n]."""
    row = pl.BlockSpec((None, layout.kv_blocks.shape[1]), lambda b, i: (i, 0))
    return row, pl.BlockSpec((layout.kv_blocks.shape[0],), lambda b, i: (0,)), row


def component_fwd(plan: plan_lib.ComponentPlan, qc, kc, vc, scale: float, mode: plan_lib.Mode):
    """'gpu' forward of one component: -> out f32[BN, Tqp, H], lse f32[BN, Tqp, 1] (as the 'tpu' kernels')."""
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
        out_shape=[tiles.out_type(qc, (bn, tqp, h), jnp.float32), tiles.out_type(qc, (bn, tqp), jnp.float32)],
        compiler_params=_TRITON,
        interpret=mode.interpret,
    )(*tiles.tables(lay), qc, kc, vc, jnp.asarray(plan.q_pos), jnp.asarray(plan.k_pos))
    return o, lse[..., None]


def component_bwd(plan: plan_lib.ComponentPlan, qc, kc, vc, doc, lsec, deltac, scale: float, mode: plan_lib.Mode):
    """'gpu' backward of one component: -> dq [BN, Tqp, H], dk, dv [BN, Tkp, H] (as the 'tpu' kernels')."""
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
        out_shape=tiles.out_type(qc, (bn, tqp, h), qc.dtype),
        compiler_params=_TRITON,
        interpret=mode.interpret,
    )(*tiles.tables(fwd), qc, kc, vc, doc, lse, delta, q_pos, k_pos)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_gpu_kernel, allows=plan.allows, scale=scale, block_q=bq),
        grid=(bn, nk),
        in_specs=[*_gpu_table_specs(bwd), whole(tqp), row(bk), row(bk), whole(tqp), whole1(tqp), whole1(tqp),
                  pl.BlockSpec((tqp,), lambda b, i: (0,)), pl.BlockSpec((bk,), lambda b, i: (i,))],
        out_specs=[row(bk), row(bk)],
        out_shape=[tiles.out_type(kc, (bn, tkp, h), kc.dtype), tiles.out_type(kc, (bn, tkp, h), vc.dtype)],
        compiler_params=_TRITON,
        interpret=mode.interpret,
    )(*tiles.tables(bwd), qc, kc, vc, doc, lse, delta, q_pos, k_pos)
    return dq, dk, dv
