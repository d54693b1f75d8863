"""musenet-export: params-only safetensors export of a (sharded) checkpoint, loaded back with equal logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import export, sampling
from musenet_jax import model as model_lib
from tests.checkpoint_faults import DAMAGES, damage

# bfloat16 keeps 8 mantissa bits (relative rounding <= 2^-9 per weight). Against the checkpoint's float32
# model the logits of this 2-layer model move by 0.11 % in RMS (measured: RMS 6.6e-4, at most 5e-3, for
# logits of RMS 0.58), so the bound 1 % still catches a wrong or mis-ordered tensor (~100 %), as does the
# max bound 2e-2. Against the same checkpoint rounded to bfloat16 by the test, the export must agree to
# float32 round-off.
BF16_RELATIVE_RMS = 0.01
BF16_MAX_ABS = 2e-2


@pytest.fixture
def workdir(trained_run):
    """The shared run's workdir (tests/conftest.py): 10 steps on a (data 2, fsdp 2, tensor 2) mesh, so the
    checkpoints are really sharded, kept at steps 5 and 10. Read-only."""
    return trained_run.workdir


def _checkpoint_model(workdir, step: int):
    """The model part of the full saved (model, optimizer) state, restored independently of export.py."""
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    vocab = Vocab.load(workdir / "vocab.json")
    config_json = json.loads((workdir / "config.json").read_text())
    config = model_lib.ModelConfig.from_config_dict(config_json["model"], **model_lib.vocab_fields(vocab))
    graphdef, abstract = model_lib.abstract_model(config)
    nnx.replace_by_pure_dict(abstract, jax.device_get(state["0"]))
    return nnx.merge(graphdef, abstract), state


def _batch(vocab_size: int, b: int = 2, t: int = 64):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (b, t)).astype(np.int32)
    features = {"timing": rng.integers(0, 5000, (b, t)), "chord": rng.integers(0, 70, (b, t)),
                "part": rng.integers(0, 128, (b, t)), "countdown": rng.integers(0, 128, (b, t)),
                "sounding": rng.integers(0, 40, (b, t))}
    return tokens, {k: v.astype(np.int32) for k, v in features.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_loads_with_the_checkpoints_logits(workdir, tmp_path, dtype):
    out = tmp_path / "export"
    assert export.export_checkpoint(workdir, out, dtype=dtype, step=5) == str(out)  # not the newest (10)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    meta = json.loads((out / "config.json").read_text())
    assert (meta["format"], meta["step"], meta["dtype"], meta["model"]["param_dtype"]) == (
        "musenet-export-v1", 5, dtype, dtype)

    reference, full_state = _checkpoint_model(workdir, 5)
    model, vocab = export.load_export(out, vocab=Vocab.load(workdir / "vocab.json"))
    assert vocab.size == model.config.vocab_size

    # Parameters only: exactly the model's tensors, none of the optimizer's moments (which share their names).
    tensors = load_file(out / "model.safetensors")
    assert len(tensors) == len(jax.tree.leaves(full_state["0"])) < len(jax.tree.leaves(full_state))
    assert sum(v.size for v in tensors.values()) == model_lib.count_params(reference)
    # The trained run uses tiny's factored token embedding: its part table, no per-id table.
    assert "token_parts" in tensors and "token_embed" not in tensors and "stack/blocks/0/attention/query" in tensors
    assert {np.dtype(v.dtype).name for v in tensors.values()} == {dtype}

    tokens, features = _batch(vocab.size)
    want = np.asarray(reference(tokens, features))
    got = np.asarray(model(tokens, features))
    assert got.shape == want.shape == (2, 64, vocab.size)
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        return
    assert not np.array_equal(got, want)  # the stored weights really were rounded
    assert np.sqrt(np.mean((got - want) ** 2)) < BF16_RELATIVE_RMS * np.sqrt(np.mean(want ** 2))
    np.testing.assert_allclose(got, want, rtol=0, atol=BF16_MAX_ABS)
    graphdef, params = nnx.split(reference)
    rounded = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), params))
    np.testing.assert_allclose(got, np.asarray(rounded(tokens, features)), rtol=0, atol=1e-5)


def test_newest_step_is_the_default(workdir, tmp_path):
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]
    export.export_checkpoint(workdir, tmp_path / "e")
    assert json.loads((tmp_path / "e" / "config.json").read_text())["step"] == 10


def test_bad_exports_are_refused(workdir, tmp_path):
    with pytest.raises(export.ExportError, match="no checkpoint at step 9"):
        export.export_checkpoint(workdir, tmp_path / "a", step=9)
    with pytest.raises(export.ExportError, match="no such workdir"):
        export.export_checkpoint(tmp_path / "missing", tmp_path / "a")
    with pytest.raises(export.ExportError, match="no checkpoints"):
        export.export_checkpoint(tmp_path, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # A damaged checkpoint (here its state metadata, emptied): one line that names it.
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    (damaged / "checkpoints" / "10" / "state" / "_METADATA").write_text("")
    for read in (lambda: export.export_checkpoint(damaged, tmp_path / "a"), lambda: export.load_checkpoint(damaged)):
        with pytest.raises(export.ExportError, match=f"{damaged} step 10: the checkpoint cannot be read"):
            read()
    assert not (tmp_path / "a").exists()

    out = tmp_path / "e"
    export.export_checkpoint(workdir, out)
    other = Vocab(VocabConfig(velocity_bins=8))
    with pytest.raises(export.ExportError, match="different vocabulary"):
        export.load_export(out, vocab=other)
    with pytest.raises(export.ExportError, match="not an empty directory"):
        export.export_checkpoint(workdir, out)

    config_json = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config_json, "model": {**config_json["model"], "mlp_dim": 48}}))
    with pytest.raises(export.ExportError, match=r"parameter .*mlp.* the model config needs"):
        export.load_export(out)
    (out / "config.json").write_text(json.dumps(config_json))

    other.save(out / "vocab.json")  # an export dir whose vocab.json is not the model's
    with pytest.raises(export.ExportError, match="token ids but its vocab"):
        export.load_export(out)

    (tmp_path / "corrupt").mkdir()
    for name in ("config.json", "vocab.json"):
        shutil.copy(out / name, tmp_path / "corrupt" / name)
    (tmp_path / "corrupt" / "vocab.json").write_text(Vocab.load(workdir / "vocab.json").to_json())
    # A truncated weights file (an interrupted copy): a clear error, not safetensors' own exception type.
    (tmp_path / "corrupt" / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:4096])
    with pytest.raises(export.ExportError, match="unreadable"):
        export.load_export(tmp_path / "corrupt")


def test_an_export_from_before_the_sounding_feature_loads_and_generates(workdir, tmp_path):
    """Exports written before `model.use_sounding` existed have neither its config fields nor its table: they
    load as models without it, and generate."""
    out = tmp_path / "e"
    export.export_checkpoint(workdir, out)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model"]["use_sounding"]
    old_model = {k: v for k, v in config_json["model"].items() if k not in ("use_sounding", "sounding_size")}
    (out / "config.json").write_text(json.dumps({**config_json, "model": old_model}))
    weights = load_file(out / "model.safetensors")
    old_weights = {k: v for k, v in weights.items() if "sounding" not in k}
    assert len(old_weights) == len(weights) - 1
    save_file(old_weights, out / "model.safetensors")
    model, vocab = export.load_export(out)
    assert not model.config.use_sounding and model.sounding_embed is None
    [piece] = sampling.generate(model, vocab, label=None, instruments=vocab.instruments.names[:1], seconds=1.0)
    assert len(piece.tokens) > piece.prefix_len


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.export", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(res, code: int = 1):
    assert res.returncode == code, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


@pytest.mark.e2e
def test_cli_exports_and_refuses_bad_input(workdir, tmp_path):
    out = tmp_path / "cli"
    # The subprocess has one CPU device: the 8-device sharded checkpoint is gathered on the host regardless.
    res = _cli("--workdir", workdir, "--out", out, "--dtype", "bfloat16", "--step", "5")
    assert res.returncode == 0, res.stderr
    assert "exported step 5" in res.stdout and (out / "model.safetensors").exists()
    # The same checkpoint gives the same bytes, in another process too: safetensors writes metadata in
    # hash-map order, so there is one key.
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": export.FORMAT}
    again = export.export_checkpoint(workdir, tmp_path / "again", dtype="bfloat16", step=5)
    for name in ("config.json", "model.safetensors", "vocab.json"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    shutil.rmtree(again)

    assert "no such workdir" in _one_line_error(_cli("--workdir", tmp_path / "missing", "--out", tmp_path / "x"))
    assert "no checkpoint at step 7" in _one_line_error(_cli("--workdir", workdir, "--out", tmp_path / "x",
                                                             "--step", "7"))
    before = sorted(p.name for p in out.iterdir())
    assert "not an empty directory" in _one_line_error(_cli("--workdir", workdir, "--out", out))
    assert sorted(p.name for p in out.iterdir()) == before
    assert "required" in _one_line_error(_cli("--workdir", workdir), code=2)
    assert "/proc/musenet-x: cannot write in /proc" in _one_line_error(_cli("--workdir", workdir, "--out",
                                                                            "/proc/musenet-x"))
    # Nothing half-written: no output dir and no temporary sibling left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("how", [*DAMAGES, "no manifest"])
def test_a_damaged_checkpoint_is_one_line_and_step_chooses_another(workdir, tmp_path, how):
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    step_dir = damaged / "checkpoints" / "10"
    if how == "no manifest":  # saved before manifests were written: orbax's own read error, in one line
        (step_dir / "manifest.0-of-1.json").unlink()
        for data in (step_dir / "state").rglob("d/*"):  # all: the parameters' files among them
            os.truncate(data, data.stat().st_size // 2)
        reason = "OUT_OF_RANGE: "
    else:
        reason = f"{damage(step_dir, how).relative_to(step_dir)}: "
    with pytest.raises(export.ExportError, match=f"{damaged} step 10: the checkpoint cannot be read"):
        export.load_checkpoint(damaged)
    res = _cli("--workdir", damaged, "--out", tmp_path / "x")
    line = _one_line_error(res)
    assert line.startswith(f"error: {damaged} step 10: the checkpoint cannot be read ({reason}"), line
    assert line.endswith("; choose another with --step: 5") and "Event loop is closed" not in res.stderr, res.stderr
    assert not (tmp_path / "x").exists()
    res = _cli("--workdir", damaged, "--out", tmp_path / "x", "--step", "5")
    assert res.returncode == 0 and "exported step 5" in res.stdout and "Traceback" not in res.stderr, res.stderr
