"""Drawing one token per row from masked next-token logits: top-k, then the nucleus, then the token itself.

The sampler (`musenet_jax.sampling`) calls `draw` once per decoding step, on [B, V] logits that its rules have
masked (-inf: never). On a CPU a sort of the vocabulary, or V Gumbel numbers per row, cost more than the model's
step and grow with the batch, so nothing here sorts V values: thresholds come from bisection, the nucleus from
a row's most likely candidates, the token from an inverse CDF at one uniform draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BISECTIONS = 48  # halvings of a threshold's interval: past float32's resolution for logits and probabilities
_NUCLEUS_CANDIDATES = 256  # a nucleus is looked for among a row's most likely tokens first (`draw`)


def _largest_threshold(values: jax.Array, lo: jax.Array, hi: jax.Array, enough) -> jax.Array:
    """float32[B, 1]: per row, the largest t in [lo, hi] with enough(values >= t) (True at lo, monotone in t), by
    bisection: passes over [B, V] instead of a sort, which on a CPU costs more than the model's step."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = enough(values >= mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECTIONS, halve, (lo, hi))
    return lo


def draw(keys: jax.Array, logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """int32[B]: one token per row of logits [B, V] (-inf: never) after top-k then nucleus filtering.

    Top-k (top_k int32[B], 0 = off) keeps the logits >= the k-th largest. The nucleus (top_p float32[B], 1 = off)
    then keeps the smallest set of most likely tokens whose probability reaches top_p (tokens tied at its
    boundary all stay; the most likely token always does). The token is drawn by inverting the kept
    distribution at one uniform draw from the row's key, with no sort of the V logits: a sort, or the V Gumbel
    numbers of jax.random.categorical, cost more than the model's step on a CPU and grow with the batch. A row
    whose nucleus lies among its `_NUCLEUS_CANDIDATES` most likely tokens (the usual case) is drawn from those,
    most likely first; any other row from all V tokens in id order (its threshold found by bisection). Which
    of the two applies depends on the row alone, so a row draws the same token in any batch.
    """
    v = logits.shape[-1]
    u = 1.0 - jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)[:, None]  # (0, 1]

    def by_top_k(logits):
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]
        top = jnp.max(logits, axis=-1, keepdims=True)
        low = jnp.min(jnp.where(jnp.isfinite(logits), logits, top), axis=-1, keepdims=True)
        kth = _largest_threshold(logits, low, top, lambda kept: jnp.sum(kept, -1, keepdims=True) >= k)
        return jnp.where(logits >= kth, logits, -jnp.inf)

    logits = jax.lax.cond(jnp.any(top_k > 0), by_top_k, lambda x: x, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    mass = top_p[:, None]
    count = min(_NUCLEUS_CANDIDATES, v)
    top, ids = jax.lax.top_k(probs, count)  # [B, C], most likely first
    reached = jnp.sum(jnp.cumsum(top, axis=-1) < mass, axis=-1, keepdims=True)  # C: not among the candidates
    among = (reached < count) & (mass < 1.0)  # [B, 1]
    boundary = jnp.take_along_axis(top, jnp.minimum(reached, count - 1), axis=-1)

    def inverse_cdf(weights):  # [B, N] >= 0 -> the first index whose cumulative weight reaches u of the total
        cdf = jnp.cumsum(weights, axis=-1)
        return jnp.minimum(jnp.sum(cdf < u * cdf[:, -1:], axis=-1), weights.shape[-1] - 1)

    from_candidates = jnp.take_along_axis(ids, inverse_cdf(jnp.where(top >= boundary, top, 0.0))[:, None], -1)[:, 0]

    def threshold(_):  # rows whose nucleus is wider than the candidates; 0 for the others
        found = _largest_threshold(probs, jnp.zeros_like(mass), top[:, :1],
                                   lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), -1, keepdims=True) >= mass)
        return jnp.where(among | (mass >= 1.0), 0.0, found)

    def from_all(_):
        wide = jax.lax.cond(jnp.any(~among & (mass < 1.0)), threshold, jnp.zeros_like, mass)
        return jnp.where(among[:, 0], from_candidates, inverse_cdf(jnp.where(probs >= wide, probs, 0.0)))

    return jax.lax.cond(jnp.all(among), lambda _: from_candidates, from_all, None).astype(jnp.int32)
