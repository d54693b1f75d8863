"""musenet-launch with plain Python children (no JAX): output prefixes, flags, kill-all, signal forwarding."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.multihost.conftest import REPO

pytestmark = pytest.mark.multiprocess

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    process = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
    mode = sys.argv[1]
    print("child", process, "devices", os.environ["JAX_NUM_CPU_DEVICES"], " ".join(sys.argv[2:]), flush=True)
    if "fail1" in mode and process == 1:
        time.sleep(0.5)
        sys.exit(7)
    if "stubborn" in mode and process == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "graceful":
        def stop(signum, frame):
            print("child", process, "got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("child", process, "ready", flush=True)
    time.sleep(120)
""")


def _launch(*args) -> list[str]:
    return [sys.executable, "-m", "launch.launch_local", *args]


def test_prefixes_output_and_appends_process_flags():
    res = subprocess.run(_launch("--num_processes=2", "--devices_per_process=3", "--port=12345", "--",
                                 sys.executable, "-c", "import sys; print(*sys.argv[1:])"),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    for i in range(2):
        expected = f"[p{i}] --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id={i}"
        assert expected in lines
    assert sum(line.startswith("[launch] process ") and "pid" in line for line in lines) == 2


def test_a_failed_process_stops_the_others_and_gives_its_exit_code():
    t = time.monotonic()
    res = subprocess.run(_launch("--num_processes=3", "--devices_per_process=2", "--grace_s=1", "--",
                                 sys.executable, "-c", CHILD, "fail1"),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 7, res.stdout + res.stderr
    assert time.monotonic() - t < 60  # the other two sleep 120 s unless stopped
    assert "[p1] child 1 devices 2" in res.stdout and "[launch] process 1 exited with code 7" in res.stdout


def test_sigkill_after_the_grace_period():
    res = subprocess.run(_launch("--num_processes=2", "--grace_s=1", "--", sys.executable, "-c", CHILD,
                                 "stubborn+fail1"),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 7, res.stdout + res.stderr
    assert "still running 1 s after SIGTERM: sending SIGKILL" in res.stdout


def test_sigterm_is_forwarded_and_waited_for():
    proc = subprocess.Popen(_launch("--num_processes=2", "--", sys.executable, "-c", CHILD, "graceful"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    ready = 0
    deadline = time.monotonic() + 120
    while ready < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "launcher ended early"
        ready += line.rstrip().endswith("ready")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "[p0] child 0 got SIGTERM" in out and "[p1] child 1 got SIGTERM" in out


@pytest.mark.parametrize("args, message", [
    (["--num_processes=2"], "no command"),
    (["--num_processes=0", "--", "true"], "--num_processes must be"),
    (["--num_processes=1", "--devices_per_process=0", "--", "true"], "--devices_per_process must be"),
    (["--num_processes=1", "--", "/no/such/program"], "cannot start '/no/such/program'"),
])
def test_bad_flags_give_one_line(args, message):
    res = subprocess.run(_launch(*args), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_what_a_process_leaves_behind_in_its_group_is_killed_at_the_end():
    # As a dead process 0 leaves its coordination service's helper process (musenet_jax/distributed.py).
    child = ("import subprocess, sys; p = subprocess.Popen(['sleep', '120']); print('left', p.pid, flush=True); "
             "sys.exit(5)")
    res = subprocess.run(_launch("--num_processes=1", "--", sys.executable, "-c", child),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 5, res.stdout + res.stderr
    pid = int(next(line for line in res.stdout.splitlines() if line.startswith("[p0] left ")).split()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        state = pathlib.Path(f"/proc/{pid}/stat")
        if state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] == "Z":  # killed, not reaped yet
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the launcher left {pid} running")
