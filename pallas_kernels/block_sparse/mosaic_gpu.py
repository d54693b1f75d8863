"""Block-sparse attention kernels for Hopper GPUs through Pallas's Mosaic GPU backend (TMA copies, wgmma).

Forward, dq and dk/dv kernels in two lowerings, 'mosaic_gpu' (one warpgroup per row block) and 'mosaic_gpu_ws'
(warp-specialized); see the section comment below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import patterns as patterns_lib
from pallas_kernels.block_sparse import plan as plan_lib
from pallas_kernels.block_sparse import tiles


def _vary_like(x, like):
    """x typed to vary over the manual mesh axes `like` varies over (inside shard_map; else x itself):
    `plgpu.kernel` types its results with shard_map's check off, as invariant."""
    axes = tuple(sorted(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


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
LOWERINGS = ("mosaic_gpu", "mosaic_gpu_ws")


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
                s = tiles.mask_partial(_mma(q_tile, kt, tile, take_turn) * (scale * LOG2E), full_ref[i, j],  # base 2
                                  lambda: tiles.allowed(allows, i_pos, j_pos()))
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
                p = jnp.exp2(tiles.mask_partial(_mma(q_tile, kt, tile) * (scale * LOG2E), full_ref[i, j],
                                           lambda: tiles.allowed(allows, i_pos, j_pos())) - lse2)
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
                st = tiles.mask_partial(_mma(k_tile, qt, tile) * (scale * LOG2E), full_ref[kb, j],
                                   lambda: tiles.allowed(allows, i_pos(), j_pos))
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
    else 1 (`targets.check_compilable` rejects tiles that do not fit even so)."""
    return 2 if kernel.smem_bytes(lowering, block_q, block_k, h, dtype, 2) <= MGPU_SMEM_BYTES else 1


def check_smem(lowering: str, block_q: int, block_k: int, h: int, dtype) -> None:
    """Raises ValueError if a Mosaic GPU kernel would not fit in SMEM even with one slot per operand."""
    for kernel in _MGPU_KERNELS:
        if (need := kernel.smem_bytes(lowering, block_q, block_k, h, dtype, 1)) > MGPU_SMEM_BYTES:
            raise ValueError(f"the {lowering!r} {kernel.name} kernel exceeds available shared memory at "
                             f"block_q={block_q}, block_k={block_k}, head_dim={h}: {need // 1024} KiB > "
                             f"{MGPU_SMEM_BYTES // 1024} KiB; use smaller tiles")


def _mgpu_call(kernel: _MgpuKernel, plan: plan_lib.ComponentPlan, scale: float, mode: plan_lib.Mode, grid,
               grid_names, out_type, layout: patterns_lib.BlockLayout, rows, *operands):
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
    )(*tiles.tables(layout), rows, *operands)
    return jax.tree.map(lambda out: _vary_like(out, rows), outs)


def component_fwd(plan: plan_lib.ComponentPlan, qc, kc, vc, scale: float, mode: plan_lib.Mode):
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


def component_bwd(plan: plan_lib.ComponentPlan, qc, kc, vc, doc, lsec, deltac, scale: float, mode: plan_lib.Mode):
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
