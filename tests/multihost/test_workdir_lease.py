"""The workdir lease in a 2-process job: process 0 alone takes it, both stop with its refusal, both go on after it
takes over a dead trainer's lease (and removes that trainer's unfinished checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from musenet_jax import lease
from tests.multihost.conftest import launch_args, run, train_args

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.e2e]


def test_a_two_process_job_shares_one_lease(data_dir, tmp_path):
    workdir = tmp_path / "run"
    unfinished = workdir / "checkpoints" / "5.orbax-checkpoint-tmp-1712345678"
    unfinished.mkdir(parents=True)
    holder = subprocess.Popen(["sleep", "600"])  # a live trainer on this host, as far as its lease says
    here = lease._machine()
    (workdir / lease.LEASE_FILE).write_text(json.dumps({**here, "pid": holder.pid, "job": "other-job", "token": "t",
                                                        "started": "2024-01-01T00:00:00Z",
                                                        "renewed_unix_s": time.time()}))
    command = launch_args(2, 1, train_args(data_dir, workdir, steps=2, mesh=(2, 1, 1)))
    try:
        refused = run(command, devices=1)
    finally:
        holder.kill()
        holder.wait()
    out = refused.stdout + refused.stderr  # launch_local: every process's lines, prefixed
    assert refused.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if "error: " in line]
    named = f"is in use by another trainer (host {here['host']}, pid {holder.pid}, job other-job"
    assert any(e.startswith("[p0] error: workdir ") and named in e for e in errors), out[-3000:]
    assert any(e.startswith("[p1] error: process 0: workdir ") and named in e for e in errors), out[-3000:]
    assert unfinished.exists()  # nothing was touched

    # The holder is gone now: process 0 takes the lease over and clears the unfinished checkpoint; both train.
    res = run(command, devices=1)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert (f"[p0] warning: took over the workdir lease of a trainer that is gone (host {here['host']}, pid "
            f"{holder.pid}, job other-job, started 2024-01-01T00:00:00Z: no process {holder.pid} on this host)"
            in out)
    assert "[p0] removed 1 unfinished checkpoint of an earlier run (half-written when it stopped) from " in out
    assert "[p1] warning" not in out and "[p1] removed" not in out
    assert "[launch] all 2 processes exited 0" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert not (workdir / lease.LEASE_FILE).exists()
