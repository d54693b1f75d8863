"""The trainer end to end on small real data: exact resume, a mismatched checkpoint refused, NaN stop.

The train step on its own (sharded, accumulated, the optimizer) is in test_train_step.py.
"""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipeline import datasets, input_pipeline
from musenet_jax import evaluation, lease, ngram, train
from tests.conftest import small_config


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_train_resume_matches_uninterrupted_run(data_dir, tmp_path, capsys, caplog, monkeypatch):
    # Start-up reads no record for its statistics: eval windows and the unigram baseline come from the
    # stats stored with the dataset (on remote storage, reading every record took minutes).
    def unread(*args, **kwargs):
        raise AssertionError("the trainer read every record for the unigram baseline")

    def eval_batches(*args, **kwargs):
        assert kwargs["token_counts"] is not None and kwargs["prefix_lengths"] is not None
        return make_eval_batches(*args, **kwargs)

    make_eval_batches = input_pipeline.make_eval_batches
    monkeypatch.setattr(evaluation, "unigram_bits_per_token", unread)
    monkeypatch.setattr(input_pipeline, "make_eval_batches", eval_batches)
    full = tmp_path / "full"
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        result = train.train_and_evaluate(small_config(6), str(full), data_dir)
    # The steps run the programs compiled before the start barrier (distributed.compile_together): one
    # compilation each, two evaluations included.
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert compiled.count("Compiling jit(train_step)") == 1 and compiled.count("Compiling jit(eval_step)") == 1
    # Windows drawn per piece in proportion to its length, from the counts stored with the dataset.
    counts = datasets.token_counts(data_dir, "directory", "train")
    windows = input_pipeline.record_windows(len(counts), datasets.load_vocab(data_dir, "directory"),
                                            input_pipeline.InputConfig(seq_len=64), counts)
    assert windows.sum() > len(counts)
    err = capsys.readouterr().err
    assert (f"training data: {len(counts)} pieces, {windows.sum()} windows of 64 tokens an epoch (tokens sampling)"
            in err)
    # The tests' batch of 4 on 8 devices (data 8): replicated in pairs, and the run says so.
    assert "warning: train.batch_size=4 does not divide over the 8 batch shards of mesh" in err
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert np.isfinite(result["eval/bits_per_token"])
    vocab, source = datasets.load_vocab(data_dir, "directory"), datasets.data_source(data_dir, "directory", "train")
    histogram = np.bincount(np.concatenate([source[i]["tokens"] for i in range(len(source))]), minlength=vocab.size)
    assert result["eval/unigram_bits_per_token"] == pytest.approx(  # eval_split is "train" here
        evaluation.unigram_bits_from_histograms(histogram, histogram), rel=1e-12)
    assert (full / "vocab.json").exists() and (full / "config.json").exists()
    assert sorted(p.name for p in (full / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]

    # The n-gram baseline: fitted on the train split (all 12 records: under eval.ngram_max_train_tokens), the
    # best of orders 1..5 on the windows the model is evaluated on, reported and kept in baseline.json.
    baseline = json.loads((full / "baseline.json").read_text())
    final = json.loads((full / "final_metrics.json").read_text())
    by_order = {int(k): v for k, v in baseline["bits_per_token_by_order"].items()}
    assert sorted(by_order) == [1, 2, 3, 4, 5] and by_order[baseline["order"]] == min(by_order.values())
    for metrics in (result, final):
        assert metrics["eval/ngram_order"] == baseline["order"]
        assert metrics["eval/ngram_bits_per_token"] == baseline["bits_per_token"]
    train_records = ngram.read_sequences(source, vocab)
    assert baseline["train_tokens"] == train_records.num_tokens and baseline["train_records"] == len(source)
    model = ngram.NgramModel.fit(train_records.tokens, vocab.size, 5)
    bits, tokens = np.zeros(5), 0
    for batch in make_eval_batches(source, vocab, 64, 4, max_windows=8, process_index=0, process_count=1):
        scored = batch["loss_mask"] > 0
        bits -= np.log2(model.probs(batch["inputs"], batch["targets"], where=scored, orders=range(1, 6))).sum(1)
        tokens += scored.sum()
    assert baseline["eval_tokens"] == tokens
    np.testing.assert_allclose([by_order[n] for n in range(1, 6)], bits / tokens, rtol=1e-12)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    reported = [r["eval/ngram_bits_per_token"] for r in rows if "eval/bits_per_token" in r]
    assert reported == [baseline["bits_per_token"]] * 2  # steps 3 and 6
    step_line = f"step 6: validation {result['eval/bits_per_token']:.3f} bits/token (unigram "
    assert f"{baseline['order']}-gram {baseline['bits_per_token']:.3f})" in err.split(step_line)[1].splitlines()[0]

    # Interrupted after step 3, then resumed from its checkpoint: the same next losses, data order included.
    part = tmp_path / "part"
    train.train_and_evaluate(small_config(3), str(part), data_dir)
    cached = (part / "baseline.json").read_bytes(), (part / "baseline.json").stat().st_mtime_ns
    # As if a run had died after logging steps 4 and 5 without a checkpoint of them, mid-write.
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/loss": -1.0}\n{"step": 5, "train/loss": -1.0}\n{"step": 5, "tr')
    capsys.readouterr()

    def refit(*args, **kwargs):
        raise AssertionError("the resumed run fitted the n-gram again")

    monkeypatch.setattr(ngram.NgramModel, "fit", refit)
    resumed_result = train.train_and_evaluate(small_config(6), str(part), data_dir)
    err = capsys.readouterr().err
    assert ("train.total_steps is 6, the checkpoint's run had 3: the learning rate now decays over 6 steps (at "
            "step 3:" in err)
    # The baseline came from baseline.json, untouched, and is the one the uninterrupted run computed.
    assert ((part / "baseline.json").read_bytes(), (part / "baseline.json").stat().st_mtime_ns) == cached
    assert "(from baseline.json)" in err
    assert resumed_result["eval/ngram_bits_per_token"] == baseline["bits_per_token"]
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once
    resumed = _losses(part)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_checkpoint_from_another_model_is_refused(data_dir, tmp_path):
    no_baseline = small_config(3)
    no_baseline.eval.ngram_max_train_tokens = 0  # turns the n-gram baseline off
    result = train.train_and_evaluate(no_baseline, str(tmp_path), data_dir)
    assert not (tmp_path / "baseline.json").exists()
    assert np.isnan(result["eval/ngram_bits_per_token"]) and np.isnan(result["eval/ngram_order"])
    other = small_config(6)
    other.model.d_model = 48
    with pytest.raises(train.TrainingError,
                       match=r"different model config \(checkpoint vs this run: model.d_model: 32 vs 48\)"):
        train.train_and_evaluate(other, str(tmp_path), data_dir)
    # How the model runs may change (model.EXECUTION_FIELDS): e.g. trained with 'xla', resumed with another
    # attention implementation and remat policy. Configs of checkpoints written before a field existed
    # (here: `pallas_lowering`) compare the same way.
    same = small_config(4)
    same.model.update(attention_impl="reference", remat_policy="dots")
    del same.model["pallas_lowering"]
    train.train_and_evaluate(same, str(tmp_path), data_dir)
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]

    # Started again when finished (a rerun, a restarted job), a run trains nothing and changes nothing.
    files = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for total_steps in (4, 2):
        result = train.train_and_evaluate(small_config(total_steps), str(tmp_path), data_dir)
        assert not result["trained"] and result["step"] == 4
        final = json.loads(files[pathlib.Path("final_metrics.json")])
        assert result["eval/bits_per_token"] == final["eval/bits_per_token"]
        assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files

    # A damaged checkpoint (its state metadata emptied) is set aside for the one before (test_checkpoints.py).
    (tmp_path / "checkpoints" / "4" / "state" / "_METADATA").write_text("")
    train.train_and_evaluate(small_config(5), str(tmp_path), data_dir)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4.damaged", "5"]


