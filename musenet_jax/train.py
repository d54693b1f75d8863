"""Training and evaluation: `train_and_evaluate(config, workdir, data_dir)`.

Reads top to bottom: mesh, input, model and optimizer, steps, checkpoint, evaluation, loop. The steps
are pure module-level functions, jitted with explicit shardings and donation of the train state.

The train state is the nnx state of `(model, optimizer)`: parameters and optimizer moments carry the
model's logical axes, so one rule table shards both (FSDP splits moments like the parameters).

Several processes (`musenet_jax.distributed`, started by `launch/train.py` before any JAX use) run the same
program on one mesh over all global devices: parameters and optimizer state are split across processes by the
same rules, each process feeds its rows of every global batch (`jax.make_array_from_process_local_data`),
only process 0 writes logs, TensorBoard, config.json, vocab.json and final_metrics.json, and every process
takes part in writing and reading checkpoints.

Data position. A checkpoint stores the data position as "global batches consumed" (`data_position`:
global_batches, global_batch_size), a number that does not depend on the process count: the input pipeline
defines ONE global example stream and process p of P reads rows [p B / P, (p + 1) B / P) of each global
batch of B examples. Restoring onto any process count therefore restarts every new process at the same
global batch (its own rows of it), and with the same global batch size the run continues exactly as if it
had not stopped (2 x 4 devices == 1 x 8 devices). If train.batch_size changed, the position is converted
through examples consumed (it must be a whole number of new global batches).

Baselines. The validation line reports a unigram (train-split token frequencies) and a smoothed n-gram
(`ngram_baseline`: interpolated Kneser-Ney, fitted by process 0 before the loop on a bounded part of the train
split and scored on exactly the model's eval windows; cached in the workdir's baseline.json).

Preemption and failures. SIGTERM on any process stops all of them after the same step: they save a
checkpoint of that step and return with `preempted` set (the CLI exits 0); rerunning resumes from it. In a
multi-process run a watchdog ends every process (exit code `distributed.ABORT_EXIT_CODE`, one line naming
the missing process) when another one dies or hangs for `heartbeat_timeout_s`. Orbax writes each checkpoint
under a temporary name and renames it when complete, so a process killed mid-write leaves only complete
checkpoints for `latest_step()`. Each checkpoint gets a manifest of its files' sizes and CRC-32s; a resume
verifies it and falls back to the newest older checkpoint that verifies and reads, setting the damaged one
aside (`musenet_jax.checkpoints`). A save that fails (storage full or read-only) stops every process at the
next step with one line naming the path and the OS error.

One trainer a workdir. Process 0 holds the workdir's lease (`musenet_jax.lease`) from start to exit: a second
trainer on the same workdir stops at start with one line naming the holder, and a lease left by a dead trainer is
taken over with a warning. Unfinished `*.orbax-checkpoint-tmp*` folders found at start (a dead run's) are removed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from data_pipeline import datasets
from data_pipeline import features as features_lib
from data_pipeline import input_pipeline as input_lib
from data_pipeline.vocab import Vocab
from musenet_jax import checkpoints, distributed, evaluation, lease, losses, ngram, optim, reporting, run_dir
from musenet_jax import flops as flops_lib
from musenet_jax import model as model_lib
from musenet_jax import sharding as sharding_lib


class TrainingError(ValueError):
    """A run that cannot start or go on (mismatched checkpoint, non-finite loss...); one-line message."""


# Run-loop settings and their smallest values: outside them a run divides by zero or silently does nothing.
_AT_LEAST = {"train.total_steps": 1, "train.batch_size": 1, "train.microbatches": 1, "train.log_every": 1,
             "train.warmup_steps": 0, "eval.batch_size": 1, "eval.every_steps": 1, "eval.max_batches": 0,
             "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 1, "eval.ngram_max_train_tokens": 0,
             "eval.ngram_order": 0}
MAX_NGRAM_ORDER = 10
BASELINE_FILE = "baseline.json"


def check_config(config: ml_collections.ConfigDict) -> None:
    """TrainingError naming the first run-loop setting out of range (the model checks its own config)."""
    for path, least in _AT_LEAST.items():
        section, name = path.split(".")
        value = config[section].get(name)
        if value is not None and (not isinstance(value, int) or value < least):
            raise TrainingError(f"config {path} must be an integer >= {least}, got {value!r}")
    lr = config.train.learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TrainingError(f"config train.learning_rate must be > 0, got {lr!r}")
    if config.eval.get("ngram_order", 0) > MAX_NGRAM_ORDER:
        raise TrainingError(f"config eval.ngram_order must be in 0..{MAX_NGRAM_ORDER} (0: the best of "
                            f"{ngram.DEFAULT_ORDERS[0]}..{ngram.DEFAULT_ORDERS[-1]}), got {config.eval.ngram_order}")


# -- input -----------------------------------------------------------------------------------------
def input_config(config: ml_collections.ConfigDict, process_count: int) -> input_lib.InputConfig:
    """The per-process input settings from the run config's `data` and `train` sections."""
    if config.train.batch_size % process_count:
        raise TrainingError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                            f"{process_count} processes")
    fields = {f.name for f in dataclasses.fields(input_lib.InputConfig)}
    overrides = {k: v for k, v in config.data.items() if k in fields}
    return input_lib.InputConfig(**{**overrides, "batch_size": config.train.batch_size // process_count,
                                    "seed": config.seed})


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# -- steps -----------------------------------------------------------------------------------------
def _loss_sums(params, graphdef, rest, batch, rng, deterministic: bool):
    """(summed loss in nats, scored tokens) of a batch for pure `params`."""
    model = nnx.merge(graphdef, params, rest)
    features = {k: batch[k] for k in features_lib.FEATURE_NAMES}
    # The loss reads only the hidden states: XLA drops the unused [B, T, V] logits, and a factored token
    # embedding scores the vocabulary without forming them (`MuseNet.token_nll`).
    _, hidden = model(batch["inputs"], features, deterministic=deterministic, rng=rng, return_hidden=True)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(model.token_nll(hidden, batch["targets"]) * mask), jnp.sum(mask)


