r"""musenet-launch: run N processes of one multi-process JAX job on this machine (development and tests).

    musenet-launch --num_processes=2 --devices_per_process=4 -- \
        musenet-train --config=configs/tiny.py --workdir=runs/tiny2x4 --data_dir=data

Starts N copies of the command after `--`, each with D CPU devices (JAX_NUM_CPU_DEVICES=D, JAX_PLATFORMS=cpu
unless already set) and `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` appended,
in its own process group. Every output line of process I is forwarded as `[pI] line` (stdout and stderr
merged); the launcher's own lines start with `[launch]`, and the first ones give each process's pid.

Failure handling: when one process exits non-zero the launcher stops the others (SIGTERM, then SIGKILL after
--grace_s seconds) and exits with that process's code (128 + signal number if a signal ended it). On its own
SIGTERM or SIGINT it forwards SIGTERM to every process and waits for them (musenet-train then saves a
checkpoint and exits 0); a second signal kills them. Exits 0 when every process exits 0. When all have
ended, whatever is left in their process groups is killed (e.g. the coordination service's helper process
that a dead process 0 leaves behind, see musenet_jax/distributed.py), so that a restart finds the port free.

The grace period. A musenet-train process whose peer died names the missing process (one `error:` line,
exit code 3) only after its --heartbeat_timeout_s; while it waits, a SIGTERM just asks it for a checkpoint
that the dead peer prevents. A grace period shorter than that timeout would kill it before it says who
died, so by default --grace_s is the command's --heartbeat_timeout_s (musenet-train's default when the
command gives none) plus `GRACE_MARGIN_S`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from launch import cli

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes to start (N).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices of each process (D).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: pick a free one).")

TRAIN_HEARTBEAT_TIMEOUT_S = 60.0  # musenet-train's --heartbeat_timeout_s default, seconds
# Seconds beyond the heartbeat timeout: detection takes up to the timeout + 1 s after the peer's last beat,
# and a busy host delays the survivor's exit further.
GRACE_MARGIN_S = 15.0

_GRACE = flags.DEFINE_float("grace_s", None, "Seconds between SIGTERM and SIGKILL when stopping processes "
                            "after one failed. Default: the command's --heartbeat_timeout_s (musenet-train's "
                            f"default, {TRAIN_HEARTBEAT_TIMEOUT_S:g}, when it gives none) + {GRACE_MARGIN_S:g}, "
                            "so that musenet-train's survivors name the dead process before they are killed.")

_print_lock = threading.Lock()


def _say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(index: int, stream) -> None:
    """Copies a child's output line by line with its `[pI]` prefix."""
    for line in iter(stream.readline, ""):
        with _print_lock:
            sys.stdout.write(f"[p{index}] {line if line.endswith(chr(10)) else line + chr(10)}")
            sys.stdout.flush()
    stream.close()


def default_grace_s(command: list[str]) -> float:
    """The default --grace_s, in seconds, for `command`: its --heartbeat_timeout_s (the last one given, as
    absl reads it; `TRAIN_HEARTBEAT_TIMEOUT_S` without one) + `GRACE_MARGIN_S`."""
    timeout = TRAIN_HEARTBEAT_TIMEOUT_S
    for i, arg in enumerate(command):
        name, equals, value = arg.partition("=")
        if not name.startswith("-") or name.lstrip("-") != "heartbeat_timeout_s":
            continue
        if not equals:
            value = command[i + 1] if i + 1 < len(command) else ""
        try:
            timeout = float(value)
        except ValueError:  # the command will complain itself
            pass
    return timeout + GRACE_MARGIN_S


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Job:
    """The N child processes and their output threads."""

    def __init__(self, command: list[str], num_processes: int, devices: int, port: int):
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        address = f"127.0.0.1:{port}"
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"}
        env.setdefault("JAX_PLATFORMS", "cpu")
        for i in range(num_processes):
            argv = [*command, f"--coordinator_address={address}", f"--num_processes={num_processes}",
                    f"--process_id={i}"]
            try:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, env=env, start_new_session=True)
            except OSError as e:
                self.signal_all(signal.SIGKILL)
                raise cli.UsageError(f"cannot start {command[0]!r}: {e.strerror or e}") from e
            self.procs.append(proc)
            _say(f"[launch] process {i} of {num_processes}: pid {proc.pid}, {devices} CPU devices, "
                 f"coordinator {address}")
            thread = threading.Thread(target=_forward, args=(i, proc.stdout), daemon=True)
            thread.start()
            self.threads.append(thread)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM to every running process, SIGKILL to those still running after `grace_s`."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):
            _say(f"[launch] still running {grace_s:g} s after SIGTERM: sending SIGKILL")
            self.signal_all(signal.SIGKILL)
        self.wait()

    def wait(self) -> None:
        """Waits for every process, then kills what is left in their groups (each started its own session):
        leftovers may hold the output pipes open, and the port (module docstring)."""
        for proc in self.procs:
            proc.wait()
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # an empty group: nothing left
                pass
        for thread in self.threads:
            thread.join(timeout=5)


def main(argv):
    command = argv[1:]
    if not command:
        raise cli.UsageError("no command: put it after `--`, e.g. musenet-launch --num_processes=2 -- "
                             "musenet-train --config=...")
    if _NUM_PROCESSES.value is None or _NUM_PROCESSES.value < 1:
        raise cli.UsageError(f"--num_processes must be given and >= 1, got {_NUM_PROCESSES.value}")
    if _DEVICES.value < 1:
        raise cli.UsageError(f"--devices_per_process must be >= 1, got {_DEVICES.value}")
    if not 0 <= _PORT.value < 65536:
        raise cli.UsageError(f"--port must be in 0..65535, got {_PORT.value}")
    if _GRACE.value is not None and _GRACE.value < 0:
        raise cli.UsageError(f"--grace_s must be >= 0, got {_GRACE.value}")
    grace_s = default_grace_s(command) if _GRACE.value is None else _GRACE.value

    signals = {"count": 0}

    def on_signal(signum, frame):
        del frame
        signals["count"] += 1
        signals["name"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    job = Job(command, _NUM_PROCESSES.value, _DEVICES.value, _PORT.value or _free_port())
    forwarded = 0
    failed: tuple[int, int] | None = None
    while True:
        if signals["count"] > forwarded:
            forwarded = signals["count"]
            if forwarded == 1:
                _say(f"[launch] {signals['name']}: forwarding SIGTERM to every process and waiting")
                job.signal_all(signal.SIGTERM)
            else:
                _say(f"[launch] {signals['name']} again: killing every process")
                job.signal_all(signal.SIGKILL)
        codes = [p.poll() for p in job.procs]
        if failed is None and not forwarded:
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                _say(f"[launch] process {failed[0]} exited with code {_exit_code(failed[1])}: stopping the others "
                     f"(SIGTERM, then SIGKILL after {grace_s:g} s)")
                job.stop(grace_s)
                break
        if all(c is not None for c in codes):
            break
        time.sleep(0.1)
    job.wait()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(job.procs) if p.returncode != 0), None)
    if failed is not None:
        sys.exit(_exit_code(failed[1]))
    _say(f"[launch] all {len(job.procs)} processes exited 0")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
