"""Training FLOPs per token, counting only the attention blocks a sparse pattern computes (for MFU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from musenet_jax import model as model_lib

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets, by `device.device_kind` prefix.
_PEAK_FLOPS = (
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
)


def attention_pairs(config: model_lib.ModelConfig, seq_len: int) -> float:
    """Query-key pairs computed per sequence, summed over layers and heads.

    Sparse patterns are counted by their block layout (tiles of `stride` x `stride` tokens, or 128 for
    dense), i.e. what a block-sparse kernel computes, not just the allowed pairs.
    """
    total = 0.0
    for kind in config.layer_kinds():
        for spec, heads in config.attention_groups(kind):
            block = spec.stride or min(128, seq_len)
            layout = spec.to_pattern().block_layout(seq_len, block, block)
            total += layout.num_blocks * block * block * heads
    return total


def train_flops_per_token(config: model_lib.ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul parameters, plus 12 x head_dim per computed
    query-key pair (QK^T and AV, forward 4, backward 8), plus the logits projection."""
    d, f, h = config.d_model, config.mlp_dim, config.num_heads * config.head_dim
    per_layer = 4 * d * h + 2 * d * f  # q, k, v, out projections and the two MLP matrices
    # Logits use the padded table, or the factored part table (`MuseNet._logits`, `token_nll`).
    head_rows = (model_lib.token_parts(config.token_layout)[2] if config.token_embedding == "factored"
                 else config.padded_vocab_size)
    matmul_params = config.num_layers * per_layer + d * head_rows
    attention = 12 * config.head_dim * attention_pairs(config, seq_len) / seq_len
    return 6 * matmul_params + attention


def peak_flops_per_device(device=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from) for MFU.

    Known accelerators use their data-sheet bf16 peak. Anything else (CPUs) is measured: the best of a
    few float32 1024^3 matmuls, which takes well under a second.
    """
    device = device or jax.local_devices()[0]
    for prefix, flops in _PEAK_FLOPS:
        if device.device_kind.startswith(prefix):
            return flops, f"{device.device_kind} data sheet"
    n = 1024
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"measured {device.platform} matmul"
