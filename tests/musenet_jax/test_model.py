"""Tests of the Sparse Transformer model: shapes, causality, embeddings, remat, scan, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from musenet_jax import model as model_lib
from musenet_jax import sharding as sharding_lib

# Distinct sizes, so that a mixed-up axis shows up as a shape error rather than a silent broadcast; B, D, N,
# F and V are even so the 2x2x2 mesh test really splits batch, embed, heads, mlp and vocab.
B, T, V, D, N, H, F, L = 4, 37, 74, 42, 6, 5, 58, 3


pytestmark = pytest.mark.usefixtures("fast_compiles")


FEATURE_NAMES = ("timing", "chord", "part", "countdown", "sounding")


def make_config(**overrides) -> model_lib.ModelConfig:
    values = dict(
        vocab_size=V,
        d_model=D,
        num_heads=N,
        head_dim=H,
        mlp_dim=F,
        num_layers=L,
        max_len=T,
        timing_buckets=11,
        timing_bucket_units=7,
        chord_size=5,
        part_size=13,
        countdown_size=17,
        use_sounding=True,
        sounding_size=7,
        dtype="float32",
        attention_impl="reference",
        remat_policy="off",
        # Unrolled by default: eager unrolled calls reuse per-op compilations across tests, while every
        # scanned (or jitted) variant is a fresh multi-second compile on CPU. Scan has its own tests.
        scan_layers=False,
    )
    values.update(overrides)
    return model_lib.ModelConfig(**values)


def make_inputs(seed=0, batch=B, length=T):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, V, (batch, length)), jnp.int32)
    features = {name: jnp.asarray(rng.integers(0, 100, (batch, length)), jnp.int32) for name in FEATURE_NAMES}
    return tokens, features


def make_model(config, seed=0):
    return model_lib.MuseNet(config, rngs=nnx.Rngs(params=seed))


def loss_fn(model, tokens, features):
    """Mean next-token cross-entropy (nats/token)."""
    logits = model(tokens, features)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def loss_and_logits_fn(model, tokens, features):
    logits = model(tokens, features)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean(), logits


def loss_and_grads(model, tokens, features):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, features)
    return loss, nnx.to_pure_dict(grads)


def assert_trees_close(a, b, atol, rtol=0.0):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# --- Shapes and config. -----------------------------------------------------------------------------------


def test_output_shapes_and_dtypes():
    config = make_config()
    model = make_model(config)
    tokens, features = make_inputs()
    logits, hidden = model(tokens, features, return_hidden=True)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    assert hidden.shape == (B, T, D)
    assert np.isfinite(np.asarray(logits)).all()
    # Shorter sequences than max_len work too.
    assert model(tokens[:, :5], {k: v[:, :5] for k, v in features.items()}).shape == (B, 5, V)


def test_initial_loss_is_near_uniform():
    # Small-std init: the untrained model's predictions are close to uniform over V.
    model = make_model(make_config())
    loss = loss_fn(model, *make_inputs())
    assert abs(float(loss) - np.log(V)) < 0.1


def test_bf16_compute_has_fp32_params_and_logits_close_to_fp32():
    tokens, features = make_inputs()
    f32 = make_model(make_config())
    bf16 = make_model(make_config(dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    logits16 = bf16(tokens, features)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(f32(tokens, features)), atol=0.03)


def test_padded_vocab_and_untied_head():
    config = make_config(vocab_multiple=16, tie_embeddings=False)
    model = make_model(config)
    assert config.padded_vocab_size == 80
    assert model.token_embed.shape == (80, D) and model.head.shape == (D, 80)
    assert model(*make_inputs()).shape == (B, T, V)


def test_output_projections_are_scaled_by_depth():
    # init_std / sqrt(2 L) for the sublayer output projections; init_std for the inputs.
    config = make_config(num_layers=8)
    block = make_model(config).layers[0]
    assert np.std(np.asarray(block.mlp.wi[...])) == pytest.approx(0.02, rel=0.1)
    assert np.std(np.asarray(block.mlp.wo[...])) == pytest.approx(0.02 / 4, rel=0.1)
    assert np.std(np.asarray(block.attention.out[...])) == pytest.approx(0.02 / 4, rel=0.15)


def test_sequence_longer_than_max_len_is_rejected():
    model = make_model(make_config(max_len=10))
    tokens, features = make_inputs()
    with pytest.raises(ValueError, match="max_len"):
        model(tokens, features)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_pattern="blocky"), "attention_pattern"),
        (dict(attention_pattern="strided"), "stride"),
        (dict(attention_pattern="fixed", attention_stride=4), "summary"),
        (
            dict(attention_pattern="strided", attention_stride=4, attention_combination="heads", num_heads=1),
            "num_heads",
        ),
        (
            dict(
                attention_pattern="strided",
                attention_stride=4,
                attention_schedule=("both", "dense"),
                dense_every=2,
            ),
            "exclusive",
        ),
        (dict(remat_policy="all"), "remat_policy"),
        (dict(remat_names=("attention",)), "remat_names"),
        (dict(dtype="float8"), "dtype"),
        (dict(d_model=0), "d_model"),
        (dict(attention_impl="cuda"), "attention_impl"),
        (dict(attention_impl="pallas", pallas_lowering="triton"), "pallas_lowering"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_from_config_dict_round_trip_and_unknown_keys():
    config = make_config(
        attention_pattern="fixed",
        attention_stride=4,
        attention_summary=2,
        attention_schedule=("local", "dense"),
    )
    again = model_lib.ModelConfig.from_config_dict(config.to_dict())
    assert again == config
    lists = {
        **config.to_dict(),
        "attention_schedule": ["local", "dense"],
        "axis_rules": [
            list(r) if isinstance(r[1], str | type(None)) else [r[0], list(r[1])] for r in config.axis_rules
        ],
    }
    assert model_lib.ModelConfig.from_config_dict(lists) == config
    with pytest.raises(ValueError, match="unknown model config keys: d_modle"):
        model_lib.ModelConfig.from_config_dict({**config.to_dict(), "d_modle": 3})


@pytest.mark.parametrize(
    "overrides, kinds, period",
    [
        (dict(), ("dense",) * 6, 1),
        (dict(attention_combination="interleaved"), ("dense",) * 6, 1),  # nothing to alternate when dense
        (dict(attention_pattern="strided", attention_stride=4), ("both",) * 6, 1),
        (
            dict(attention_pattern="strided", attention_stride=4, attention_combination="interleaved"),
            ("local", "summary") * 3,
            2,
        ),
        (
            dict(
                attention_pattern="fixed",
                attention_stride=4,
                attention_summary=1,
                attention_combination="heads",
                dense_every=3,
            ),
            ("heads", "heads", "dense") * 2,
            3,
        ),
        (
            dict(
                attention_pattern="strided",
                attention_stride=4,
                attention_combination="interleaved",
                dense_every=3,
            ),
            ("local", "summary", "dense", "summary", "local", "dense"),
            6,
        ),
        (
            dict(
                attention_pattern="strided",
                attention_stride=4,
                attention_schedule=("both", "both", "dense", "both"),
            ),
            ("both", "both", "dense", "both", "both", "both"),
            4,
        ),
    ],
)
def test_layer_schedule_and_period(overrides, kinds, period):
    config = make_config(num_layers=6, **overrides)
    assert config.layer_kinds() == kinds
    assert config.layer_period() == period


def test_heads_combination_splits_heads_into_local_and_summary_groups():
    config = make_config(
        attention_pattern="fixed",
        attention_stride=4,
        attention_summary=2,
        attention_combination="heads",
        num_heads=5,
    )
    (local, n_local), (summary, n_summary) = config.attention_groups("heads")
    assert (local.part, n_local, summary.part, n_summary) == ("local", 3, "summary", 2)
    assert (local.pattern, local.stride, local.summary) == ("fixed", 4, 2)


# --- Causality. -------------------------------------------------------------------------------------------

ATTENTION_VARIANTS = {
    "dense": dict(),
    "strided-merged": dict(attention_pattern="strided", attention_stride=4),
    "strided-interleaved": dict(
        attention_pattern="strided", attention_stride=4, attention_combination="interleaved"
    ),
    "strided-heads": dict(attention_pattern="strided", attention_stride=4, attention_combination="heads"),
    "fixed-merged": dict(attention_pattern="fixed", attention_stride=4, attention_summary=2),
    "fixed-interleaved": dict(
        attention_pattern="fixed",
        attention_stride=4,
        attention_summary=2,
        attention_combination="interleaved",
    ),
    "fixed-heads": dict(
        attention_pattern="fixed", attention_stride=4, attention_summary=2, attention_combination="heads"
    ),
    "strided-dense-every-2": dict(attention_pattern="strided", attention_stride=4, dense_every=2),
    "fixed-schedule": dict(
        attention_pattern="fixed",
        attention_stride=5,
        attention_summary=1,
        attention_schedule=("summary", "dense", "local"),
    ),
    "strided-interleaved-xla": dict(
        attention_pattern="strided",
        attention_stride=4,
        attention_combination="interleaved",
        attention_impl="xla",
    ),
}


@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
def test_future_tokens_never_change_earlier_logits(variant):
    model = make_model(make_config(**ATTENTION_VARIANTS[variant]))
    tokens, features = make_inputs(seed=1)
    other_tokens, other_features = make_inputs(seed=2)
    base = np.asarray(model(tokens, features))
    for t0 in (1, 17, T - 1):
        changed_tokens = tokens.at[:, t0:].set(other_tokens[:, t0:])
        changed_features = {k: v.at[:, t0:].set(other_features[k][:, t0:]) for k, v in features.items()}
        out = np.asarray(model(changed_tokens, changed_features))
        np.testing.assert_allclose(out[:, :t0], base[:, :t0], atol=1e-6, err_msg=f"leak from t >= {t0}")
        assert np.abs(out[:, t0:] - base[:, t0:]).max() > 1e-4  # the change itself is visible


# --- Embedding switches. ----------------------------------------------------------------------------------

TABLES = {
    "timing": "timing_embed",
    "chord": "chord_embed",
    "part": "part_embed",
    "countdown": "countdown_embed",
    "sounding": "sounding_embed",
}


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_feature_embedding_switch(name):
    tokens, features = make_inputs()
    changed = {**features, name: features[name] + 3}
    on = make_model(make_config())
    off = make_model(make_config(**{f"use_{name}": False}))
    assert getattr(off, TABLES[name]) is None
    rows = getattr(on, TABLES[name]).shape[0]
    assert model_lib.count_params(on) - model_lib.count_params(off) == rows * D
    assert np.abs(np.asarray(on(tokens, changed) - on(tokens, features))).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(off(tokens, changed)), np.asarray(off(tokens, features)))
    del features[name]  # A disabled feature need not be given at all; an enabled one must be.
    off(tokens, features)
    with pytest.raises(ValueError, match=f"feature '{name}' is required"):
        on(tokens, features)


def test_positional_embedding_switch():
    tokens, features = make_inputs()
    shifted = jnp.arange(T)[None, :] + 3
    on = make_model(make_config())
    off = make_model(make_config(use_positional=False))
    assert off.position_embed is None
    assert model_lib.count_params(on) - model_lib.count_params(off) == T * D
    assert np.abs(np.asarray(on(tokens, features, positions=shifted) - on(tokens, features))).max() > 1e-4
    np.testing.assert_array_equal(
        np.asarray(off(tokens, features, positions=shifted)), np.asarray(off(tokens, features))
    )


def test_model_without_any_extra_embedding_needs_no_features():
    config = make_config(
        use_positional=False, use_timing=False, use_chord=False, use_part=False, use_countdown=False,
        use_sounding=False,
    )
    tokens, _ = make_inputs()
    assert make_model(config)(tokens).shape == (B, T, V)


def test_timing_is_bucketed_linearly_then_clipped():
    config = make_config()  # 11 buckets of 7 units: values >= 70 share the last row.
    model = make_model(config)
    tokens, features = make_inputs()

    def logits_at_timing(value):
        return np.asarray(model(tokens, {**features, "timing": jnp.full((B, T), value, jnp.int32)}))

    np.testing.assert_array_equal(logits_at_timing(7), logits_at_timing(13))  # one bucket
    np.testing.assert_array_equal(logits_at_timing(70), logits_at_timing(10**6))  # clipped
    assert np.abs(logits_at_timing(6) - logits_at_timing(7)).max() > 1e-4  # next bucket


# --- Training-mode noise. ---------------------------------------------------------------------------------


def test_dropout_and_mixup_only_in_training():
    tokens, features = make_inputs()
    key = jax.random.key(3)
    for overrides in (dict(dropout_rate=0.1), dict(mixup_prob=0.5)):
        model = make_model(make_config(**overrides))
        eval_logits = np.asarray(model(tokens, features))
        np.testing.assert_array_equal(np.asarray(model(tokens, features, rng=key)), eval_logits)
        train_a = np.asarray(model(tokens, features, deterministic=False, rng=key))
        train_b = np.asarray(model(tokens, features, deterministic=False, rng=jax.random.key(4)))
        assert np.abs(train_a - eval_logits).max() > 1e-4, overrides
        assert np.abs(train_a - train_b).max() > 1e-4, overrides
        np.testing.assert_array_equal(
            np.asarray(model(tokens, features, deterministic=False, rng=key)), train_a
        )
        with pytest.raises(ValueError, match="rng"):
            model(tokens, features, deterministic=False)
    # Nothing stochastic configured: training mode is the eval function.
    model = make_model(make_config())
    np.testing.assert_array_equal(
        np.asarray(model(tokens, features, deterministic=False)), np.asarray(model(tokens, features))
    )


def test_mixup_mixes_each_token_with_a_batch_token_at_weight_at_least_half():
    config = make_config(
        mixup_prob=1.0,
        use_positional=False,
        use_timing=False,
        use_chord=False,
        use_part=False,
        use_countdown=False,
        use_sounding=False,
    )
    model = make_model(config)
    tokens, _ = make_inputs()
    table = np.asarray(model.token_embed[...], np.float64)
    own = table[np.asarray(tokens)]  # [B, T, D]
    mixed = np.asarray(model.embed(tokens, mixup_key=jax.random.key(0)), np.float64)
    assert np.abs(mixed - own).max() > 1e-4
    # mixed = lam E[x] + (1 - lam) E[y] with y a token of the batch and lam in [0.5, 1]: so mixed - E[x]
    # is (1 - lam) in [0, 0.5] times E[y] - E[x] for some batch token y.
    partners = table[np.unique(np.asarray(tokens))]  # [U, D]
    step = partners[None, None] - own[:, :, None]  # [B, T, U, D]
    offset = (mixed - own)[:, :, None]
    weight = (offset * step).sum(-1) / np.maximum((step * step).sum(-1), 1e-30)
    residual = np.linalg.norm(offset - weight[..., None] * step, axis=-1)
    fits = (residual < 1e-5) & (weight > -1e-6) & (weight < 0.5 + 1e-5)
    assert fits.any(-1).all()


# --- Remat and scan. --------------------------------------------------------------------------------------

SPARSE = dict(attention_pattern="strided", attention_stride=4, attention_combination="interleaved")


def test_remat_policies_give_equal_loss_and_grads():
    tokens, features = make_inputs()
    results = {}
    for policy in model_lib.REMAT_POLICIES:
        config = make_config(
            num_layers=2, remat_policy=policy, remat_names=("attn_context", "mlp_out"), **SPARSE
        )
        results[policy] = loss_and_grads(make_model(config), tokens, features)
    loss_off, grads_off = results["off"]
    for policy, (loss, grads) in results.items():
        np.testing.assert_allclose(float(loss), float(loss_off), atol=1e-6, err_msg=policy)
        assert_trees_close(grads, grads_off, atol=1e-6)


def test_scanned_and_unrolled_layers_are_equal():
    # Interleaved: period 2, so 5 layers = a scanned period (x2) + one unrolled tail layer. The scanned
    # model also rematerialises ('nothing'), the unrolled one not: remat under scan is covered too.
    tokens, features = make_inputs()
    unrolled_config = make_config(num_layers=5, **SPARSE)
    scanned_config = dataclasses.replace(unrolled_config, scan_layers=True, remat_policy="nothing")
    unrolled = make_model(unrolled_config)
    scanned = make_model(scanned_config, seed=1)
    assert scanned.stack.blocks[0].mlp.wi.shape == (2, D, F)
    assert scanned.stack.blocks[1].attention.groups[0][0].part == "summary"
    assert len(scanned.layers) == 1 and scanned.layers[0].attention.groups[0][0].part == "local"

    params = nnx.to_pure_dict(nnx.state(unrolled))
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, model_lib.convert_layout(params, unrolled_config, scanned_config))
    nnx.update(scanned, state)

    loss_u, grads_u = loss_and_grads(unrolled, tokens, features)
    (loss_s, logits_s), grads_s = nnx.jit(nnx.value_and_grad(loss_and_logits_fn, has_aux=True))(
        scanned, tokens, features
    )
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(unrolled(tokens, features)), atol=1e-6)
    np.testing.assert_allclose(float(loss_s), float(loss_u), atol=1e-6)
    grads_s = model_lib.convert_layout(nnx.to_pure_dict(grads_s), scanned_config, unrolled_config)
    assert_trees_close(grads_s, grads_u, atol=1e-6)


def test_stacked_params_carry_the_layers_axis():
    model = make_model(make_config(num_layers=4, scan_layers=True, **SPARSE))
    state = nnx.state(model)
    assert state["stack"]["blocks"][0]["mlp"]["wi"].get_metadata()["out_sharding"] == (
        "layers",
        "embed",
        "mlp",
    )
    assert state["token_embed"].get_metadata()["out_sharding"] == ("vocab", "embed")


# --- Sharding. --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_init_model_places_the_plain_init_on_a_2x2x2_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices; tests/conftest.py sets jax_num_cpu_devices=8")
    config = make_config(num_layers=4, scan_layers=True, **SPARSE)
    model = model_lib.init_model(config, sharding_lib.make_mesh(2, 2, 2), rng=7)
    # The values of eager construction with that seed (threefry does not depend on the sharding; jit
    # vs eager rounding of the normal sampler leaves ~1e-9).
    plain = nnx.to_pure_dict(nnx.state(make_model(config, seed=7)))
    assert_trees_close(nnx.to_pure_dict(nnx.state(model)), plain, atol=1e-7)
    wi = model.stack.blocks[0].mlp.wi[...]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(wi.sharding.device_set) == 8
    assert model.token_embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert model.stack.blocks[0].attention.query[...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )


@pytest.mark.slow
def test_mesh_2x2x2_forward_and_grad_equal_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices; tests/conftest.py sets jax_num_cpu_devices=8")
    config = make_config(
        num_layers=4,
        scan_layers=True,
        remat_policy="nothing",
        attention_pattern="fixed",
        attention_stride=4,
        attention_summary=2,
        attention_combination="heads",
    )
    tokens, features = make_inputs()
    model = make_model(config)
    step = nnx.value_and_grad(loss_and_logits_fn, has_aux=True)
    (loss_1, logits_1), grads_1 = nnx.jit(step)(model, tokens, features)

    mesh = sharding_lib.make_mesh(2, 2, 2)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding_lib.state_shardings(state, mesh, config.axis_rules))
    sharded = nnx.merge(graphdef, state)
    batch_sharding = sharding_lib.data_sharding(mesh, config.axis_rules, batch_size=B)
    tokens, features = jax.device_put((tokens, features), batch_sharding)
    with jax.set_mesh(mesh):
        (loss_8, logits_8), grads_8 = nnx.jit(step)(sharded, tokens, features)

    assert logits_8.sharding.spec[0] == ("data", "fsdp")
    assert sharded.stack.blocks[0].mlp.wo[...].sharding.spec == jax.sharding.PartitionSpec(
        None, "tensor", "fsdp"
    )
    np.testing.assert_allclose(np.asarray(logits_8), np.asarray(logits_1), atol=2e-6)
    np.testing.assert_allclose(float(loss_8), float(loss_1), atol=1e-6)
    assert_trees_close(nnx.to_pure_dict(grads_8), nnx.to_pure_dict(grads_1), atol=1e-6)


# --- Factored token embedding. ----------------------------------------------------------------------------

def _factored_vocab():
    from data_pipeline.vocab import Vocab, VocabConfig

    # Prime-ish block sizes (W 7, I 9, V 3, P 11, L 2) so that a mixed-up block shows up as wrong numbers.
    return Vocab(VocabConfig(labels=("bach", "jazz"), velocity_bins=3, pitch_min=50, pitch_max=60, max_wait=7))


def _factored(vocab, **overrides):
    config = make_config(vocab_size=vocab.size, token_embedding="factored", token_layout=vocab.layout(),
                         init_std=0.3, **overrides)
    return make_model(config)


def _explicit_table(model, vocab):
    """[V, D] float64: each id's embedding as the plain sum of its part rows, from the vocabulary's own tables."""
    from data_pipeline.vocab import TokenKind

    parts = np.asarray(model.token_parts[...], np.float64)
    w, i, v, p, n_labels, x = vocab.layout()
    whole, on_key = 3 + i + 1 + x + n_labels, 3 + i + 1 + x + n_labels + w
    on_vel, off_key = on_key + i * p, on_key + i * p + i * v
    drum_key = off_key + i * p
    drum_vel = drum_key + 128
    table = np.zeros((vocab.size, parts.shape[1]))
    for t in range(vocab.size):
        kind, inst = vocab.kind[t], int(vocab.instrument[t])
        pitch, vbin = int(vocab.pitch[t]) - vocab.config.pitch_min, int(vocab.velocity_bin_of[t])
        if kind == TokenKind.WAIT:
            table[t] = parts[whole + vocab.wait_units[t] - 1]
        elif kind == TokenKind.NOTE_ON:
            table[t] = parts[on_key + inst * p + pitch] + parts[on_vel + inst * v + vbin]
        elif kind == TokenKind.NOTE_OFF:
            table[t] = parts[off_key + inst * p + pitch]
        elif kind == TokenKind.DRUM:
            table[t] = parts[drum_key + int(vocab.pitch[t])] + parts[drum_vel + vbin]
        elif kind == TokenKind.SPECIAL:
            table[t] = parts[t]
        else:  # instrument-presence tokens, then labels: one row each after the specials
            table[t] = parts[3 + t - vocab.instrument_base]
    return table


def test_factored_embedding_is_the_sum_of_each_tokens_parts_in_and_out():
    vocab = _factored_vocab()
    model = _factored(vocab, use_positional=False, use_timing=False, use_chord=False, use_part=False,
                      use_countdown=False, use_sounding=False)
    assert model.token_embed is None and model.token_parts.shape == (model_lib.token_parts(vocab.layout())[2], D)
    table = _explicit_table(model, vocab)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab.size, (B, T)), jnp.int32)
    np.testing.assert_allclose(model.embed(tokens), table[np.asarray(tokens)], atol=1e-6)
    logits, hidden = model(tokens, return_hidden=True)
    assert logits.shape == (B, T, vocab.size)
    np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), table), atol=1e-4)


def test_factored_token_nll_equals_the_cross_entropy_of_the_logits():
    vocab = _factored_vocab()
    model = _factored(vocab)
    tokens, features = make_inputs()
    tokens = tokens % vocab.size
    targets = jnp.asarray(np.random.default_rng(2).integers(0, vocab.size, (B, T)), jnp.int32)
    logits, hidden = model(tokens, features, return_hidden=True)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(model.token_nll(hidden, targets), expected, rtol=1e-5, atol=1e-5)


def test_factored_decode_step_equals_the_forward():
    vocab = _factored_vocab()
    model = _factored(vocab)
    tokens, features = make_inputs(length=6)
    tokens = tokens % vocab.size
    logits = model(tokens, features)
    cache = model.init_cache(B)
    for t in range(6):
        step, cache = model.decode_step(tokens[:, t], {k: v[:, t] for k, v in features.items()}, t, cache)
        np.testing.assert_allclose(step, logits[:, t], atol=1e-5)


@pytest.mark.parametrize("factored", [True, False])
def test_decode_step_at_columns_gives_those_logits_exactly(factored):
    """A sampler's columns (a few ids per row, PAD-padded) read the very values of the [B, V] logits: bitwise, so
    a row's draw does not depend on how many columns its batch reads."""
    vocab = _factored_vocab()
    model = _factored(vocab) if factored else make_model(make_config(vocab_size=vocab.size))
    tokens, features = make_inputs(length=3)
    tokens = tokens % vocab.size
    rng = np.random.default_rng(3)
    columns = jnp.asarray(np.stack([np.sort(rng.choice(vocab.size, 37, replace=False)) for _ in range(B)]), jnp.int32)
    full_cache = cols_cache = model.init_cache(B)
    for t in range(3):
        feats = {k: v[:, t] for k, v in features.items()}
        full, full_cache = model.decode_step(tokens[:, t], feats, t, full_cache)
        some, cols_cache = model.decode_step(tokens[:, t], feats, t, cols_cache, columns=columns)
        assert some.shape == (B, 37)
        np.testing.assert_array_equal(np.asarray(some), np.take_along_axis(np.asarray(full), np.asarray(columns), 1))


@pytest.mark.parametrize("overrides, message", [
    (dict(token_layout=()), "needs model.token_layout"),
    (dict(token_layout=(7, 9, 3, 11, 3)), "not vocab_size"),
    (dict(tie_embeddings=False), "always tied"),
    (dict(token_embedding="hashed"), "token_embedding must be one of"),
])
def test_bad_factored_config_is_rejected(overrides, message):
    vocab = _factored_vocab()
    values = dict(vocab_size=vocab.size, token_embedding="factored", token_layout=vocab.layout())
    values.update(overrides)
    with pytest.raises(ValueError, match=message):
        make_config(**values)


def test_factored_head_flops_count_the_part_rows():
    from musenet_jax import flops

    vocab = _factored_vocab()
    table = make_config(vocab_size=vocab.size)
    factored = make_config(vocab_size=vocab.size, token_embedding="factored", token_layout=vocab.layout())
    rows = model_lib.token_parts(vocab.layout())[2]
    # 6 FLOPs (forward + backward) per head weight per token; everything else is the same model.
    difference = flops.train_flops_per_token(table, T) - flops.train_flops_per_token(factored, T)
    assert difference == pytest.approx(6 * D * (table.padded_vocab_size - rows))
