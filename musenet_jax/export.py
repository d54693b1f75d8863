"""Inference exports: a checkpoint's model parameters as `model.safetensors` + `config.json` + `vocab.json`.

    out = export_checkpoint("runs/tiny", "exports/tiny", dtype="bfloat16")   # newest step
    model, vocab = load_export("exports/tiny")
    model, vocab, step = load_checkpoint("runs/tiny")   # the same parameters, straight from the checkpoint

An export holds the parameters only (no optimizer moments, no data-iterator state), gathered to host
numpy from whatever mesh the run was sharded over, so it loads on one device anywhere. Tensor keys are
the parameter paths joined with '/', e.g. `token_embed`, `stack/blocks/0/attention/query` (scanned
layers keep their leading [L_stacked] axis; see `musenet_jax.model`). Loading reads the safetensors file
with `safetensors.numpy` and two JSON files: nothing is ever unpickled.

Reading a checkpoint (export, `load_checkpoint`) first checks its files against its manifest
(`musenet_jax.checkpoints`): a damaged checkpoint is refused in one line that lists the other steps to choose
from; one saved before manifests were written is read unverified, with a note on stderr.

config.json: {"format": "musenet-export-v1", "model": ModelConfig.to_dict(), "step": N, "dtype": name}.
The model config's `param_dtype` is the export dtype, so the loaded model holds its parameters in the
dtype they were stored in (bfloat16 halves the file; compute dtype is unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import load_file, save_file

from data_pipeline import outputs
from data_pipeline.vocab import Vocab
from musenet_jax import checkpoints, run_dir
from musenet_jax import model as model_lib

FORMAT = "musenet-export-v1"
DTYPES = ("float32", "bfloat16")
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"


class ExportError(ValueError):
    """An export that cannot be written or loaded (missing checkpoint, mismatch...); one-line message."""


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _expected_params(config: model_lib.ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{safetensors key: ShapeDtypeStruct} of every parameter of a model of `config` (nothing allocated)."""
    _, state = model_lib.abstract_model(config)
    flat = nnx.to_flat_state(state)
    return {"/".join(map(str, path)): jax.ShapeDtypeStruct(v.shape, v.dtype) for path, v in flat}


