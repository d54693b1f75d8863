"""Multi-process training fixtures: the small `directory` dataset, a very small model, and process helpers.

Processes run `python -m launch.train` (through `python -m launch.launch_local` or as direct subprocesses)
with the config given as flags on top of configs/tiny.py, so every process reads the same run config.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 420  # one training process on this loaded 2-core machine: generous on purpose

# d_model 32, 2 layers, seq 64, global batch 8; evaluation kept tiny so the runs are about training.
SMALL = ("--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.head_dim=16",
         "--config.model.mlp_dim=64", "--config.model.num_layers=2", "--config.model.attention_stride=8",
         "--config.data.name=directory", "--config.data.seq_len=64", "--config.data.eval_split=train",
         "--config.train.batch_size=8", "--config.train.warmup_steps=2", "--config.train.log_every=1",
         "--config.train.learning_rate=3e-3", "--config.eval.batch_size=8", "--config.eval.every_steps=1000",
         "--config.eval.max_batches=1", "--config.checkpoint.max_to_keep=10")


def train_args(data_dir, workdir, *, steps: int, mesh=(2, 2, 2), checkpoint_every: int = 2, extra=()):
    """`python -m launch.train` with the small config."""
    data, fsdp, tensor = mesh
    return [sys.executable, "-m", "launch.train", "--config", str(REPO / "configs" / "tiny.py"), *SMALL,
            f"--config.train.total_steps={steps}", f"--config.checkpoint.every_steps={checkpoint_every}",
            f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
            f"--workdir={workdir}", f"--data_dir={data_dir}", *extra]


def env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def launch_args(num_processes: int, devices: int, command):
    return [sys.executable, "-m", "launch.launch_local", f"--num_processes={num_processes}",
            f"--devices_per_process={devices}", "--grace_s=20", "--", *command]


def run(command, devices: int = 8, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    res = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env(devices))
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir) -> dict[int, float]:
    """step -> train loss from process 0's metrics.jsonl (appended across resumes)."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


class Running:
    """A started process whose merged output a thread collects line by line; triggers act on given lines."""

    def __init__(self, command, devices: int):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env=env(devices), bufsize=1)
        self.lines: list[str] = []
        self._triggers: list = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            with self._changed:
                self.lines.append(line)
                fired = [t for t in self._triggers if t[0](line)]
                self._triggers = [t for t in self._triggers if t not in fired]
                self._changed.notify_all()
            for _, action in fired:
                action(self)
        with self._changed:
            self.lines.append("")  # end of output
            self._changed.notify_all()

    def when(self, predicate, action) -> None:
        """Runs `action(self)` (once, on the reader thread) for the first later line satisfying `predicate`."""
        with self._changed:
            self._triggers.append((predicate, action))

    def wait_for(self, predicate, timeout: float = TIMEOUT_S) -> str:
        """Waits until some output line satisfies `predicate`; returns it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if line == "":
                        raise AssertionError(f"exited ({self.proc.wait()}) before the expected line:\n" + self.output)
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if not self._changed.wait(timeout=max(deadline - time.monotonic(), 0)) and \
                        time.monotonic() >= deadline:
                    raise AssertionError("timed out waiting for a line:\n" + self.output)

    def finish(self, timeout: float = TIMEOUT_S) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    @property
    def output(self) -> str:
        return "".join(self.lines)
