"""One trainer per workdir: a lease file that names its holder, taken by process 0 of a job.

Two trainers on one workdir trample each other (interleaved metrics.jsonl, two TensorBoard files, one removing the
other's half-written checkpoint). The trainer therefore holds `lease.json` in the workdir while it runs.

The file (JSON): host (host name), pid, job (`job_id()`: the scheduler's job id, else a random one), started (UTC,
ISO 8601), renewed_unix_s (the holder's clock at its last renewal, seconds since the epoch), token (random, this
holder's own), boot_id and pid_namespace (Linux; "" elsewhere: which machine and process table the pid belongs to).

Protocol, run by process 0 of a job (`WorkdirLease.acquire`):
  1. Create the file if there is none. Locally `os.open(O_CREAT | O_EXCL)`: of two simultaneous creators exactly one
     succeeds. Object storage (gs://, through `etils.epath`) offers no create-if-absent there: the trainer checks,
     writes, waits `SETTLE_S` and reads the file back; a trainer that no longer finds its token lost the race and
     refuses. Two starters both win only if one of them writes more than `SETTLE_S` after the other's check.
  2. If a lease is there, decide whether its holder is gone: (a) it ran on this machine (same host, boot id and pid
     namespace) and its pid no longer exists (`os.kill(pid, 0)`); (b) its host was restarted since (same host,
     another boot id); (c) it has not renewed the lease for `STALE_AFTER_S` seconds, whatever the storage (the only
     test for holders on other hosts, e.g. a crashed pod job on gs://: hosts' clocks must agree to well within that);
     (d) the file cannot be parsed and is more than `TORN_GRACE_S` old (a creator killed between create and write).
     A gone holder's lease is deleted, if it is still the one judged, and step 1 runs again, with a one-line warning
     naming the old holder. A live holder makes this trainer stop with one line naming it (`LeaseError`).
  3. While it trains, renew the lease every `RENEW_EVERY_S` seconds from a daemon thread (one small read and one
     small write; the training loop is not involved, so long compiles, evaluations and checkpoint writes never let
     it age). Each renewal first checks that the token is still its own: a lease taken over meanwhile (a holder hung
     for `STALE_AFTER_S`, or two takeovers that raced between their check and delete) is never overwritten; `lost`
     then says by whom, and the trainer stops at its next step (process 0; in a multi-process job the watchdog
     then stops the others).
  4. On a clean exit (finished, preempted by SIGTERM, or stopped by an error) delete the lease if its token is
     still there. A process killed outright (SIGKILL, a watchdog abort) leaves it for step 2 to take over.

The other processes of a multi-process job take no lease: they wait at a barrier of the coordination service until
process 0 has taken it (and cleared what a dead run half-wrote, `on_taken`), and stop with its message when it could
not. The holder's pid is process 0's.

Unfinished checkpoints. Orbax writes a checkpoint under `<step>.orbax-checkpoint-tmp-<time>` and renames it when
complete; such a folder found at start is the remnant of a dead run, as no other trainer can be writing while this
one holds the lease. `remove_unfinished_checkpoints` deletes them (pass it as `on_taken`).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping

import jax
from etils import epath

from musenet_jax import distributed, run_dir

LEASE_FILE = "lease.json"
RENEW_EVERY_S = 30.0
STALE_AFTER_S = 300.0  # ten missed renewals
SETTLE_S = 2.0  # object storage: wait between writing a new lease and reading it back (protocol step 1)
TORN_GRACE_S = 10.0  # a creator writes the file right after creating it
UNFINISHED_CHECKPOINT = ".orbax-checkpoint-tmp"  # orbax's marker in the name of a checkpoint being written
_KEY_PREFIX = "musenet/lease/"  # coordination service key of process 0's outcome
_acquire_calls = itertools.count(1)  # every process of a job acquires as often: one key per call


class LeaseError(ValueError):
    """The workdir is held by another live trainer, or the lease cannot be read or written; one-line message."""


def job_id(environ: Mapping[str, str] | None = None) -> str:
    """The scheduler's id of this job (SLURM job and step, Kubernetes JobSet name), else a fresh random one."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        return f"slurm {env['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    if env.get("JOBSET_NAME"):
        return f"jobset {env['JOBSET_NAME']}"
    return uuid.uuid4().hex[:12]


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> dict[str, str]:
    """This process's host, boot and pid namespace: a pid means the same process only where all three agree."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": namespace}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def holder_gone(holder: dict | None, file_age_s: float, now: float, *, stale_after_s: float = STALE_AFTER_S,
                machine: Mapping[str, str] | None = None) -> str | None:
    """Why the holder of a lease is gone (protocol step 2), or None while it may be alive.

    Args:
      holder: the parsed lease file, or None when it cannot be parsed.
      file_age_s: seconds since the file was last written (storage's modification time).
      now: this host's clock, seconds since the epoch.
    """
    if not isinstance(holder, dict):
        return f"unreadable lease file, {file_age_s:.0f} s old" if file_age_s > TORN_GRACE_S else None
    here = _machine() if machine is None else machine
    if holder.get("host") == here["host"]:
        boot = holder.get("boot_id")
        if boot and here["boot_id"] and boot != here["boot_id"]:
            return "its host has restarted since"
        pid = holder.get("pid")
        if (holder.get("pid_namespace", "") == here["pid_namespace"] and isinstance(pid, int) and pid > 0
                and not _pid_alive(pid)):
            return f"no process {pid} on this host"
    renewed = holder.get("renewed_unix_s")
    if not isinstance(renewed, (int, float)):
        renewed = now - file_age_s
    if now - renewed > stale_after_s:
        return f"not renewed for {now - renewed:.0f} s"
    return None


def describe(holder: dict | None, now: float, renewed: bool = True) -> str:
    """'host h, pid 12, job j, started T, renewed 20 s ago' (what a lease file says about its holder)."""
    if not isinstance(holder, dict):
        return "holder unknown: the lease file cannot be read"
    text = ", ".join(f"{k} {holder.get(k, '?')}" for k in ("host", "pid", "job", "started"))
    at = holder.get("renewed_unix_s")
    return text + (f", renewed {max(now - at, 0):.0f} s ago" if renewed and isinstance(at, (int, float)) else "")


class WorkdirLease:
    """The lease on one workdir (module docstring): `acquire()` at start, `release()` at exit, `lost` meanwhile.

    Every process of a job makes one and calls both; only process 0 reads or writes the file.

    Args:
      workdir: the run directory (local or a URL such as gs://...); it must exist when `acquire` runs.
      renew_every_s, stale_after_s: protocol steps 3 and 2, in seconds.
      settle_s: object storage only: protocol step 1, in seconds.
      job: the job's id to record (default `job_id()`).
      process_index, process_count, client: this process in the job and the coordination service client
        (defaults: JAX's); for tests.
    """

    def __init__(self, workdir: str | os.PathLike, *, renew_every_s: float = RENEW_EVERY_S,
                 stale_after_s: float = STALE_AFTER_S, settle_s: float = SETTLE_S, job: str | None = None,
                 process_index: int | None = None, process_count: int | None = None, client=None):
        self.workdir = os.fspath(workdir)
        self.path = run_dir.resolve(workdir) / LEASE_FILE
        self.renew_every_s, self.stale_after_s, self.settle_s = renew_every_s, stale_after_s, settle_s
        self.job = job
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self._client = client
        self.token = uuid.uuid4().hex
        self._started = ""  # UTC, when process 0 took the lease
        self.lost: str | None = None  # set by the renewal thread: why the lease is no longer this trainer's
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start ---------------------------------------------------------------------------------------
    def acquire(self, on_taken: Callable[[], None] | None = None) -> None:
        """Takes the lease on process 0, runs `on_taken` there, and lets every process of the job go on.

        Raises LeaseError (one line, naming the holder) on every process when the workdir is held by a live
        trainer or the lease cannot be written.
        """
        refused = ""
        if self.process_index == 0:
            try:
                self._take()
            except LeaseError as e:
                refused = str(e)
            except Exception as e:  # storage errors (OSError, a cloud client's own): the others wait for a word
                refused = f"cannot take the workdir lease {self.path}: {distributed.first_line(e)}"
            if not refused and on_taken is not None:
                try:
                    on_taken()
                except Exception as e:  # the others wait for this process's word: give them one
                    refused = f"cannot prepare workdir {self.workdir}: {distributed.first_line(e)}"
        refused = self._share(refused)
        if refused:
            self.release()
            raise LeaseError(refused)

    def _take(self) -> None:
        self.job = self.job or job_id()
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        taken_over = ""  # the warning about the gone holder whose lease was deleted, printed once this one holds
        for _ in range(4):  # a lease released or taken over between our reads: look again
            if self._create():
                self._held = True
                if taken_over:
                    print(taken_over, file=sys.stderr, flush=True)
                self._thread = threading.Thread(target=self._renew_loop, name="musenet-lease", daemon=True)
                self._thread.start()
                return
            found = self._read()
            if found is None:
                continue
            raw, holder, age = found
            now = time.time()
            why = holder_gone(holder, age, now, stale_after_s=self.stale_after_s)
            if why is None:
                raise LeaseError(f"workdir {self.workdir} is in use by another trainer ({describe(holder, now)}); "
                                 f"stop it or use another --workdir (if it is gone, delete {self.path}: a lease not "
                                 f"renewed for {self.stale_after_s:.0f} s is taken over)")
            again = self._read()
            if again is None or again[0] != raw:
                continue  # released or taken over meanwhile: judge the new one
            self.path.unlink(missing_ok=True)
            taken_over = (f"warning: took over the workdir lease of a trainer that is gone "
                          f"({describe(holder, now, renewed=False)}: {why})")
        raise LeaseError(f"cannot take the workdir lease {self.path}: other trainers are starting on {self.workdir} "
                         "at the same time")

    def _record(self) -> str:
        machine = _machine()
        return json.dumps({"host": machine["host"], "pid": os.getpid(), "job": self.job, "started": self._started,
                           "renewed_unix_s": time.time(), "token": self.token, "boot_id": machine["boot_id"],
                           "pid_namespace": machine["pid_namespace"]}) + "\n"

    def _create(self) -> bool:
        """Protocol step 1: True when this trainer now holds a new lease file."""
        if run_dir.is_remote(self.path):
            if self.path.exists():
                return False
            self.path.write_text(self._record())
            time.sleep(self.settle_s)
            return self._own()
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[str, dict | None, float] | None:
        """(the lease file's text, its parsed holder or None, its age in seconds), or None if there is none."""
        try:
            raw = self.path.read_text()
            age = max(time.time() - self.path.stat().mtime, 0.0)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None
        return raw, holder if isinstance(holder, dict) else None, age

    def _own(self) -> bool:
        found = self._read()
        return found is not None and isinstance(found[1], dict) and found[1].get("token") == self.token

    def _share(self, refused: str) -> str:
        """Process 0's outcome on every process, after process 0 has it (a no-op in a one-process job)."""
        if self.process_count == 1:
            return refused
        client = self._client
        if client is None:
            from jax._src import distributed as jax_distributed  # the coordination service's key-value store

            client = jax_distributed.global_state.client
        key = f"{_KEY_PREFIX}{next(_acquire_calls)}"
        try:
            if self.process_index == 0:
                client.key_value_set(key, "refused " + refused if refused else "taken")
            else:
                value = client.blocking_key_value_get(key, int(distributed.BARRIER_TIMEOUT_S * 1000))
                refused = f"process 0: {value.removeprefix('refused ')}" if value.startswith("refused ") else ""
        except Exception as e:  # the client raises its runtime's error types
            raise LeaseError(f"process {self.process_index} could not learn whether process 0 took the workdir "
                             f"lease: {distributed.first_line(e)}") from e
        # Process 0 stays until every process has read its outcome (the key-value store lives in process 0).
        distributed.wait_for_all("workdir lease", client=client)
        return refused

    # -- while training ------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            self.renew()
            if self.lost:
                return

    def renew(self) -> None:
        """Protocol step 3: rewrites the lease with the time now, unless it is no longer this trainer's."""
        try:
            found = self._read()
            if found is None or not isinstance(found[1], dict) or found[1].get("token") != self.token:
                now = time.time()
                holder = "nobody" if found is None else describe(found[1], now)
                self.lost = (f"the workdir lease {self.path} was taken over ({holder}): another trainer may be "
                             "writing this workdir; stopping")
                self._held = False
                return
            run_dir.write_text(self.path, self._record())
        except Exception:  # storage unavailable for a moment: the next renewal, well before the lease is stale
            pass

    # -- end -----------------------------------------------------------------------------------------
    def release(self) -> None:
        """Protocol step 4: deletes the lease if this trainer still holds it. Never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if not self._held:
            return
        self._held = False
        try:
            if self._own():
                self.path.unlink(missing_ok=True)
        except OSError as e:
            print(f"warning: could not remove the workdir lease {self.path}: {e.strerror or e}", file=sys.stderr,
                  flush=True)


def remove_unfinished_checkpoints(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Deletes the `*.orbax-checkpoint-tmp*` folders in `checkpoint_dir`, saying so in one line; their names.

    Call only while holding the workdir's lease (module docstring, "Unfinished checkpoints").
    """
    folder = epath.Path(checkpoint_dir)
    if not folder.exists():
        return []
    unfinished = sorted(p for p in folder.iterdir() if UNFINISHED_CHECKPOINT in p.name)
    for p in unfinished:
        if p.is_dir():
            p.rmtree()
        else:
            p.unlink(missing_ok=True)
    names = [p.name for p in unfinished]
    if names:
        print(f"removed {len(names)} unfinished checkpoint{'s' if len(names) > 1 else ''} of an earlier run "
              f"(half-written when it stopped) from {checkpoint_dir}: {', '.join(names)}", file=sys.stderr, flush=True)
    return names
