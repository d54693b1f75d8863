"""The serving scheduler (`musenet_jax.serving`) without HTTP: jobs decoded together first come first served,
joining and leaving between windows, bucketed batch sizes, results equal to plain sampling, a bounded queue,
cancellation, the time limit, forgetting old jobs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flax import nnx

from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import model as model_lib
from musenet_jax import sampling, serving, window_loop


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(VocabConfig(labels=("bach",), velocity_bins=2, pitch_min=48, pitch_max=71, max_wait=16))


@pytest.fixture(scope="module")
def model(vocab) -> model_lib.MuseNet:
    config = model_lib.ModelConfig(
        vocab_size=vocab.size, d_model=32, num_heads=2, head_dim=16, mlp_dim=48, num_layers=2, max_len=32,
        attention_pattern="strided", attention_stride=8, attention_combination="interleaved", dtype="float32",
        remat_policy="off", init_std=0.2)
    return model_lib.MuseNet(config, rngs=nnx.Rngs(params=0))


HOT = sampling.SamplingConfig(temperature=20.0)  # the random model's waits come often: pieces reach their end


def requests(n: int, seed: int, seconds: float = 0.5, **kwargs) -> list[sampling.Request]:
    return [sampling.Request("bach", ("piano", "drums"), seconds, sampling=HOT, seed=seed, sample=i,
                             max_tokens=400, **kwargs) for i in range(n)]


def wait_final(scheduler: serving.Scheduler, job: serving.Job, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (view := scheduler.view(job))["status"] not in serving.FINAL:
        assert time.monotonic() < deadline, view
        time.sleep(0.02)
    return view


def test_waiting_jobs_are_decoded_together_and_give_plain_sampling_s_pieces(model, vocab):
    scheduler = serving.Scheduler(model, vocab, max_batch=4, queue_size=8)
    try:
        assert scheduler.buckets == [1, 2, 4]
        gate = threading.Event()
        original = scheduler.decoder.window

        def held(*args, **kwargs):  # the first window waits until every job is queued
            gate.wait(60)
            return original(*args, **kwargs)

        scheduler.decoder.window = held
        jobs = [scheduler.submit(requests(n, seed), 0.5, {}) for n, seed in ((1, 1), (2, 2), (1, 3), (3, 4))]
        gate.set()
        views = [wait_final(scheduler, job) for job in jobs]
        assert [v["status"] for v in views] == ["done"] * 4
        # First come, first served, never split: [1] alone (taken before the others arrived) or with them, then
        # whole jobs as rows free up; every piece decoded once.
        stats = scheduler.stats()
        assert stats["jobs"]["rows"] == 7
        assert max(map(int, stats["windows_by_rows"])) >= 3
        assert max(map(int, stats["windows_by_rows"])) <= 4
        for job, view in zip(jobs, views, strict=True):
            alone = sampling.generate_batch(model, vocab, job.requests)
            assert [r.tokens.tolist() for r in view["results"]] == [
                p.tokens[p.prefix_len:][:-1 if p.ended else None].tolist() for p in alone]
            assert all(r.midi[:4] == b"MThd" and r.notes is not None for r in view["results"])
    finally:
        scheduler.close()


def test_a_short_job_joins_a_running_one_and_finishes_first(model, vocab):
    """Continuous batching: a job that arrives while another decodes joins it at a window boundary and gets
    its result as soon as its own pieces end, not when the longer job does."""
    scheduler = serving.Scheduler(model, vocab, max_batch=4, queue_size=8)
    try:
        slow = sampling.SamplingConfig(temperature=1.0)  # fewer waits: many windows for 8 s of music
        long = scheduler.submit([sampling.Request("bach", ("piano",), 8.0, sampling=slow, seed=5, max_tokens=4000)],
                                8.0, {})
        deadline = time.monotonic() + 120
        while scheduler.view(long)["progress"][0] <= 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        short = scheduler.submit(requests(1, 6, seconds=0.3), 0.3, {})
        view = wait_final(scheduler, short)
        assert view["status"] == "done" and scheduler.view(long)["status"] == "running"
        assert wait_final(scheduler, long)["status"] == "done"
        assert "2" in scheduler.stats()["windows_by_rows"]  # the two were decoded together
        [alone] = sampling.generate_batch(model, vocab, short.requests)
        body = alone.tokens[alone.prefix_len:]
        assert view["results"][0].tokens.tolist() == body[:-1 if alone.ended else None].tolist()
    finally:
        scheduler.close()


def test_a_full_queue_refuses_and_cancelled_jobs_stop(model, vocab):
    scheduler = serving.Scheduler(model, vocab, max_batch=1, queue_size=1)
    try:
        long = requests(1, 5, seconds=60.0)
        running = scheduler.submit(long, 60.0, {})
        while scheduler.view(running)["status"] == "queued":
            time.sleep(0.01)
        waiting = scheduler.submit(long, 60.0, {})
        with pytest.raises(serving.QueueFull) as full:
            scheduler.submit(long, 60.0, {})
        assert full.value.retry_after >= 1
        scheduler.cancel(waiting)
        assert scheduler.view(waiting)["status"] == "cancelled"
        scheduler.cancel(running)  # stops at its next window
        assert wait_final(scheduler, running)["status"] == "cancelled"
        with pytest.raises(ValueError, match="num_samples"):
            scheduler.submit(requests(2, 1), 0.5, {})
    finally:
        scheduler.close()


def test_the_time_limit_fails_a_job_and_old_jobs_are_forgotten(model, vocab):
    scheduler = serving.Scheduler(model, vocab, max_batch=2, queue_size=4, max_job_seconds=0.01, keep_finished=2)
    try:
        slow = scheduler.submit(requests(1, 6, seconds=60.0), 60.0, {})
        view = wait_final(scheduler, slow)
        assert view["status"] == "failed" and "limit of 0.01 s" in view["error"] and view["results"] == []
        later = [scheduler.submit(requests(1, s, seconds=60.0), 60.0, {}) for s in (7, 8)]
        for job in later:
            wait_final(scheduler, job)
        assert scheduler.get(slow.id) is None and all(scheduler.get(j.id) is j for j in later)
        assert np.all([scheduler.view(j)["status"] == "failed" for j in later])
    finally:
        scheduler.close()


def test_warm_up_compiles_every_shape_a_request_can_need(model, vocab):
    """After `warm_up`, requests of any instruments, in any batch bucket, compile nothing more."""
    scheduler = serving.Scheduler(model, vocab, max_batch=2, queue_size=4, max_seconds=2.0)
    try:
        serving.warm_up(scheduler)
        before = window_loop.TRACE_COUNTS["decode_window"]
        names = vocab.instruments.names
        for instruments in (["drums"], ["cello"], ["piano", "violin", "drums"], names[1:], names):
            for bucket in scheduler.buckets:
                sampling.generate_batch(model, vocab, [sampling.Request(None, tuple(instruments), 0.2)],
                                        batch_size=bucket, capacity=scheduler.capacity)
        assert window_loop.TRACE_COUNTS["decode_window"] == before
    finally:
        scheduler.close()
