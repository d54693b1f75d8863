"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping.

Gradient accumulation is not an optimizer wrapper here: the train step scans over micro-batches and sums
gradients (see `musenet_jax.train.train_step`), so one optimizer update sees the whole batch.
"""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
    `learning_rate * end_lr_fraction` at `total_steps`.

    Args:
      config: the `train` section of a run config.
    """
    warmup = max(1, min(int(config.warmup_steps), int(config.total_steps) - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(int(config.total_steps), warmup + 1),
        end_value=config.learning_rate * config.end_lr_fraction)


def _decay_mask(params):
    """Weight decay on matrices only: no decay for biases, norm scales and embeddings (MuseNet/GPT-2 style)."""

    def decays(path, leaf):
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return leaf.ndim >= 2 and "embed" not in names and "norm" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW from the `train` section: learning_rate, warmup_steps, total_steps, end_lr_fraction, b1, b2,
    eps, weight_decay, grad_clip (global norm; 0 disables)."""
    chain = []
    if config.grad_clip and config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    chain.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=_decay_mask))
    return optax.chain(*chain)
