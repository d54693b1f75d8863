"""The run configs in configs/: they load, build a valid ModelConfig, and have the documented shapes.

Nothing here allocates a model: shapes and parameter counts come from `jax.eval_shape`.
"""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from data_pipeline import features as features_lib
from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import model as model_lib
from musenet_jax import sharding as sharding_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
NAMES = ("tiny", "small", "base", "musenet_72l")
VOCAB = Vocab(VocabConfig())  # the default musenet10 vocabulary
VOCAB_SIZE = VOCAB.size
FIELDS = model_lib.vocab_fields(VOCAB)


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


def expected_param_count(c: model_lib.ModelConfig) -> int:
    """Parameter count by formula, independent of the model code."""
    d, nh, f, vp = c.d_model, c.num_heads * c.head_dim, c.mlp_dim, c.padded_vocab_size
    tables = (
        c.max_len * c.use_positional
        + c.timing_buckets * c.use_timing
        + c.chord_size * c.use_chord
        + c.part_size * c.use_part
        + c.countdown_size * c.use_countdown
        + c.sounding_size * c.use_sounding
    )
    attention = 4 * d * nh + (3 * nh + d) * c.use_bias  # q, k, v, out (+ biases)
    mlp = 2 * d * f + (f + d) * c.use_bias
    block = attention + mlp + 2 * 2 * d  # two LayerNorms (scale, bias)
    head = 0 if c.tie_embeddings else d * vp
    # The factored table's rows, counted from the layout as `data_pipeline.vocab.token_parts` documents them.
    w, i, v, p, n_labels, x = VOCAB.layout()
    tokens = (3 + i + 1 + x + n_labels + w + 2 * i * p + i * v + 128 + v if c.token_embedding == "factored" else vp)
    return tokens * d + tables * d + c.num_layers * block + 2 * d + head


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_builds_a_model_config(name):
    module, config = load_config(name)
    for section in ("model", "data", "train", "eval", "checkpoint", "mesh"):
        assert section in config, section
    assert f"musenet-train --config=configs/{name}.py" in module.__doc__
    assert "Expected" in module.__doc__
    model_config = model_lib.ModelConfig.from_config_dict(config.model, **FIELDS)
    assert model_config.max_len == config.data.seq_len
    assert config.train.batch_size > 0 and config.train.total_steps > 0
    # max_len follows data.seq_len (a FieldReference), so a command-line override keeps them equal.
    config.data.seq_len = 128
    assert config.model.max_len == 128


@pytest.mark.parametrize("name", NAMES)
def test_config_parameter_count_and_forward_shapes(name):
    _, config = load_config(name)
    model_config = model_lib.ModelConfig.from_config_dict(config.model, **FIELDS)
    graphdef, state = model_lib.abstract_model(model_config)
    assert model_lib.count_params(state) == expected_param_count(model_config)

    seq_len = config.data.seq_len
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    features = {
        k: jax.ShapeDtypeStruct((1, seq_len), jnp.int32) for k in features_lib.FEATURE_NAMES
    }
    logits = jax.eval_shape(lambda s, t, f: nnx.merge(graphdef, s)(t, f), state, tokens, features)
    assert logits.shape == (1, seq_len, VOCAB_SIZE) and logits.dtype == jnp.float32


def test_musenet_72l_shapes_and_parameter_count():
    _, config = load_config("musenet_72l")
    c = model_lib.ModelConfig.from_config_dict(config.model, **FIELDS)
    assert (c.num_layers, c.num_heads, c.max_len, c.attention_pattern) == (72, 24, 4096, "dense")
    _, state = model_lib.abstract_model(c)
    params = nnx.to_pure_dict(state)
    block = params["stack"]["blocks"][0]
    assert block["attention"]["query"].shape == (72, 1536, 24, 64)
    assert block["attention"]["out"].shape == (72, 24, 64, 1536)
    assert block["mlp"]["wi"].shape == (72, 1536, 6144)
    assert block["mlp"]["wo"].shape == (72, 6144, 1536)
    assert params["token_embed"].shape == (21888, 1536)  # 21773 ids padded to a multiple of 128
    assert params["position_embed"].shape == (4096, 1536)
    assert "layers" not in params and "head" not in params  # all 72 scanned; tied embeddings
    total = model_lib.count_params(state)
    assert total == expected_param_count(c) == 2_081_848_320


def test_musenet_72l_shards_over_8_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices; tests/conftest.py sets jax_num_cpu_devices=8")
    _, config = load_config("musenet_72l")
    c = model_lib.ModelConfig.from_config_dict(config.model, **FIELDS)
    mesh = sharding_lib.make_mesh(1, 4, 2)
    _, state = model_lib.abstract_model(c, mesh)
    wi = nnx.to_pure_dict(state)["stack"]["blocks"][0]["mlp"]["wi"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # fp32 bytes of parameters per device: the model split 8 ways (the small replicated LayerNorm and
    # bias vectors add well under 1 %).
    shard_bytes = sum(
        a.dtype.itemsize * math.prod(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(state)
    )
    assert shard_bytes < 1.01 * 4 * model_lib.count_params(state) / 8
