"""A process of a 2-process job killed with SIGKILL: the other one exits with `distributed.ABORT_EXIT_CODE`
and one last line naming it, within the heartbeat timeout, the coordinator (process 0) included; the job
still ends in order when nobody dies; musenet-launch's grace period lets the survivor say who died.

The processes run a small program instead of training (no model to compile): `distributed.initialize`, a
`Watchdog`, and a cross-process all-reduce (`distributed.any_process`) per step whose failure waits for the
watchdog's verdict, as the trainer does.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from musenet_jax import distributed
from tests.multihost.conftest import REPO, Running, env, free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TIMEOUT_S = 5.0  # --heartbeat_timeout_s of the processes here
# Between the kill and the survivor's exit: the timeout, its +1 s of detection, and slack for a loaded 2-core host.
MARGIN_S = 15.0
START_TIMEOUT_S = 240.0  # both processes importing JAX and compiling the all-reduce on a loaded host

# Takes the flags that musenet-launch appends (or the test gives): --coordinator_address, --num_processes,
# --process_id, and --heartbeat_timeout_s, --steps (0: until SIGTERM) and --late_s (process 1 ends that much
# later).
PROGRAM = textwrap.dedent(r"""
    import sys, time
    import jax
    from jax._src import distributed as jax_distributed
    from musenet_jax import distributed

    flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])
    options = distributed.Options(coordinator_address=flags["coordinator_address"],
                                  num_processes=int(flags["num_processes"]), process_id=int(flags["process_id"]),
                                  heartbeat_timeout_s=float(flags["heartbeat_timeout_s"]))
    print("joined:", distributed.initialize(options), flush=True)
    if options.process_id == 0:
        print("service pid", jax_distributed.global_state.service.pid, flush=True)
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    steps = int(flags.get("steps", 0))
    preemption = distributed.PreemptionFlag()  # SIGTERM asks for a stop after the step, as in training
    with distributed.Watchdog(options.heartbeat_timeout_s) as watchdog:
        step = 0
        while step < steps or not steps:
            try:
                if distributed.any_process(preemption.requested, mesh):
                    break
            except Exception:
                watchdog.wait_for_verdict()
                raise
            step += 1
            watchdog.progress(step)
            watchdog.arm()
            print("step", step, flush=True)
            time.sleep(0.2)
    if options.process_id == 1:
        time.sleep(float(flags.get("late_s", 0)))
    print("done", flush=True)
