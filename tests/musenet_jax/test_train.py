"""The trainer: end to end on small real data, exact resume, sharded step == single-device step, NaN stop."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import tiny
from data_pipeline import datasets, input_pipeline
from musenet_jax import model as model_lib
from musenet_jax import optim, train
from musenet_jax import sharding as sharding_lib
from tests.conftest import small_config


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_train_resume_matches_uninterrupted_run(data_dir, tmp_path, capsys):
    full = tmp_path / "full"
    result = train.train_and_evaluate(small_config(6), str(full), data_dir)
    # Windows drawn per piece in proportion to its length, from the counts stored with the dataset.
    counts = datasets.token_counts(data_dir, "directory", "train")
    windows = input_pipeline.record_windows(len(counts), datasets.load_vocab(data_dir, "directory"),
                                            input_pipeline.InputConfig(seq_len=64), counts)
    assert windows.sum() > len(counts)
    assert (f"training data: {len(counts)} pieces, {windows.sum()} windows of 64 tokens an epoch (tokens sampling)"
            in capsys.readouterr().err)
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert np.isfinite(result["eval/bits_per_token"]) and result["eval/unigram_bits_per_token"] > 0
    assert (full / "vocab.json").exists() and (full / "config.json").exists()
    assert sorted(p.name for p in (full / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]

    # Interrupted after step 3, then resumed from its checkpoint: the same next losses, data order included.
    part = tmp_path / "part"
    train.train_and_evaluate(small_config(3), str(part), data_dir)
    train.train_and_evaluate(small_config(6), str(part), data_dir)
    resumed = _losses(part)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_checkpoint_from_another_model_is_refused(data_dir, tmp_path):
    train.train_and_evaluate(small_config(3), str(tmp_path), data_dir)
    other = small_config(6)
    other.model.d_model = 48
    with pytest.raises(train.TrainingError, match="different model config"):
        train.train_and_evaluate(other, str(tmp_path), data_dir)
    # How the model runs may change (model.EXECUTION_FIELDS): e.g. trained with 'xla', resumed with another
    # attention implementation and remat policy. Configs of checkpoints written before a field existed
    # (here: `pallas_lowering`) compare the same way.
    same = small_config(3)  # Nothing left to train: restoring is the check.
    same.model.update(attention_impl="reference", remat_policy="dots")
    del same.model["pallas_lowering"]
    train.train_and_evaluate(same, str(tmp_path), data_dir)
    assert sorted(_losses(tmp_path)) == [1, 2, 3]


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_kept_checkpoint(data_dir, tmp_path):
    config = small_config(12)
    config.train.update(learning_rate=1e12, grad_clip=0.0, warmup_steps=1)
    config.checkpoint.update(every_steps=1)
    with pytest.raises(train.TrainingError, match="non-finite") as err:
        train.train_and_evaluate(config, str(tmp_path), data_dir)
    assert "last good checkpoint: step" in str(err.value)
    kept = sorted((p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert kept and f"step {kept[-1].name}" in str(err.value)
    # What was kept is really good: every parameter and optimizer moment is finite.
    state = ocp.StandardCheckpointer().restore(kept[-1] / "state")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


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
             "countdown": rng.integers(0, 128, (b, t))}
    return {k: (v if k == "loss_mask" else v.astype(np.int32)) for k, v in batch.items()}


def _step_config():
    config = tiny.get_config()
    model_config = model_lib.ModelConfig.from_config_dict(
        config.model, vocab_size=53, d_model=24, num_heads=4, head_dim=6, mlp_dim=29, num_layers=3,
        attention_stride=5, max_len=31, vocab_multiple=1)
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
