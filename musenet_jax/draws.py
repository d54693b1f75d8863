"""Drawing one token per row from masked next-token logits: top-k, then the nucleus, then the token itself.

The sampler (`musenet_jax.sampling`) calls `draw` once per decoding step, on [B, V] logits that its rules have
masked (-inf: never). On a CPU a sort of the vocabulary, or V Gumbel numbers per row, cost more than the model's
step and grow with the batch, so nothing here sorts V values: thresholds come from bisection, the nucleus from
a row's most likely candidates (few, then more), the token from an inverse CDF at one uniform draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BISECTIONS = 48  # halvings of a threshold's interval: past float32's resolution for logits and probabilities
# A row's nucleus is looked for among its most likely tokens, first few, then more (`draw`): XLA's top-k costs
# about in proportion to how many it returns, and over the main job's 20 s piano pieces (temperature 0.8, top_p
# 0.9) half the nuclei hold at most 4 tokens, 95 % at most 16, but about 1 % hundreds (note choices spread over
# pitches and velocities): 32 candidates serve every row of a 16-row step 9 times in 10, 256 all but 1 in 25.
_FIRST_CANDIDATES = 32
_NUCLEUS_CANDIDATES = 256


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


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """int32[B]: per row of weights [B, N] >= 0, the first index whose cumulative weight reaches u [B, 1] of the
    row's total."""
    cdf = jnp.cumsum(weights, axis=-1)
    return jnp.minimum(jnp.sum(cdf < u * cdf[:, -1:], axis=-1), weights.shape[-1] - 1)


def _among_candidates(probs: jax.Array, mass: jax.Array, u: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """(bool[B]: the row's nucleus lies among its `count` most likely tokens, int32[B]: the token drawn from it,
    most likely first, where it does). The last candidate must be less likely than the nucleus's boundary, so
    that every token tied at the boundary is among them and fewer candidates draw what more would."""
    count = min(count, probs.shape[-1])
    # [B, count], most likely first. The barrier keeps XLA:CPU's top-k a top-k: fused with what reads it, it
    # can become a sort of all V (20x slower).
    top, ids = jax.lax.optimization_barrier(jax.lax.top_k(probs, count))
    reached = jnp.sum(jnp.cumsum(top, axis=-1) < mass, axis=-1, keepdims=True)  # count: not among them
    boundary = jnp.take_along_axis(top, jnp.minimum(reached, count - 1), axis=-1)
    among = (reached < count) & (mass < 1.0) & (top[:, -1:] < boundary)
    token = jnp.take_along_axis(ids, _inverse_cdf(jnp.where(top >= boundary, top, 0.0), u)[:, None], axis=-1)
    return among[:, 0], token[:, 0]


def draw(keys: jax.Array, logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """int32[B]: one token per row of logits [B, V] (-inf: never) after top-k then nucleus filtering.

    Top-k (top_k int32[B], 0 = off) keeps the logits >= the k-th largest. The nucleus (top_p float32[B], 1 = off)
    then keeps the smallest set of most likely tokens whose probability reaches top_p (tokens tied at its
    boundary all stay; the most likely token always does). The token is drawn by inverting the kept
    distribution at one uniform draw from the row's key, with no sort of the V logits: a sort, or the V Gumbel
    numbers of jax.random.categorical, cost more than the model's step on a CPU and grow with the batch. A row
    whose nucleus lies among its `_FIRST_CANDIDATES`, or else its `_NUCLEUS_CANDIDATES`, most likely tokens is
    drawn from those, most likely first (the same token from either); any other row from all V tokens in id
    order (its threshold found by bisection). Which applies depends on the row alone, so a row draws the same
    token in any batch.
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

    def from_all(among, token):  # rows not `among`: their nucleus's threshold by bisection (0: none), then all V
        def threshold(_):
            found = _largest_threshold(probs, jnp.zeros_like(mass), jnp.max(probs, axis=-1, keepdims=True),
                                       lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), -1, keepdims=True) >= mass)
            return jnp.where(among[:, None] | (mass >= 1.0), 0.0, found)

        wide = jax.lax.cond(jnp.any(~among & (mass[:, 0] < 1.0)), threshold, jnp.zeros_like, mass)
        return jnp.where(among, token, _inverse_cdf(jnp.where(probs >= wide, probs, 0.0), u))

    def more(_):
        among, token = _among_candidates(probs, mass, u, _NUCLEUS_CANDIDATES)
        return jax.lax.cond(jnp.all(among), lambda _: token, lambda _: from_all(among, token), None)

    def candidates(_):
        among, token = _among_candidates(probs, mass, u, _FIRST_CANDIDATES)
        return jax.lax.cond(jnp.all(among), lambda _: token, more, None)

    nothing = jnp.zeros(mass.shape[0], bool)
    token = jax.lax.cond(jnp.all(mass >= 1.0), lambda _: from_all(nothing, nothing.astype(jnp.int32)), candidates,
                         None)
    return token.astype(jnp.int32)