def train_step(state, batch, rng, *, graphdef, microbatches: int, schedule):
    """One optimizer update on a global batch.

    Args:
      state: nnx state of (model, optimizer).
      batch: dict of [B, T] arrays (`input_pipeline.BATCH_KEYS`).
      rng: PRNG key for dropout / mixup of this step.
      graphdef: static graph of (model, optimizer).
      microbatches: gradient accumulation: the batch is split into this many slices whose gradients are
        summed before the update (the loss is normalised by the scored tokens of the whole batch).
      schedule: learning-rate schedule, for reporting.
    Returns:
      (new state, metrics dict of float32 scalars).
    """
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_sums(p, mb, key):
        return _loss_sums(p, model_def, rest, mb, key, False)

    # Differentiate the summed loss and divide once by the scored tokens of the whole batch, so any
    # split into micro-batches gives the same update.
    value_and_grad = jax.value_and_grad(loss_sums, has_aux=True)
    keys = jax.random.split(rng, microbatches)
    if microbatches == 1:
        (loss_sum, count), grads = value_and_grad(params, batch, keys[0])
    else:
        split = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

        def micro(carry, xs):
            acc, loss_sum, count = carry
            (mb_loss, mb_count), g = value_and_grad(params, *xs)
            return (jax.tree.map(jnp.add, acc, g), loss_sum + mb_loss, count + mb_count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), (split, keys))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    step = optimizer.step[...]
    optimizer.update(model, grads)
    loss = loss_sum / denom
    # The updated parameters' norm: finite loss and gradients can still overflow them, and a checkpoint of
    # such a state must never be written.
    param_norm = optax.tree.norm(nnx.state(model, nnx.Param))
    metrics = {"train/loss": loss, "train/bits_per_token": losses.bits(loss), "train/grad_norm": grad_norm,
               "train/param_norm": param_norm, "train/learning_rate": schedule(step), "train/scored_tokens": count}
    return nnx.state((model, optimizer)), metrics


def eval_step(state, batch, *, graphdef):
    """(summed loss in nats, scored tokens) of one eval batch, deterministic."""
    model, _ = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    return _loss_sums(params, model_def, rest, batch, None, True)


