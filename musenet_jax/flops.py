"""Training FLOPs per token, counting only the attention blocks a sparse pattern computes (for MFU)."""

from __future__ import annotations

from musenet_jax import model as model_lib


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
    matmul_params = config.num_layers * per_layer + d * config.padded_vocab_size  # logits use the padded table
    attention = 12 * config.head_dim * attention_pairs(config, seq_len) / seq_len
    return 6 * matmul_params + attention
