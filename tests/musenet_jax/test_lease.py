"""The workdir lease (`musenet_jax.lease`): one holder, refusals naming it, takeovers of gone holders, renewal,
release, a multi-process job's shared outcome, and the removal of unfinished checkpoints.

The trainer around it (a dead run's lease and checkpoint remnants at start) is in test_train.py; two trainers on
one workdir from the command line in tests/launch/test_train_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from musenet_jax import lease, run_dir


def _lease(workdir, **kwargs) -> lease.WorkdirLease:
    return lease.WorkdirLease(workdir, process_index=0, process_count=1, **kwargs)


def _holder(workdir) -> dict:
    return json.loads((workdir / lease.LEASE_FILE).read_text())


def _write_holder(workdir, **fields) -> None:
    here = lease._machine()
    holder = {"host": here["host"], "pid": os.getpid(), "job": "other-job", "started": "2024-01-01T00:00:00Z",
              "renewed_unix_s": time.time(), "token": "other", "boot_id": here["boot_id"],
              "pid_namespace": here["pid_namespace"], **fields}
    (workdir / lease.LEASE_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_workdir_is_refused_naming_the_holder_and_released_on_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    first = _lease(tmp_path, renew_every_s=3600)
    first.acquire()
    holder = _holder(tmp_path)
    assert (holder["host"], holder["pid"], holder["job"], holder["token"]) == (
        socket.gethostname(), os.getpid(), "slurm 4711", first.token)
    second = _lease(tmp_path)
    with pytest.raises(lease.LeaseError) as refused:
        second.acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"workdir {tmp_path} is in use by another trainer (host {socket.gethostname()}, pid "
                              f"{os.getpid()}, job slurm 4711, started ")
    assert f"delete {tmp_path / lease.LEASE_FILE}" in message
    assert _holder(tmp_path) == holder  # the first one's lease is untouched
    second.release()  # it holds nothing: the first one's lease stays
    assert _holder(tmp_path) == holder
    first.release()
    assert not (tmp_path / lease.LEASE_FILE).exists()
    third = _lease(tmp_path, renew_every_s=3600)
    third.acquire()
    third.release()
    assert os.listdir(tmp_path) == []


def test_a_dead_processs_lease_is_taken_over_with_a_warning(tmp_path, capsys):
    pid = _dead_pid()
    _write_holder(tmp_path, pid=pid)
    taker = _lease(tmp_path, renew_every_s=3600)
    taker.acquire()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: took over the workdir lease of a trainer that is gone (host ")
    assert err[0].endswith(f": no process {pid} on this host)") and "job other-job" in err[0]
    assert _holder(tmp_path)["token"] == taker.token
    taker.release()


@pytest.mark.parametrize("renewed_ago_s,taken", [(10, False), (400, True)])
def test_on_object_storage_a_lease_from_another_host_is_taken_over_when_not_renewed(tmp_path, monkeypatch, capsys,
                                                                                    renewed_ago_s, taken):
    monkeypatch.setattr(run_dir, "is_remote", lambda path: True)
    _write_holder(tmp_path, host="other-host", pid=_dead_pid(), renewed_unix_s=time.time() - renewed_ago_s)
    taker = _lease(tmp_path, renew_every_s=3600, settle_s=0)
    if taken:
        taker.acquire()
        # The pid is another host's: not judged.
        assert capsys.readouterr().err.endswith("job other-job, started 2024-01-01T00:00:00Z: not renewed for 400 s)\n")
        assert _holder(tmp_path)["token"] == taker.token
        taker.release()
        assert not (tmp_path / lease.LEASE_FILE).exists()
    else:
        with pytest.raises(lease.LeaseError, match=r"\(host other-host, pid \d+, job other-job, started "
                                                   r"2024-01-01T00:00:00Z, renewed 10 s ago\)"):
            taker.acquire()


def test_on_object_storage_the_loser_of_a_creation_race_refuses_naming_the_winner(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "is_remote", lambda path: True)

    def rival_writes_meanwhile(seconds):
        assert seconds == 0.5
        _write_holder(tmp_path, host="winner-host", token="winner")

    monkeypatch.setattr(lease.time, "sleep", rival_writes_meanwhile)
    with pytest.raises(lease.LeaseError, match="in use by another trainer \\(host winner-host"):
        _lease(tmp_path, settle_s=0.5).acquire()
    assert _holder(tmp_path)["token"] == "winner"


def test_a_torn_lease_file_is_taken_over_once_old(tmp_path, capsys):
    path = tmp_path / lease.LEASE_FILE
    path.write_text("")  # a creator killed between creating and writing it
    with pytest.raises(lease.LeaseError, match="holder unknown"):
        _lease(tmp_path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    taker = _lease(tmp_path, renew_every_s=3600)
    taker.acquire()
    assert re.search(r"\(holder unknown: the lease file cannot be read: unreadable lease file, 6[01] s old\)$",
                     capsys.readouterr().err)
    taker.release()


def test_holder_on_a_restarted_host_is_gone():
    here = {"host": "h", "boot_id": "boot-2", "pid_namespace": "pid:[1]"}
    holder = {"host": "h", "boot_id": "boot-1", "pid_namespace": "pid:[1]", "pid": os.getpid(),
              "renewed_unix_s": 100.0}
    assert lease.holder_gone(holder, 0, 110.0, machine=here) == "its host has restarted since"
    # Another pid namespace (another container on the host): its pid says nothing here; only the renewal does.
    other = {**holder, "boot_id": "boot-2", "pid_namespace": "pid:[2]", "pid": _dead_pid()}
    assert lease.holder_gone(other, 0, 110.0, machine=here) is None
    assert lease.holder_gone(other, 0, 100.0 + lease.STALE_AFTER_S + 1, machine=here) == "not renewed for 301 s"


def test_renewal_refreshes_the_lease_and_never_overwrites_a_takeover(tmp_path):
    held = _lease(tmp_path, renew_every_s=3600)
    held.acquire()
    before = _holder(tmp_path)
    time.sleep(0.01)
    held.renew()
    after = _holder(tmp_path)
    assert after["renewed_unix_s"] > before["renewed_unix_s"] and after["token"] == held.token and not held.lost
    assert after["started"] == before["started"]
    _write_holder(tmp_path, host="taker-host", token="taker")
    held.renew()
    assert held.lost and "was taken over (host taker-host" in held.lost
    assert _holder(tmp_path)["token"] == "taker"
    held.release()  # not its lease any more: kept
    assert _holder(tmp_path)["token"] == "taker"


def test_the_renewal_thread_renews(tmp_path):
    held = _lease(tmp_path, renew_every_s=0.05)
    held.acquire()
    first = _holder(tmp_path)["renewed_unix_s"]
    deadline = time.time() + 30
    while _holder(tmp_path)["renewed_unix_s"] == first:
        assert time.time() < deadline
        time.sleep(0.05)
    held.release()
    assert not (tmp_path / lease.LEASE_FILE).exists()


class FakeStore:
    """The coordination service calls the lease makes: key-value store and barrier."""

    def __init__(self, values=None):
        self.values = dict(values or {})
        self.barriers = []

    def key_value_set(self, key, value):
        self.values[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        return self.values[key]

    def wait_at_barrier(self, barrier_id, timeout_ms):
        self.barriers.append(barrier_id)


def test_in_a_multi_process_job_only_process_0_takes_the_lease_and_all_share_its_outcome(tmp_path, monkeypatch):
    def nth_acquire(n):  # each process counts its own calls; here both live in this one
        monkeypatch.setattr(lease, "_acquire_calls", iter([n]))

    store = FakeStore()
    taken_on = []
    zero = lease.WorkdirLease(tmp_path, process_index=0, process_count=2, client=store, renew_every_s=3600)
    nth_acquire(1)
    zero.acquire(on_taken=lambda: taken_on.append(0))
    assert store.values == {"musenet/lease/1": "taken"} and taken_on == [0]
    nth_acquire(1)
    lease.WorkdirLease(tmp_path, process_index=1, process_count=2, client=store).acquire(
        on_taken=lambda: taken_on.append(1))
    assert _holder(tmp_path)["token"] == zero.token and taken_on == [0]  # process 1 wrote nothing, ran nothing
    # Refused on process 0: every process stops with its message.
    store.values["musenet/lease/2"] = "refused workdir x is in use by another trainer (host h)"
    nth_acquire(2)
    with pytest.raises(lease.LeaseError, match=r"^process 0: workdir x is in use by another trainer \(host h\)$"):
        lease.WorkdirLease(tmp_path, process_index=1, process_count=2, client=store).acquire()
    assert len(store.barriers) == 3
    zero.release()
    assert not (tmp_path / lease.LEASE_FILE).exists()


def test_unfinished_checkpoints_are_removed_with_one_line(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "3" / "state").mkdir(parents=True)
    (checkpoints / "6.orbax-checkpoint-tmp-1712345678" / "state").mkdir(parents=True)
    (checkpoints / "6.orbax-checkpoint-tmp-1712345678" / "state" / "d").write_text("half")
    (checkpoints / "9.orbax-checkpoint-tmp").mkdir()
    names = lease.remove_unfinished_checkpoints(checkpoints)
    assert names == ["6.orbax-checkpoint-tmp-1712345678", "9.orbax-checkpoint-tmp"]
    assert sorted(os.listdir(checkpoints)) == ["3"]
    assert capsys.readouterr().err == (f"removed 2 unfinished checkpoints of an earlier run (half-written when it "
                                       f"stopped) from {checkpoints}: 6.orbax-checkpoint-tmp-1712345678, "
                                       "9.orbax-checkpoint-tmp\n")
    assert lease.remove_unfinished_checkpoints(checkpoints) == [] and capsys.readouterr().err == ""
    assert lease.remove_unfinished_checkpoints(tmp_path / "none") == []


def test_job_id_comes_from_the_scheduler_else_is_random():
    assert lease.job_id({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0"}) == "slurm 12.0"
    assert lease.job_id({"JOBSET_NAME": "train-x"}) == "jobset train-x"
    assert lease.job_id({}) != lease.job_id({}) and len(lease.job_id({})) == 12