def _check_params(params: dict[str, np.ndarray] | dict[str, jax.ShapeDtypeStruct], config: model_lib.ModelConfig,
                  where: str, check_dtype: bool) -> None:
    """Raises ExportError unless `params` has exactly the keys and shapes (and dtypes) of `config`'s model."""
    expected = _expected_params(config)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ExportError(f"{where} does not match its model config (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, want in expected.items():
        got = params[key]
        if tuple(got.shape) != tuple(want.shape) or (check_dtype and np.dtype(got.dtype) != np.dtype(want.dtype)):
            raise ExportError(f"{where}: parameter {key} is {np.dtype(got.dtype).name}{list(got.shape)}, the model "
                              f"config needs {np.dtype(want.dtype).name}{list(want.shape)}")


# -- export ----------------------------------------------------------------------------------------
def _manager(workdir: str) -> ocp.CheckpointManager:
    root = run_dir.resolve(workdir)  # local or object storage (gs://...)
    directory = root / "checkpoints"
    if not root.is_dir():
        raise ExportError(f"{workdir}: no such workdir")
    if not directory.is_dir():
        raise ExportError(f"{workdir}: no checkpoints (no {directory} directory)")
    checkpoints.quiet_failures()  # a damaged checkpoint: one line, not orbax's tracebacks
    # Typed handlers so item metadata can be read and the `state` item partially restored. `data` (the
    # grain iterator) and `data_position` (the trainer's stream position) are registered only so orbax does
    # not warn about unknown items; they are never read.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "vocab": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "data_position": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(create=False))


def _checkpoint_step(manager: ocp.CheckpointManager, workdir: str, step: int | None, none_saved: str) -> int:
    """`step` if the manager holds it, else its newest step when `step` is None; ExportError otherwise."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise ExportError(none_saved)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"{workdir}: no checkpoint at step {step} (available: {', '.join(map(str, steps))})")
    return step


def _restore_params(manager: ocp.CheckpointManager, step: int, config: model_lib.ModelConfig, where: str):
    """{key: host numpy array} of the model part of the saved `(model, optimizer)` state; moments are not read."""
    meta = manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    if not isinstance(tree, dict) or "0" not in tree:
        raise ExportError(f"{where}: the checkpoint's state is not a (model, optimizer) state")
    model_meta = tree["0"]
    flat = {_key(p): m for p, m in jax.tree_util.tree_flatten_with_path(model_meta)[0]}
    # Compare with the model config's structure first: orbax would otherwise happily restore whatever is there.
    _check_params(flat, config, where, check_dtype=False)
    item = {"0": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), model_meta)}
    # restore_type=np.ndarray: every shard is read and assembled on the host, whatever mesh wrote it.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)))
    return {_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(restored.state["0"])[0]}


def _read_checkpoint(manager: ocp.CheckpointManager, step: int, where: str):
    """(vocab, model config, {key: host array} parameters) of checkpoint `step`, checked against its manifest;
    ExportError naming `where` and the other steps for one that fails the check or cannot be read."""
    problem, note = checkpoints.check_checkpoint(manager.directory / str(step))
    if note:
        print(f"{where}: the checkpoint has {note}: read without verification", file=sys.stderr, flush=True)
    try:
        if problem is not None:
            raise checkpoints.DamagedCheckpoint(problem)
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                              vocab=ocp.args.JsonRestore()))
        vocab = Vocab.from_json(json.dumps(saved.vocab))
        config = model_lib.ModelConfig.from_config_dict(saved.config["model"], **model_lib.vocab_fields(vocab))
        return vocab, config, _restore_params(manager, step, config, where)
    except ExportError:
        raise
    except Exception as e:  # damaged or half-copied: orbax raises anything up to a bare Exception
        others = ", ".join(str(s) for s in sorted(manager.all_steps()) if s != step)
        raise ExportError(f"{where}: the checkpoint cannot be read ({checkpoints.describe_error(e)})"
                          f"{'; choose another with --step: ' + others if others else ''}") from None


def export_checkpoint(workdir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                      step: int | None = None) -> str:
    """Writes the model parameters of checkpoint `step` (default: newest) of `workdir` to `out_dir`.

    Args:
      workdir: a `musenet-train` workdir (checkpoints under `workdir/checkpoints`).
      out_dir: the export directory; must not exist or be empty. Written as a temporary sibling directory
        and renamed into place, so it holds a complete export or nothing.
      dtype: 'float32' or 'bfloat16', the stored parameter dtype.
      step: training step of the checkpoint to export.
    Returns:
      out_dir.
    """
    workdir, out_dir = os.fspath(workdir), os.fspath(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if jax.process_count() > 1:
        # Every process would read the whole checkpoint and race on out_dir; one host process suffices.
        raise ExportError("run the export in a single process (it gathers the parameters on the host)")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ExportError(f"{out_dir}: already exists and is not an empty directory; choose a new --out")
    manager = _manager(workdir)
    try:
        step = _checkpoint_step(manager, workdir, step, f"{workdir}: no checkpoint to export")
        where = f"{workdir} step {step}"
        vocab, config, params = _read_checkpoint(manager, step, where)
    finally:
        manager.close()

    out_config = model_lib.ModelConfig.from_config_dict(config.to_dict(), param_dtype=dtype)
    params = {k: v.astype(out_config.params_dtype) for k, v in params.items()}
    _check_params(params, out_config, where, check_dtype=True)

    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        with outputs.atomic_path(out_dir, directory=True) as tmp:
            # One metadata key: safetensors writes its metadata in hash-map order, which differs between
            # processes, and the same checkpoint should give the same bytes. The step is in config.json.
            save_file(params, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
            # safetensors creates an owner-only file; an export is meant to be shared like any output.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(os.path.join(tmp, WEIGHTS), 0o666 & ~umask)
            with open(os.path.join(tmp, CONFIG), "w") as f:
                json.dump({"format": FORMAT, "model": out_config.to_dict(), "step": int(step), "dtype": dtype}, f,
                          indent=2)
            vocab.save(os.path.join(tmp, VOCAB))
    except OSError as e:
        raise ExportError(f"{out_dir}: cannot write in {parent} ({e.strerror or e})") from None
    return out_dir


# -- load ------------------------------------------------------------------------------------------
def read_export_config(out_dir: str | os.PathLike) -> tuple[dict, model_lib.ModelConfig, Vocab]:
    """(config.json dict, ModelConfig, Vocab) of an export, checked for format and vocabulary size."""
    out_dir = os.fspath(out_dir)
    for name in (CONFIG, VOCAB, WEIGHTS):
        if not os.path.isfile(os.path.join(out_dir, name)):
            raise ExportError(f"{out_dir}: not a musenet export (no {name})")
    try:
        with open(os.path.join(out_dir, CONFIG)) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{out_dir}/{CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{out_dir}/{CONFIG}: not a {FORMAT} config")
    vocab = Vocab.load(os.path.join(out_dir, VOCAB))
    config = model_lib.ModelConfig.from_config_dict(meta["model"])
    if config.vocab_size != vocab.size:
        raise ExportError(f"{out_dir}: the model has {config.vocab_size} token ids but its vocab.json has "
                          f"{vocab.size}")
    if config.token_embedding == "factored" and tuple(config.token_layout) != tuple(vocab.layout()):
        raise ExportError(f"{out_dir}: the model's token layout {tuple(config.token_layout)} is not its vocab.json's "
                          f"{tuple(vocab.layout())}")
    return meta, config, vocab


def load_export(out_dir: str | os.PathLike, vocab: Vocab | None = None,
                attention_impl: str | None = None) -> tuple[model_lib.MuseNet, Vocab]:
    """(model, vocab) from an export directory.

    Args:
      out_dir: a directory written by `export_checkpoint`.
      vocab: if given, the vocabulary the caller's tokens use; an export made for another one is refused.
      attention_impl: run the model with this attention implementation instead of its own (see
        `with_attention_impl`).
    Returns:
      A `MuseNet` on the default device with the stored parameters (dtype as stored), and its Vocab.
    """
    out_dir = os.fspath(out_dir)
    _, config, saved_vocab = read_export_config(out_dir)
    if vocab is not None and vocab != saved_vocab:
        raise ExportError(f"{out_dir}: exported for a different vocabulary (size {saved_vocab.size}, "
                          f"expected {vocab.size})")
    try:
        params = load_file(os.path.join(out_dir, WEIGHTS))
    except Exception as e:  # safetensors raises its own error types on a corrupt header or truncated data
        raise ExportError(f"{out_dir}/{WEIGHTS}: unreadable ({' '.join(str(e).split())})") from None
    _check_params(params, config, out_dir, check_dtype=True)
    return _model_from_params(with_attention_impl(config, attention_impl), params), saved_vocab


def with_attention_impl(config: model_lib.ModelConfig, attention_impl: str | None) -> model_lib.ModelConfig:
    """`config` running its attention with `attention_impl` (None: unchanged). The parameters do not depend
    on it: e.g. a model trained with 'pallas' on TPUs is scored on a CPU with 'cpu' (CPUs only interpret
    Pallas kernels, slowly)."""
    return config if attention_impl is None else dataclasses.replace(config, attention_impl=attention_impl)


def _model_from_params(config: model_lib.ModelConfig, params: dict[str, np.ndarray]) -> model_lib.MuseNet:
    """A `MuseNet` of `config` on the default device holding `params` ({safetensors key: array}, checked)."""
    graphdef, state = model_lib.abstract_model(config)
    by_key = {"/".join(map(str, path)): path for path, _ in nnx.to_flat_state(state)}
    pure: dict = {}
    for key, value in params.items():
        node = pure
        *parents, leaf = by_key[key]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.numpy.asarray(value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None,
                    attention_impl: str | None = None) -> tuple[model_lib.MuseNet, Vocab, int]:
    """(model, vocab, step) from a training checkpoint: parameters only (no optimizer state, no data state).

    Args:
      workdir: a `musenet-train` workdir (checkpoints under `workdir/checkpoints`).
      step: training step of the checkpoint (default: the newest).
      attention_impl: run the model with this attention implementation (see `with_attention_impl`).
    Returns:
      A `MuseNet` on the default device with the checkpoint's parameters (in the run's param dtype),
      the vocabulary it was trained on, and the step loaded.
    Raises:
      ExportError: no such workdir, no checkpoint (at `step`), a checkpoint that fails its manifest check or
        cannot be read, parameters that do not fit the saved config.
    """
    workdir = os.fspath(workdir)
    manager = _manager(workdir)
    try:
        step = _checkpoint_step(manager, workdir, step,
                                f"{workdir}: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
        vocab, config, params = _read_checkpoint(manager, step, f"{workdir} step {step}")
    finally:
        manager.close()
    params = {k: v.astype(config.params_dtype) for k, v in params.items()}
    return _model_from_params(with_attention_impl(config, attention_impl), params), vocab, int(step)
