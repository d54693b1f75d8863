"""KV-cache decoding (`MuseNet.decode_step`, `musenet_jax.decoding`): step-by-step logits == the full forward's.

Prime-ish sizes (D 36, 3 heads x 12, L = 61 positions, stride 7, summary 2) so that a wrong axis or an
off-by-one in a cache layout shows up; 61 positions cover 8 strides, so ring wrap-around, several residue
rows and several finished fixed blocks are all exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musenet_jax import attention as attention_lib
from musenet_jax import decoding
from musenet_jax import model as model_lib

B, T, V = 2, 61, 53
FEATURES = ("timing", "chord", "part", "countdown", "sounding")


pytestmark = pytest.mark.usefixtures("fast_compiles")


def make_config(**overrides) -> model_lib.ModelConfig:
    values = dict(
        vocab_size=V, d_model=36, num_heads=3, head_dim=12, mlp_dim=44, num_layers=3, max_len=T,
        timing_buckets=11, timing_bucket_units=7, chord_size=5, part_size=13, countdown_size=17,
        use_sounding=True, sounding_size=3, attention_stride=7, attention_summary=2, dtype="float32",
        attention_impl="xla", remat_policy="off",
    )
    values.update(overrides)
    return model_lib.ModelConfig(**values)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    feats = {name: jnp.asarray(rng.integers(0, 40, (B, T)), jnp.int32) for name in FEATURES}
    return tokens, feats


def decode_all(model, tokens, feats):
    """Logits [B, T, V] from T decode steps, run as one compiled lax.scan (features fed per step)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, feats):
        def body(cache, xs):
            t, tok, f = xs
            logits, cache = nnx.merge(graphdef, state).decode_step(tok, f, t, cache)
            return cache, logits

        cache = nnx.merge(graphdef, state).init_cache(tokens.shape[0])
        xs = (jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.T, {k: v.T for k, v in feats.items()})
        _, logits = jax.lax.scan(body, cache, xs)
        return jnp.swapaxes(logits, 0, 1)

    return run(state, tokens, feats)


CASES = [("dense", "merged")] + [(p, c) for p in ("strided", "fixed") for c in ("merged", "interleaved", "heads")]


@pytest.mark.parametrize(
    "scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scan", "unrolled"]
)
@pytest.mark.parametrize(("pattern", "combination"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_decode_steps_match_full_forward(pattern, combination, scan_layers):
    config = make_config(attention_pattern=pattern, attention_combination=combination, scan_layers=scan_layers)
    model = model_lib.MuseNet(config, rngs=nnx.Rngs(params=1))
    tokens, feats = inputs()
    full = model(tokens, feats)
    stepped = decode_all(model, tokens, feats)
    assert stepped.shape == (B, T, V)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=2e-5, rtol=0)


def test_schedule_with_dense_and_head_groups_matches():
    """An explicit schedule mixing dense, merged and head-group layers (period 3, with an unscanned tail)."""
    config = make_config(attention_pattern="fixed", attention_schedule=("dense", "heads", "both"), num_layers=4,
                         attention_summary=3, use_bias=False, tie_embeddings=False)
    model = model_lib.MuseNet(config, rngs=nnx.Rngs(params=2))
    tokens, feats = inputs(1)
    np.testing.assert_allclose(np.asarray(decode_all(model, tokens, feats)), np.asarray(model(tokens, feats)),
                               atol=2e-5, rtol=0)


def test_cache_sizes_follow_the_pattern():
    """Stored / read cache entries per head group (tokens), as the decoding module documents them."""
    max_len, stride, c = 8448, 128, 8
    rows = -(-max_len // stride)
    spec = attention_lib.AttentionSpec
    assert decoding.cache_tokens(spec("dense"), max_len) == (max_len, max_len)
    assert decoding.cache_tokens(spec("strided", stride, None, "local"), max_len) == (stride + 1, stride + 1)
    assert decoding.cache_tokens(spec("strided", stride, None, "summary"), max_len) == (stride * rows, rows)
    assert decoding.cache_tokens(spec("fixed", stride, c, "local"), max_len) == (stride, stride)
    assert decoding.cache_tokens(spec("fixed", stride, c, "both"), max_len) == (stride + rows * c + 1,
                                                                               stride + rows * c)
    config = make_config(attention_pattern="strided", attention_combination="heads")
    cache = model_lib.MuseNet(config, rngs=nnx.Rngs(params=0)).init_cache(4)
    local, summary = cache["stack"][0]  # one scanned block per period; its two head groups
    assert local["local"]["k"].shape == (3, 4, 2, 8, 12)  # [repeats, B, N_group, l + 1, H]
    assert summary["summary"]["k"].shape == (3, 4, 1, 7 * 9, 12)  # l * ceil(61 / 7) slots, by residue