""")


def names_the_dead(victim: int, survivor: int) -> str:
    """The survivor's last line: the victim's heartbeats stopped, or (first seen on a loaded host, where the
    survivor's step waits longer than the timeout in the collective the victim left) its own step stalled on
    the victim. Both name the victim."""
    return (rf"error: (process {victim} \(last step \d+\) sent no heartbeat for 5 s: died or hung; stopping "
            rf"process {survivor} of 2|process {survivor} of 2: step \d+ made no progress for 5 s; it waits on "
            rf"process {victim} \(at step \d+\) that no longer takes part in the collectives; stopping)$")


def _program(port: int, process: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", PROGRAM, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={process}", f"--heartbeat_timeout_s={TIMEOUT_S:g}", *extra]


def _start(*extra: str) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(_program(port, p, *extra), cwd=REPO, env=env(2), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for p in range(2)]


def _wait_for_line(stream, pattern: str, deadline: float) -> str:
    """Reads `stream` (pipe of a running process) until a line matching `pattern`; returns the lines read."""
    lines = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return "".join(lines)
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaps


def _wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _gone(pid)


# What JAX's coordination client prints when it aborts its process (SIGABRT) after losing the service.
JAX_ABORT = ("Check failure stack trace", "Terminating process because the JAX distributed service")


@pytest.mark.parametrize("victim", [0, 1])
def test_the_survivor_of_a_killed_process_names_it(victim):
    procs = _start()
    survivor = 1 - victim
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        head = [_wait_for_line(p.stdout, r"^step 3$", deadline) for p in procs]
        helper = int(re.search(r"service pid (\d+)", head[0]).group(1))
        procs[victim].kill()
        t = time.monotonic()
        _, err = procs[survivor].communicate(timeout=TIMEOUT_S + MARGIN_S + 30)
        elapsed = time.monotonic() - t
    finally:
        for p in procs:
            p.kill()
            p.wait()
    code = procs[survivor].returncode
    assert code == distributed.ABORT_EXIT_CODE, (code, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert re.match(names_the_dead(victim, survivor), last), err[-3000:]
    assert not any(m in err for m in JAX_ABORT), err[-3000:]
    assert elapsed < TIMEOUT_S + MARGIN_S, elapsed
    # Process 0's coordination service (its helper process) ends once nobody is connected any more.
    assert _wait_until_gone(helper, 5), f"service helper {helper} still running"


def test_the_service_of_a_dead_process_0_stops_by_jaxs_heartbeat_timeout_while_a_process_hangs():
    procs = _start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        head = [_wait_for_line(p.stdout, r"^step 3$", deadline) for p in procs]
        helper = int(re.search(r"service pid (\d+)", head[0]).group(1))
        procs[1].send_signal(signal.SIGSTOP)  # hung: still connected, no watchdog to end it
        procs[0].kill()
        t = time.monotonic()
        linger_s = 2 * TIMEOUT_S + distributed.SERVICE_LINGER_MARGIN_S  # JAX's heartbeat timeout is 2 x ours
        time.sleep(linger_s - 3)
        assert not _gone(helper), "the service stopped while a process was still connected"
        assert _wait_until_gone(helper, 3 + 10), f"service helper {helper} still running"
        assert time.monotonic() - t > linger_s - 1
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_job_whose_process_0_ends_first_still_ends_in_order():
    procs = _start("--steps=3", "--late_s=3")
    try:
        outputs = [p.communicate(timeout=START_TIMEOUT_S + 60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, (p.returncode, err[-3000:])
        assert out.rstrip().endswith("done"), out
        assert not any(m in err for m in JAX_ABORT), err[-3000:]
    helper = int(re.search(r"service pid (\d+)", outputs[0][0]).group(1))
    assert _wait_until_gone(helper, 5), f"service helper {helper} still running after process 0 ended"


def test_under_musenet_launch_the_coordinators_death_is_named_before_the_grace_period_ends():
    command = _program(0, 0)[:3] + [f"--heartbeat_timeout_s={TIMEOUT_S:g}"]
    # Default --grace_s: the command's heartbeat timeout + the launcher's margin.
    job = Running([sys.executable, "-m", "launch.launch_local", "--num_processes=2", "--devices_per_process=2",
                   "--", *command], devices=2)
    try:
        job.wait_for(lambda line: line.startswith("[p0] step 3"), timeout=START_TIMEOUT_S)
        pid = int(re.search(r"\[launch\] process 0 of 2: pid (\d+)", job.output).group(1))
        helper = int(re.search(r"\[p0\] service pid (\d+)", job.output).group(1))
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        code = job.finish(timeout=TIMEOUT_S + MARGIN_S + 30)
        elapsed = time.monotonic() - t
    finally:
        job.kill()
    out = job.output
    assert code == 128 + signal.SIGKILL, out[-3000:]
    assert "[launch] process 0 exited with code 137: stopping the others" in out, out[-3000:]
    assert "sending SIGKILL" not in out and not any(m in out for m in JAX_ABORT), out[-3000:]
    p1 = [line for line in out.splitlines() if line.startswith("[p1] ")]
    assert re.match(r"\[p1\] " + names_the_dead(0, 1), p1[-1]), out[-3000:]
    assert elapsed < TIMEOUT_S + MARGIN_S, elapsed
    assert _wait_until_gone(helper, 5), "the launcher left the service helper running"


CHILD = textwrap.dedent("""
    import signal, sys, time
    process = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
    timeout = float([a for a in sys.argv if a.startswith("--heartbeat_timeout_s=")][0].split("=")[1])
    if process == 0:
        print("ready", flush=True)
        time.sleep(0.5)
        signal.raise_signal(signal.SIGKILL)
    signal.signal(signal.SIGTERM, lambda *_: print("checkpoint requested", flush=True))  # as musenet-train
    time.sleep(timeout + 1)
    print("error: process 0 (last step 1) sent no heartbeat", file=sys.stderr, flush=True)
    sys.exit(3)
""")


def test_the_default_grace_period_outlasts_the_heartbeat_timeout():
    timeout = 3
    res = subprocess.run([sys.executable, "-m", "launch.launch_local", "--num_processes=2", "--",
                          sys.executable, "-c", CHILD, f"--heartbeat_timeout_s={timeout}"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 128 + signal.SIGKILL, res.stdout + res.stderr
    assert "[p1] checkpoint requested" in res.stdout and "sending SIGKILL" not in res.stdout, res.stdout
    assert "[p1] error: process 0 (last step 1) sent no heartbeat" in res.stdout, res.stdout


def test_the_launchers_default_grace_follows_musenet_trains_heartbeat_timeout():
    probe = ("from launch import launch_local as l; "
             "print(l.TRAIN_HEARTBEAT_TIMEOUT_S, l.GRACE_MARGIN_S, "
             "*(l.default_grace_s(c) for c in ([], ['x', '--heartbeat_timeout_s=7'], "
             "['x', '--heartbeat_timeout_s', '90', '-heartbeat_timeout_s=120'], ['x', '--heartbeat_timeout_s=no'])))")
    launcher = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    train = subprocess.run([sys.executable, "-c", "import launch.train; from absl import flags; "
                            "print(flags.FLAGS['heartbeat_timeout_s'].default)"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert launcher.returncode == 0 and train.returncode == 0, launcher.stderr + train.stderr
    default, margin, *graces = map(float, launcher.stdout.split())
    assert default == float(train.stdout) == distributed.Options().heartbeat_timeout_s
    # The survivor needs the timeout + 1 s after the dead process's last heartbeat, then time to exit.
    assert margin >= 5
    assert graces == [default + margin, 7 + margin, 120 + margin, default + margin]
