"""Unit tests of musenet_jax.distributed: flags, cluster detection, preemption flag, watchdog verdicts."""

from __future__ import annotations

import os
import signal

import pytest

from musenet_jax import distributed


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="127.0.0.1:1234"), "all three or none"),
    (dict(num_processes=2, process_id=0), "all three or none"),
    (dict(coordinator_address="nohostport", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"0\.\.1"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), ">= 1"),
    (dict(mode="off", coordinator_address="h:1", num_processes=2, process_id=0), "contradicts"),
    (dict(mode="maybe"), "auto, on, off"),
    (dict(heartbeat_timeout_s=0), "> 0"),
])
def test_options_reject_bad_flags(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.Options(**kwargs)


def test_options_accept_explicit_flags():
    options = distributed.Options(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3)
    assert options.explicit and not distributed.Options().explicit


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "1"}, "Cloud TPU pod (4 workers)"),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}, None),  # one task: a single process
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}, "SLURM job 77 (8 tasks)"),
    ({"JOB_COMPLETION_INDEX": "0", "JOBSET_NAME": "musenet"}, "Kubernetes JobSet musenet"),
    ({"JOB_COMPLETION_INDEX": "2"}, "Kubernetes indexed Job"),
])
def test_detect_cluster(environ, expected):
    assert distributed.detect_cluster(environ) == expected


def test_off_and_auto_without_cluster_stay_single_process(monkeypatch):
    for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize(distributed.Options(mode="off")) is None
    assert distributed.initialize(distributed.Options(mode="auto")) is None


def test_preemption_flag_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    flag = distributed.PreemptionFlag()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signal_name == "SIGTERM"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once(capsys):
    before = signal.getsignal(signal.SIGINT)
    flag = distributed.PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signal_name == "SIGINT"
        assert "stopping after this step with a checkpoint" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) == before


class FakeStore:
    """The coordination service's key-value store, in memory."""

    def __init__(self):
        self.values, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watchdog(store, process_index=0, process_count=3, timeout_s=5.0):
    failures = []
    dog = distributed.Watchdog(timeout_s, process_index=process_index, process_count=process_count, client=store,
                               on_failure=failures.append)
    return dog, failures


def test_watchdog_names_a_silent_process():
    store = FakeStore()
    dog, _ = _watchdog(store)
    store.values["musenet/heartbeat/1"] = "1 4"
    store.values["musenet/heartbeat/2"] = "1 4"
    t0 = dog._last_contact
    dog.beat(t0 + 1)
    assert dog.check(t0 + 1) is None
    store.values["musenet/heartbeat/1"] = "2 5"  # process 1 beats again, process 2 stays silent
    dog.beat(t0 + 5)
    message = dog.check(t0 + 6.5)
    assert message and "process 2 (last step 4)" in message and "process 1 " not in message
    assert "no heartbeat for 5 s" in message


def test_watchdog_names_the_lost_coordinator():
    store = FakeStore()
    dog, _ = _watchdog(store, process_index=1, process_count=2)
    store.down = True
    dog.beat()
    message = dog.check(dog._last_contact + 6)
    assert "lost contact with the coordinator (process 0)" in message and "UNAVAILABLE" in message


def test_watchdog_stalled_step_only_counts_while_armed():
    store = FakeStore()
    dog, _ = _watchdog(store, process_count=2)
    dog.progress(7)
    now = dog._last_progress
    store.values["musenet/heartbeat/1"] = "1 7"
    dog.beat(now + 10)  # process 1 keeps beating, the store answers
    assert dog.check(now + 10) is None  # disarmed: evaluation or a checkpoint may take long
    dog.arm()
    dog._last_progress = now
    message = dog.check(now + 10)
    assert "step 8 made no progress for 5 s" in message


def test_a_peer_that_never_beat_gets_the_start_up_grace():
    store = FakeStore()
    dog, _ = _watchdog(store, process_count=2, timeout_s=5)
    t0 = dog._last_contact
    dog.beat(t0 + 20)
    assert dog.check(t0 + 20) is None  # still starting up, maybe
    dog.beat(t0 + 26)
    assert "process 1 (last step -1) sent no heartbeat" in dog.check(t0 + 26)


def test_watchdog_threads_report_a_failure_once():
    store = FakeStore()
    dog, failures = _watchdog(store, process_count=2, timeout_s=0.5)
    store.values["musenet/heartbeat/1"] = "1 0"  # process 1 beats once, then never again
    with dog:
        dog._stop.wait(4)
    assert len(failures) == 1 and "process 1 (last step 0) sent no heartbeat" in failures[0]


class FakeBarrier:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def wait_at_barrier(self, barrier_id, timeout_in_ms, process_ids=None):
        self.calls.append((barrier_id, timeout_in_ms))
        if self.error:
            raise self.error


def test_wait_for_all_numbers_each_use_of_a_name():
    client = FakeBarrier()
    distributed.wait_for_all("unit a", 2.5, client=client)
    distributed.wait_for_all("unit a", 2.5, client=client)
    distributed.wait_for_all("unit b", client=client)
    assert client.calls == [("musenet/unit a/1", 2500), ("musenet/unit a/2", 2500),
                            ("musenet/unit b/1", int(distributed.BARRIER_TIMEOUT_S * 1000))]


def test_wait_for_all_fails_with_one_line_naming_the_barrier():
    client = FakeBarrier(RuntimeError("DEADLINE_EXCEEDED: Barrier timed out.\nmore detail"))
    with pytest.raises(distributed.DistributedError,
                       match=r"^processes did not all reach 'unit c' within 5 s: DEADLINE_EXCEEDED: Barrier timed "
                             r"out\.$"):
        distributed.wait_for_all("unit c", 5, client=client)


def test_wait_for_all_is_a_no_op_in_one_process():
    distributed.wait_for_all("unit d")  # no coordination service here: would fail if it tried to reach one
