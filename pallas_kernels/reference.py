"""Reference sparse attention: a dense softmax over the pattern's [T, T] mask. Slow (O(T^2)) and simple.

This is the ground truth the block-sparse implementations are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import patterns


def masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray) -> jax.Array:
    """Softmax attention under an explicit mask.

    Args:
      q, k, v: [B, T, N, H] (batch, time, heads, head_dim).
      mask: bool[T, T], mask[i, j] = query i may attend to key j.

    Returns:
      [B, T, N, H] in q.dtype. Logits (scaled by 1/sqrt(H)) and softmax statistics are fp32; the
      probabilities are cast to v.dtype for the value matmul. A query row with no allowed key outputs 0.
    """
    h = q.shape[-1]
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) / np.sqrt(h)
    mask = jnp.asarray(mask)
    # A row max over allowed keys only; rows with none get 0 so exp() stays finite (their p is 0 anyway).
    masked = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(masked, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    # exp of the masked logits (exp(-inf) = 0): masking after the exp would overflow for a disallowed key
    # far above the row max, and its zero cotangent times inf would turn the gradients into NaN.
    p = jnp.exp(masked - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
) -> jax.Array:
    """Sparse-pattern attention computed densely (see `patterns` for the pattern definitions).

    Args:
      q, k, v: [B, T, N, H] (batch, time, heads, head_dim).
      pattern: 'dense' | 'strided' | 'fixed'.
      stride: l, for 'strided' and 'fixed'.
      summary: c, for 'fixed'.
      part: 'both' | 'local' | 'summary'.

    Returns:
      [B, T, N, H] in q.dtype; causal; scale 1/sqrt(H); rows with no allowed key are 0.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k, v of shape [B, T, N, H], got {q.shape}, {k.shape}, {v.shape}")
    mask = patterns.make_pattern(pattern, stride, summary, part).mask(q.shape[1])
    return masked_softmax_attention(q, k, v, mask)
