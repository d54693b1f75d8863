"""The train step: sharded step == single-device step, gradient accumulation == one big batch, optimizer.

Kept apart from test_train.py (the trainer end to end) so that the two files, each a few minutes, can run on
different test workers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import model as model_lib
from musenet_jax import optim, train
from musenet_jax import sharding as sharding_lib


def _one_step(mesh, model_config, batch, train_config, microbatches=1):
    tx = optim.make_optimizer(train_config)
    graphdef, _, shardings = train.abstract_train_state(model_config, tx, mesh)
    state = train.init_train_state(model_config, tx, mesh, seed=0)
    batch_sharding = sharding_lib.data_sharding(mesh, batch_size=batch["inputs"].shape[0])
    step = train.jit_train_step(graphdef, shardings, batch_sharding, microbatches=microbatches,
                                schedule=optim.learning_rate_schedule(train_config))
    with jax.set_mesh(mesh):
        arrays = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        state, metrics = step(state, arrays, jax.random.key(1))
    return jax.device_get(nnx.to_pure_dict(state)), jax.device_get(metrics)


def _batch(vocab_size: int, b: int = 8, t: int = 31):
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, vocab_size, (b, t)), "targets": rng.integers(0, vocab_size, (b, t)),
             "loss_mask": (rng.random((b, t)) > 0.2).astype(np.float32), "timing": rng.integers(0, 5000, (b, t)),
             "chord": rng.integers(0, 70, (b, t)), "part": rng.integers(0, 128, (b, t)),
             "countdown": rng.integers(0, 128, (b, t)), "sounding": rng.integers(0, 40, (b, t))}
    return {k: (v if k == "loss_mask" else v.astype(np.int32)) for k, v in batch.items()}


def _step_config():
    """tiny's model and schedule (its factored token embedding included) at small, odd sizes: a vocabulary of
    3 velocity bins, 7 pitches, 5 waits and 1 label (655 ids in 303 part rows)."""
    config = tiny.get_config()
    vocab = Vocab(VocabConfig(labels=("bach",), velocity_bins=3, pitch_min=60, pitch_max=66, max_wait=5))
    model_config = model_lib.ModelConfig.from_config_dict(
        config.model, **model_lib.vocab_fields(vocab), d_model=24, num_heads=4, head_dim=6, mlp_dim=29,
        num_layers=3, attention_stride=5, max_len=31, vocab_multiple=1)
    return model_config, config.train


def test_sharded_step_equals_single_device_step():
    model_config, train_config = _step_config()
    batch = _batch(model_config.vocab_size)
    single, m1 = _one_step(sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), model_config, batch,
                           train_config)
    sharded, m8 = _one_step(sharding_lib.make_mesh(2, 2, 2), model_config, batch, train_config)
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), sharded, single)


def test_gradient_accumulation_equals_one_big_batch():
    model_config, train_config = _step_config()
    batch = _batch(model_config.vocab_size)
    mesh = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    whole, m1 = _one_step(mesh, model_config, batch, train_config, microbatches=1)
    accumulated, m4 = _one_step(mesh, model_config, batch, train_config, microbatches=4)
    np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), accumulated, whole)


def test_optimizer_schedule_and_weight_decay_mask():
    config = tiny.get_config().train
    schedule = optim.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(config.warmup_steps)) == pytest.approx(config.learning_rate)
    assert float(schedule(config.total_steps)) == pytest.approx(config.learning_rate * config.end_lr_fraction)
    # With zero gradients only weight decay moves parameters: matrices decay; embeddings, norms, biases don't.
    params = {"mlp": {"wi": np.ones((3, 3), np.float32), "bias": np.ones(3, np.float32)},
              "token_embed": np.ones((5, 3), np.float32),
              "final_norm": {"scale": np.ones(3, np.float32)}}
    tx = optim.make_optimizer(config)
    state = tx.init(params)
    for _ in range(config.warmup_steps + 1):
        updates, state = tx.update(jax.tree.map(np.zeros_like, params), state, params)
    assert np.all(updates["mlp"]["wi"] < 0)
    for leaf in (updates["mlp"]["bias"], updates["token_embed"], updates["final_norm"]["scale"]):
        np.testing.assert_array_equal(leaf, 0)