@pytest.mark.parametrize("field,value", [("train.total_steps", 0), ("train.total_steps", -5),
                                         ("train.log_every", 0), ("eval.every_steps", 0),
                                         ("checkpoint.every_steps", 0), ("train.microbatches", 0),
                                         ("train.learning_rate", 0.0), ("eval.ngram_max_train_tokens", -1),
                                         ("eval.ngram_order", 11)])
def test_run_loop_settings_out_of_range_are_refused_before_anything_is_written(field, value, tmp_path):
    config = small_config(3)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(train.TrainingError, match=f"config {field} must be"):
        train.train_and_evaluate(config, str(tmp_path / "run"), str(tmp_path / "no_data"))
    assert not (tmp_path / "run").exists()


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


@pytest.mark.slow
def test_a_dead_runs_lease_and_unfinished_checkpoint_are_cleared_at_start_and_the_lease_released(data_dir, tmp_path,
                                                                                               capsys, monkeypatch):
    # What a trainer killed outright leaves: its lease (its process is gone) and the checkpoint it was writing.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = lease._machine()
    (tmp_path / lease.LEASE_FILE).write_text(json.dumps({**here, "pid": dead.pid, "job": "dead-job", "token": "x",
                                                         "started": "2024-01-01T00:00:00Z",
                                                         "renewed_unix_s": time.time()}))
    unfinished = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1712345678"
    (unfinished / "state").mkdir(parents=True)
    result = train.train_and_evaluate(small_config(2), str(tmp_path), data_dir)
    assert result["trained"] and result["step"] == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"warning: took over the workdir lease of a trainer that is gone (host {here['host']}, pid "
                      f"{dead.pid}, job dead-job, started 2024-01-01T00:00:00Z: no process {dead.pid} on this host)")
    assert err[1] == (f"removed 1 unfinished checkpoint of an earlier run (half-written when it stopped) from "
                      f"{tmp_path / 'checkpoints'}: {unfinished.name}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert not (tmp_path / lease.LEASE_FILE).exists()  # released at the end

    # A lease lost while training (taken over by a trainer that judged this one gone) stops the run at its next step.
    acquire = lease.WorkdirLease.acquire

    def acquire_then_lose(self, **kwargs):
        acquire(self, **kwargs)
        self.lost = "the workdir lease was taken over (host h); stopping"

    monkeypatch.setattr(lease.WorkdirLease, "acquire", acquire_then_lose)
    with pytest.raises(train.TrainingError, match=r"^the workdir lease was taken over \(host h\); stopping$"):
        train.train_and_evaluate(small_config(3), str(tmp_path), data_dir)
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_global_eval_batches_laid_out_by_one_process_are_the_processes_rows(data_dir):
    # The trainer scores the n-gram baseline on process 0 with the eval windows laid out for the whole global
    # batch (process_count=1): row for row the global batches the processes' rows make up together.
    vocab, source = datasets.load_vocab(data_dir, "directory"), datasets.data_source(data_dir, "directory", "train")
    stats = {"token_counts": datasets.token_counts(data_dir, "directory", "train"),
             "prefix_lengths": datasets.prefix_lengths(data_dir, "directory", "train")}
    single = list(input_pipeline.make_eval_batches(source, vocab, 64, 4, max_windows=10, process_index=0,
                                                   process_count=1, **stats))
    rows = [list(input_pipeline.make_eval_batches(source, vocab, 64, 2, max_windows=10, process_index=p,
                                                  process_count=2, **stats)) for p in (0, 1)]
    assert len(single) == len(rows[0]) == len(rows[1]) == 3  # 10 windows and 2 empty rows
    for k, batch in enumerate(single):
        for key in input_pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], np.concatenate([rows[0][k][key], rows[1][k][key]]))
    assert single[-1]["loss_mask"][2:].sum() == 0 and single[-1]["loss_mask"][:2].sum() > 0


def test_a_batch_that_does_not_divide_over_the_batch_shards(monkeypatch):
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    assert train.check_batch_splits(mesh, 16) is None
    assert "batch_size=12 does not divide over the 8 batch shards" in train.check_batch_splits(mesh, 12)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # several processes: each could not read its own rows
    with pytest.raises(train.TrainingError, match="use a multiple of 8"):
        train.check_batch_splits(mesh, 12)
