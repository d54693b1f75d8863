"""The host-side plan of block-sparse attention: per pattern component, its orderings and tile tables.

`Pattern.block_layout(n, block_q, block_k)` splits a pattern into disjoint components, each with its own query /
key orderings in which it is tile-sparse (strided A2 uses the column-major order of the [ceil(n/l), l] grid,
fixed A2 gathers the summary keys). `plan` builds, per component, the padded natural positions of its tile rows
and columns and its forward (by q-block) and backward (by k-block) layouts; `gather` / `scatter_add` move
[BN, T, ...] arrays between natural order and a component's padded tile order. `Mode` names the kernels that
run. Nothing here depends on a Pallas backend.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import patterns as patterns_lib

# Default tile sizes (tokens). 128 matches the TPU MXU and the lane width; they are capped below at the
# (8-rounded) component length so that short sequences do not pay for mostly-padding tiles.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity (static arg of the custom_vjp).
class ComponentPlan:
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
def plan(pattern: patterns_lib.Pattern, n: int, block_q: int, block_k: int) -> tuple[ComponentPlan, ...]:
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
        plans.append(ComponentPlan(comp.name, comp.allows, q_pos, k_pos, q_rows, fwd, bwd))
    return tuple(plans)


@dataclasses.dataclass(frozen=True)
class Mode:
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


def gather(x, pos: np.ndarray):
    """[BN, T, ...] -> [BN, len(pos), ...]: rows at natural positions `pos`, zeros where pos = -1."""
    rows = jnp.take(x, jnp.asarray(np.maximum(pos, 0)), axis=1)
    valid = jnp.asarray(pos >= 0).reshape((1, -1) + (1,) * (x.ndim - 2))
    return jnp.where(valid, rows, jnp.zeros((), x.dtype))


def scatter_add(acc, xc, pos: np.ndarray):
    """acc[BN, T, ...] += xc's valid rows (pos >= 0) at their natural positions (positions are distinct)."""
    valid = np.flatnonzero(pos >= 0)
    return acc.at[:, jnp.asarray(pos[valid])].add(xc[:, jnp.asarray(valid)].astype(acc.dtype))


def to_rows(x):
    """[B, T, N, H] -> [B * N, T, H]."""
    b, t, n, h = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b * n, t, h)
