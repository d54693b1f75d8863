"""In-tile helpers shared by the block-sparse attention kernels of every backend.

Refs are per tile, with the (batch * head) axis squeezed: q/o/do [bq, H], k/v [bk, H]. Logits s = q k^T / sqrt(H)
are [bq, bk] fp32. Only `jax.experimental.pallas` itself is used here, no backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl  # noqa: F401 (kernels' shared namespace)
from jax.sharding import PartitionSpec as P

from pallas_kernels import patterns as patterns_lib


def out_type(like, shape, dtype) -> jax.ShapeDtypeStruct:
    """A kernel's result type. Inside shard_map it varies over the same manual mesh axes as `like` (the
    kernel's q or k), as shard_map's type check requires of a pallas_call's outputs."""
    aval = jax.typeof(like)
    if aval.manual_axis_type.empty:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(aval.sharding.mesh, P()),
                                manual_axis_type=aval.manual_axis_type)


def allowed(allows, i, j):
    """bool (broadcast of i, j): query i may see key j and neither is padding (natural positions, -1)."""
    return allows(i, j) & (i >= 0) & (j >= 0)


def mask_partial(s, full, mask):
    """The logits tile s with -inf where mask() is False (exp() then gives 0), unless the tile is FULL
    (`full` != 0): there every entry is allowed and in range, and the predicate is not evaluated."""
    return jax.lax.cond(full != 0, lambda: s, lambda: jnp.where(mask(), s, -jnp.inf))


def logits(q, k, scale):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale


def probs_and_dlogits(s, v, do, lse, delta):
    """Recomputed probabilities p and logit gradients ds (both fp32 [bq, bk]) from the logits s (-inf where
    masked: p is 0 there) and the global lse."""
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0))
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta)


def tables(layout: patterns_lib.BlockLayout):
    """Scalar-prefetch operands: listed k-blocks int32[nq, W], counts int32[nq], FULL flags int32[nq, W]."""
    return jnp.asarray(layout.kv_blocks), jnp.asarray(layout.kv_counts), jnp.asarray(layout.kv_full, jnp.int32)
