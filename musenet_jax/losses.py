"""Next-token cross-entropy with a loss mask, in nats and bits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over scored positions.

    Args:
      logits: [B, T, V], any float dtype; the softmax runs in float32.
      targets: int32[B, T], the token that follows each input position.
      mask: [B, T], 1 where the target is scored (body tokens), 0 for padding and the conditioning prefix.

    Returns:
      (total loss in nats, number of scored tokens), both float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def bits(nats):
    """Nats -> bits."""
    return nats / LN2