def _create(model_config: model_lib.ModelConfig, tx: optax.GradientTransformation, key):
    # Variables carry logical axis names; with eager sharding on, creating them under a mesh context
    # would try to use those names as mesh axes. Placement comes from the explicit shardings instead.
    with nnx.use_eager_sharding(False):
        model = model_lib.MuseNet(model_config, rngs=nnx.Rngs(params=key))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(model_config: model_lib.ModelConfig, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh):
    """(graphdef, abstract state with target shardings, shardings) of `(model, optimizer)`, nothing allocated.

    Call outside any `jax.set_mesh` context: under one, `nnx.eval_shape` would read the variables' logical
    axis names as mesh axes.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        raise RuntimeError("abstract_train_state must be called outside a mesh context")

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _create(model_config, tx, jax.random.key(0))))
    shardings = sharding_lib.state_shardings(abstract, mesh, model_config.axis_rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract, shardings


def init_train_state(model_config, tx, mesh, seed: int):
    """A fresh `(model, optimizer)` state created directly in its shards (jitted init with out_shardings)."""
    _, _, shardings = abstract_train_state(model_config, tx, mesh)

    with jax.set_mesh(mesh):
        return jax.jit(lambda key: nnx.state(_create(model_config, tx, key)),
                       out_shardings=shardings)(jax.random.key(seed))


def jit_train_step(graphdef, state_shardings, batch_sharding, *, microbatches: int, schedule):
    """`train_step` jitted with explicit shardings; the old state is donated."""
    repl = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    batch_shardings = {k: batch_sharding for k in input_lib.BATCH_KEYS}
    return jax.jit(functools.partial(train_step, graphdef=graphdef, microbatches=microbatches, schedule=schedule),
                   in_shardings=(state_shardings, batch_shardings, repl), out_shardings=(state_shardings, repl),
                   donate_argnums=0)


# -- checkpoint ------------------------------------------------------------------------------------
checkpoint_manager = checkpoints.manager  # orbax's CheckpointManager of a workdir, as the trainer sets it up


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def save_checkpoint(saves: checkpoints.Checkpoints, step: int, state, config, vocab: Vocab) -> None:
    """Saves the train state and the data position after `step` steps (one global batch per step)."""
    position = {"global_batches": step, "global_batch_size": config.train.batch_size}
    saves.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        data_position=ocp.args.JsonSave(position),
        config=ocp.args.JsonSave(_config_json(config)),
        vocab=ocp.args.JsonSave(json.loads(vocab.to_json()))))


def restore_checkpoint(manager, step: int, abstract_state, config, vocab: Vocab):
    """(state resharded onto the shardings of `abstract_state`, global batches of the data stream consumed,
    the train.total_steps the checkpoint's run had).

    The saved position is in global batches, independent of how many processes wrote it; every process of
    this run restarts its input at that global batch (module docstring, "Data position").
    Raises TrainingError for a checkpoint of another model or vocabulary, `checkpoints.DamagedCheckpoint` for
    one that cannot be read.
    """
    try:
        return _restore_checkpoint(manager, step, abstract_state, config, vocab)
    except TrainingError:
        raise
    except Exception as e:  # damaged or half-copied: orbax raises anything up to a bare Exception
        raise checkpoints.DamagedCheckpoint(f"unreadable: {checkpoints.describe_error(e)}") from None


def _restore_checkpoint(manager, step: int, abstract_state, config, vocab: Vocab):
    has_position = (manager.directory / str(step) / "data_position").exists()
    saved = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), vocab=ocp.args.JsonRestore(),
        **({"data_position": ocp.args.JsonRestore()} if has_position else {})))
    if saved.vocab != json.loads(vocab.to_json()):
        try:
            change = Vocab.from_json(json.dumps(saved.vocab)).config.differences(vocab.config)
        except (ValueError, TypeError):
            change = f"size {saved.vocab.get('size')} vs {vocab.size}"
        raise TrainingError(f"checkpoint at step {step} was trained on a different vocabulary (checkpoint vs "
                            f"this data: {change})")
    saved_model, model = saved.config.get("model") or {}, _config_json(config).get("model") or {}
    saved_arch, arch = model_lib.architecture(saved_model), model_lib.architecture(model)
    if saved_arch != arch:
        change = "; ".join(f"model.{k}: {saved_arch.get(k)!r} vs {arch.get(k)!r}" for k in sorted({*saved_arch, *arch})
                           if saved_arch.get(k) != arch.get(k))
        raise TrainingError(f"checkpoint at step {step} has a different model config (checkpoint vs this run: "
                            f"{change}); use a new --workdir or the checkpoint's config")
    if has_position:
        position = saved.data_position
    else:  # written before data positions were stored: one global batch per step, same batch size
        position = {"global_batches": step, "global_batch_size": config.train.batch_size}
    examples = position["global_batches"] * position["global_batch_size"]
    if examples % config.train.batch_size:
        raise TrainingError(f"checkpoint at step {step} consumed {examples} examples, not a whole number of "
                            f"global batches of train.batch_size={config.train.batch_size}")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          nnx.to_pure_dict(abstract_state))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored.state)
    return state, examples // config.train.batch_size, (saved.config.get("train") or {}).get("total_steps")


def check_batch_splits(mesh: jax.sharding.Mesh, global_batch_size: int) -> str | None:
    """A warning when the batch does not divide over the mesh axes the "batch" rule splits it over: the
    sharding rules then replicate it, and those devices all compute the same rows. With several processes
    it is a TrainingError (a process could not read rows of its own)."""
    spec = sharding_lib.logical_to_spec(("batch",), mesh_shape=dict(mesh.shape))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    splits = math.prod(mesh.shape[a] for a in axes)
    if global_batch_size % splits == 0:
        return None
    text = (f"train.batch_size={global_batch_size} does not divide over the {splits} batch shards of mesh "
            f"{dict(mesh.shape)} (axes {', '.join(axes)}); use a multiple of {splits}")
    if jax.process_count() > 1:
        raise TrainingError(text)
    return f"warning: {text}. Until then the batch is replicated: those devices all compute the same rows"


def check_process_rows(sharding: jax.sharding.NamedSharding, global_batch_size: int) -> None:
    """Checks that this process's devices hold rows [p B / P, (p + 1) B / P) of a global batch.

    The input pipeline gives process p exactly those rows, and `make_array_from_process_local_data` places
    them on this process's devices in order, so the mesh must lay processes out contiguously along the batch.
    """
    p, n = jax.process_index(), jax.process_count()
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch_size, 1)).items():
        if device.process_index == p:
            rows.update(range(*index[0].indices(global_batch_size)))
    per = global_batch_size // n
    if rows != set(range(p * per, (p + 1) * per)):
        raise TrainingError(f"the mesh gives process {p} batch rows {sorted(rows)[:1]}..{sorted(rows)[-1:]}, "
                            f"not [{p * per}, {(p + 1) * per}); reorder the mesh axes (data, fsdp, tensor)")


def state_bytes(state) -> tuple[int, int]:
    """(bytes of the whole train state, bytes of the distinct shards on this process's devices).

    With FSDP or tensor parallelism across processes the second is a fraction of the first; pure data
    parallelism across processes keeps a whole copy on each.
    """
    total = local = 0
    for x in jax.tree.leaves(state):
        total += x.size * x.dtype.itemsize
        distinct = {tuple((s.start, s.stop) for s in shard.index): shard.data.nbytes for shard in x.addressable_shards}
        local += sum(distinct.values())
    return total, local


# -- n-gram baseline -------------------------------------------------------------------------------
def ngram_baseline(config: ml_collections.ConfigDict, run_path, data_dir: str, vocab: Vocab, train_source,
                   eval_source, eval_counts, eval_prefixes) -> tuple[dict | None, str]:
    """(the n-gram baseline on the eval windows, a line saying what it is), or (None, why there is none).

    An interpolated Kneser-Ney n-gram (`ngram`) fitted on at most `eval.ngram_max_train_tokens` tokens of the
    train split (records spread evenly over it; 0 turns the baseline off), scored on exactly the windows
    the model is evaluated on: `make_eval_batches` laid out for the whole global eval batch, as one process
    would. Its order is `eval.ngram_order`, or (0) the one of 1..5 with the lowest bits/token there. Cached
    in `baseline.json` with what it was computed from, reused while that matches (a resume pays nothing).
    Call on process 0 only.

    Returns:
      {"order", "bits_per_token", "bits_per_token_by_order": {"1": ..}, "train_tokens", "train_records",
       "eval_tokens", "seconds", "computed_from"}: bits/token in bits (log2).
    """
    max_tokens = int(config.eval.get("ngram_max_train_tokens", 2_000_000))
    requested = int(config.eval.get("ngram_order", 0))
    if not max_tokens:
        return None, "n-gram baseline off (eval.ngram_max_train_tokens=0)"
    computed_from = {"dataset_dir": datasets.dataset_dir(data_dir, config.data.name), "dataset": config.data.name,
                     "train_split": config.data.train_split, "eval_split": config.data.eval_split,
                     "vocab_size": vocab.size, "seq_len": config.data.seq_len,
                     "eval_batch_size": config.eval.batch_size, "eval_max_batches": config.eval.max_batches,
                     "ngram_max_train_tokens": max_tokens, "ngram_order": requested}
    path = run_path / BASELINE_FILE
    try:
        stored = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        stored = None  # torn or unreadable: computed again
    if isinstance(stored, dict) and stored.get("computed_from") == computed_from:
        return stored, f"n-gram baseline: {_describe(stored)} (from {BASELINE_FILE})"

    t0 = time.perf_counter()
    train = ngram.read_sequences(train_source, vocab, indices=ngram.spread_order(len(train_source)),
                                 max_tokens=max_tokens)
    if not train.tokens:
        return None, f"no n-gram baseline: no usable record in split {config.data.train_split!r}"
    orders = ngram.DEFAULT_ORDERS if requested == 0 else tuple(sorted({1, requested}))
    model = ngram.NgramModel.fit(train.tokens, vocab.size, max(orders))
    batches = input_lib.make_eval_batches(
        eval_source, vocab, config.data.seq_len, config.eval.batch_size,
        max_windows=config.eval.max_batches * config.eval.batch_size if config.eval.max_batches else None,
        token_counts=eval_counts, prefix_lengths=eval_prefixes, process_index=0, process_count=1)
    bits, tokens = np.zeros(len(orders)), 0
    for batch in batches:
        scored = batch["loss_mask"] > 0
        bits -= np.log2(model.probs(batch["inputs"], batch["targets"], where=scored, orders=orders)).sum(axis=1)
        tokens += int(scored.sum())
    if not tokens:
        return None, f"no n-gram baseline: split {config.data.eval_split!r} has no tokens to score"
    by_order = {n: float(b / tokens) for n, b in zip(orders, bits)}
    order = requested or min(orders, key=lambda n: (by_order[n], n))
    result = {"order": order, "bits_per_token": by_order[order],
              "bits_per_token_by_order": {str(n): v for n, v in by_order.items()},
              "train_tokens": model.train_tokens, "train_records": len(train.tokens), "eval_tokens": tokens,
              "seconds": time.perf_counter() - t0, "computed_from": computed_from}
    run_dir.write_json(path, result)
    return result, f"n-gram baseline: {_describe(result)}"


def _describe(baseline: dict) -> str:
    by_order = ", ".join(f"{n}: {v:.3f}" for n, v in baseline["bits_per_token_by_order"].items())
    split = baseline["computed_from"]["eval_split"]
    return (f"{baseline['order']}-gram {baseline['bits_per_token']:.3f} bits/token on the {baseline['eval_tokens']:,} "
            f"{split} tokens the model is evaluated on (by order {by_order}), trained on {baseline['train_tokens']:,} "
            f"tokens of {baseline['train_records']:,} records in {baseline['seconds']:.1f} s")


# -- the run ---------------------------------------------------------------------------------------
def _stored_final_metrics(run_path, step: int) -> dict[str, Any]:
    """The `final_metrics.json` of a run that ended at `step`, or NaN validation figures if there is none."""
    try:
        stored = json.loads((run_path / "final_metrics.json").read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict) or stored.get("step") != step:
        stored = {}
    return {"eval/bits_per_token": math.nan, "eval/unigram_bits_per_token": math.nan,
            "eval/ngram_bits_per_token": math.nan, "eval/ngram_order": math.nan, **stored}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str, *,
                       heartbeat_timeout_s: float = 60.0) -> dict[str, Any]:
    """Trains `config` on the dataset in `data_dir`, checkpointing and evaluating in `workdir`.

    Resumes from the newest checkpoint in `workdir` if there is one. In a multi-process job every process
    calls this with the same arguments (module docstring). Called from the main thread, SIGTERM stops the
    run after the current step with a checkpoint of it, on every process.

    Args:
      heartbeat_timeout_s: multi-process runs only: seconds after which a dead or hung process makes the
        others exit (`distributed.Watchdog`).
    Returns:
      The final metrics (last train metrics, last validation bits/token, the unigram baseline and the n-gram
      baseline's bits/token and order, NaN where there is none, e.g. on processes other than 0), `step`
      (the last step trained) and `preempted` (True when SIGTERM stopped the run before total_steps).
    """
    preemption = distributed.PreemptionFlag() if threading.current_thread() is threading.main_thread() else None
    watchdog = distributed.Watchdog(heartbeat_timeout_s).start()
    run_lease = lease.WorkdirLease(workdir)
    try:
        return _train_and_evaluate(config, workdir, data_dir, preemption, watchdog, run_lease)
    finally:
        run_lease.release()
        watchdog.stop()
        if preemption is not None:
            preemption.restore()


def _train_and_evaluate(config, workdir: str, data_dir: str, preemption: distributed.PreemptionFlag | None,
                        watchdog: distributed.Watchdog, run_lease: lease.WorkdirLease) -> dict[str, Any]:
    check_config(config)
    run_path = run_dir.resolve(workdir)
    run_path.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    # One trainer a workdir: process 0 takes the lease or stops naming its holder, then removes what a dead run
    # half-wrote; every process waits for that (module docstring, "One trainer a workdir").
    run_lease.acquire(on_taken=functools.partial(lease.remove_unfinished_checkpoints, run_path / "checkpoints"))

    # Mesh.
    mesh = sharding_lib.mesh_from_config(config.mesh)

    # Input.
    vocab = datasets.load_vocab(data_dir, config.data.name)
    train_source = datasets.data_source(data_dir, config.data.name, config.data.train_split)
    eval_source = datasets.data_source(data_dir, config.data.name, config.data.eval_split)
    in_config = input_config(config, jax.process_count())
    train_tokens, counted_s = None, None
    if in_config.window_sampling == "tokens":
        # Stored by the dataset build; a dataset built before that is counted here (~0.4 ms a record).
        train_tokens = datasets.token_counts(data_dir, config.data.name, config.data.train_split)
        if train_tokens is None:
            counted_s = time.perf_counter()
            train_tokens = input_lib.count_tokens(train_source)
            counted_s = time.perf_counter() - counted_s
    train_windows = input_lib.record_windows(len(train_source), vocab, in_config, train_tokens)
    batch_sharding = sharding_lib.data_sharding(mesh, batch_size=config.train.batch_size)
    split_warning = check_batch_splits(mesh, config.train.batch_size)
    check_process_rows(batch_sharding, config.train.batch_size)

    # Model and optimizer.
    model_config = model_lib.ModelConfig.from_config_dict(config.model, **model_lib.vocab_fields(vocab))
    if config.data.seq_len > model_config.max_len:
        raise TrainingError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={model_config.max_len}")
    schedule = optim.learning_rate_schedule(config.train)
    tx = optim.make_optimizer(config.train)

    graphdef, abstract_state, state_shardings = abstract_train_state(model_config, tx, mesh)

    # Steps.
    p_train_step = jit_train_step(graphdef, state_shardings, batch_sharding, microbatches=config.train.microbatches,
                                  schedule=schedule)
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_shardings = {k: batch_sharding for k in input_lib.BATCH_KEYS}
    p_eval_step = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                          in_shardings=(state_shardings, batch_shardings), out_shardings=repl)

    # Checkpoint: resume from the newest one that verifies and reads (an older one when it is damaged:
    # `checkpoints` module docstring), else initialise.
    saves = checkpoints.Checkpoints(workdir, config)
    # latest_step() only lists finished checkpoints: orbax writes each under a temporary name and renames it.
    start_step = saves.latest_step() or 0
    if start_step >= config.train.total_steps:
        # A finished run started again (a rerun, a restarted job): it leaves the workdir as it was (no
        # Reporter yet: it would start a TensorBoard file).
        saves.close()
        if is_main:
            print(f"nothing to train: {workdir} has a checkpoint at step {start_step} and train.total_steps is "
                  f"{config.train.total_steps}; raise it to train on", file=sys.stderr, flush=True)
        return {**_stored_final_metrics(run_path, start_step), "step": start_step, "preempted": False,
                "trained": False}
    start_batch = 0
    if start_step:  # before the Reporter: it drops what was logged after the step resumed from
        try:
            with jax.set_mesh(mesh):
                start_step, (state, start_batch, saved_total) = saves.restore_newest(functools.partial(
                    restore_checkpoint, saves.manager, abstract_state=abstract_state, config=config, vocab=vocab), mesh)
        except checkpoints.CheckpointError as e:
            raise TrainingError(str(e)) from None
    reporter = reporting.Reporter(workdir, config.train.total_steps, enabled=is_main, start_step=start_step)
    if split_warning:
        reporter.message(split_warning)
    if start_step:
        reporter.message(f"resumed from {workdir} at step {start_step} (data position: global batch "
                         f"{start_batch}, {jax.process_count()} processes)")
        total = config.train.total_steps
        if isinstance(saved_total, int) and saved_total != total:  # the cosine is stretched: say so
            before = optim.learning_rate_schedule(ml_collections.ConfigDict({**config.train,
                                                                              "total_steps": saved_total}))
            reporter.message(f"train.total_steps is {total}, the checkpoint's run had {saved_total}: the learning "
                             f"rate now decays over {total} steps (at step {start_step}: "
                             f"{float(schedule(start_step)):.3g}, was {float(before(start_step)):.3g})")
    else:
        state = init_train_state(model_config, tx, mesh, config.seed)
    # Every process starts at the same global batch and reads its own rows of it, whatever process count
    # wrote the checkpoint (module docstring, "Data position").
    train_iter = input_lib.make_train_iterator(train_source, vocab, in_config, token_counts=train_tokens,
                                               start_batch=start_batch)
    if is_main:
        run_dir.write_text(run_path / "vocab.json", vocab.to_json())
        run_dir.write_json(run_path / "config.json", _config_json(config))

    # Evaluation.
    # Built once: max_batches global batches' worth of windows, spread over the whole split, laid out from
    # the stats stored with the dataset (a dataset built before they were stored: from every eval record).
    eval_counts = datasets.token_counts(data_dir, config.data.name, config.data.eval_split)
    eval_prefixes = datasets.prefix_lengths(data_dir, config.data.name, config.data.eval_split)
    if eval_counts is None or eval_prefixes is None:
        eval_counts = eval_prefixes = None
    eval_batches = input_lib.make_eval_batches(
        eval_source, vocab, config.data.seq_len, config.eval.batch_size // jax.process_count(),
        max_windows=config.eval.max_batches * config.eval.batch_size if config.eval.max_batches else None,
        token_counts=eval_counts, prefix_lengths=eval_prefixes)

    eval_compiled = False

    def evaluate() -> float:
        nonlocal eval_compiled
        total, count = 0.0, 0.0
        with jax.set_mesh(mesh):
            for batch in eval_batches:
                batch = global_batch(batch, eval_sharding)
                if not eval_compiled:  # every batch has the same shapes: one program
                    distributed.compile_together("eval step", p_eval_step, state, batch)
                    eval_compiled = True
                loss_sum, n = p_eval_step(state, batch)
                total, count = total + float(loss_sum), count + float(n)
        return losses.bits(total / max(count, 1.0))

    eval_sharding = sharding_lib.data_sharding(mesh, batch_size=config.eval.batch_size)
    histograms = [datasets.token_histogram(data_dir, config.data.name, split)
                  for split in (config.data.train_split, config.data.eval_split)]
    if any(h is None for h in histograms):  # a slice of a split, or a dataset built before they were stored
        unigram = evaluation.unigram_bits_per_token(train_source, eval_source, vocab)
    else:
        unigram = evaluation.unigram_bits_from_histograms(*histograms)
    baseline = None
    if is_main:  # the others have nothing to write or report
        baseline, line = ngram_baseline(config, run_path, data_dir, vocab, train_source, eval_source, eval_counts,
                                        eval_prefixes)
        reporter.message(line)
    ngram_metrics = {"eval/ngram_bits_per_token": baseline["bits_per_token"] if baseline else math.nan,
                     "eval/ngram_order": baseline["order"] if baseline else math.nan}
    baseline_text = f", {baseline['order']}-gram {baseline['bits_per_token']:.3f}" if baseline else ""
    total_bytes, local_bytes = state_bytes(state)
    reporter.message(f"model: {model_lib.count_params(nnx.to_pure_dict(abstract_state)[0]):,} parameters; "
                     f"mesh {dict(mesh.shape)}; unigram baseline {unigram:.3f} bits/token")
    if counted_s is not None:
        reporter.message(f"the dataset has no {datasets.TOKEN_COUNTS_FILE} (built by an older version): read "
                         f"{len(train_source):,} records to count their tokens in {counted_s:.1f} s")
    reporter.message(f"training data: {len(train_source):,} pieces, {train_windows.sum():,} windows of "
                     f"{config.data.seq_len} tokens an epoch ({in_config.window_sampling} sampling), "
                     f"{train_windows.sum() / config.train.batch_size:,.1f} steps an epoch")
    reporter.message(f"train state: {total_bytes / 2**20:.2f} MiB, of which process {jax.process_index()} of "
                     f"{jax.process_count()} holds {local_bytes / 2**20:.2f} MiB")

    # Loop.
    flops_per_token = flops_lib.train_flops_per_token(model_config, config.data.seq_len)
    peak_per_device = config.train.get("peak_flops_per_device", 0.0)
    if not peak_per_device:
        peak_per_device, peak_source = flops_lib.peak_flops_per_device()
        reporter.message(f"MFU relative to {peak_per_device / 1e12:.3g} TFLOP/s per device ({peak_source})")
    peak = peak_per_device * jax.device_count()
    tokens_per_step = config.train.batch_size * config.data.seq_len
    rng = jax.random.key(config.seed + 1)
    metrics: dict[str, float] = {}
    last_eval = math.nan
    t_last, step_last = time.perf_counter(), start_step
    done, preempted = start_step, False
    try:
        for step in range(start_step, config.train.total_steps):
            if run_lease.lost:
                raise TrainingError(run_lease.lost)
            done = step + 1
            batch = global_batch(next(train_iter), batch_sharding)
            step_rng = jax.random.fold_in(rng, step)
            with jax.set_mesh(mesh):
                if step == start_step:  # processes compile at different speeds; they start the step together
                    distributed.compile_together("train step", p_train_step, state, batch, step_rng)
                state, step_metrics = p_train_step(state, batch, step_rng)
            host = {k: float(v) for k, v in step_metrics.items()}
            # Every process learns about a SIGTERM, or a failed checkpoint save, anywhere after the same step
            # (distributed module docstring); a second vote only when one of them happened says which.
            save_failure = saves.failure()
            preempted = distributed.any_process((preemption is not None and preemption.requested)
                                                or save_failure is not None, mesh)
            if preempted and distributed.any_process(save_failure is not None, mesh):
                reporter.close()
                raise TrainingError(saves.stop_after_failure(done))
            watchdog.progress(done)
            if step == start_step:
                watchdog.arm()  # from now on a step must finish within the timeout; the first one compiled
            if not all(math.isfinite(host[k]) for k in ("train/loss", "train/grad_norm", "train/param_norm")):
                reporter.close()
                raise TrainingError(f"non-finite loss, gradient or parameters at step {done} "
                                    f"(loss={host['train/loss']}, grad_norm={host['train/grad_norm']}, "
                                    f"param_norm={host['train/param_norm']}); stopped, last good checkpoint: "
                                    f"{saves.last_good(wait=True)}")
            if step == start_step:
                reporter.start(done)  # ETA timing starts after the first (compiling) step
                t_last, step_last = time.perf_counter(), done
            if done % config.train.log_every == 0 or done == config.train.total_steps or preempted:
                elapsed = time.perf_counter() - t_last
                if done > step_last and elapsed > 0:
                    tps = tokens_per_step * (done - step_last) / elapsed
                    host["perf/tokens_per_second"] = tps
                    if peak:
                        host["perf/mfu"] = tps * flops_per_token / peak
                t_last, step_last = time.perf_counter(), done
                metrics = host
                reporter.scalars(done, host)
                reporter.progress(done, host)
            watchdog.disarm()  # evaluation may compile, checkpoints wait for storage: not bounded by the timeout
            if (done % config.eval.every_steps == 0 or done == config.train.total_steps) and not preempted:
                last_eval = evaluate()
                reporter.scalars(done, {"eval/bits_per_token": last_eval, "eval/unigram_bits_per_token": unigram,
                                        **(ngram_metrics if baseline else {})})
                reporter.message(f"step {done}: validation {last_eval:.3f} bits/token (unigram {unigram:.3f}"
                                 f"{baseline_text})")
            if done % config.checkpoint.every_steps == 0 or done == config.train.total_steps or preempted:
                save_checkpoint(saves, done, state, config, vocab)
            watchdog.arm()
            if preempted:
                cause = (preemption and preemption.signal_name) or "SIGTERM on another process"
                reporter.message(f"preempted ({cause}) after step {done}: checkpoint saved, stopping; rerun the same "
                                 "command to resume")
                break
        watchdog.disarm()
        saves.finish()
        saves.close()
    except TrainingError:
        raise
    except checkpoints.CheckpointError:  # a save that failed: its line says which and why
        # ... unless a peer died during the save (gloo's "connection closed" looks like a failed write): the
        # watchdog names it within its timeout.
        if jax.process_count() > 1:
            watchdog.wait_for_verdict()
        reporter.close()
        raise TrainingError(saves.stop_after_failure(done)) from None
    except Exception as e:
        # A dead peer breaks collectives and device-to-host copies at once, with errors that do not say who
        # is gone: in a multi-process run, give the watchdog its timeout to name the missing process.
        watchdog.wait_for_verdict()
        if isinstance(e, jax.errors.JaxRuntimeError):
            raise TrainingError(f"step {done} failed: {distributed.first_line(e)}") from e
        raise
    reporter.close()
    result = {**metrics, "eval/bits_per_token": last_eval, "eval/unigram_bits_per_token": unigram, **ngram_metrics,
              "step": done, "preempted": preempted, "trained": True}
    if is_main and not preempted:
        run_dir.write_json(run_path / "final_metrics.json", result)
    return result
