"""Several training processes as one job: start-up, cluster detection, preemption and failure detection.

Start-up. `initialize(options)` runs before any other JAX use. `--distributed=auto` (the default) calls
`jax.distributed.initialize` when the three explicit flags (--coordinator_address, --num_processes,
--process_id) are given, or when `detect_cluster()` recognises a multi-process cluster from the environment:
a Cloud TPU VM pod worker (TPU_WORKER_HOSTNAMES lists more than one host, or MEGASCALE_COORDINATOR_ADDRESS
is set), a SLURM job with more than one task (SLURM_JOB_ID and SLURM_NTASKS > 1), a Kubernetes indexed Job /
JobSet pod (JOB_COMPLETION_INDEX is set; the replica count is not in the environment, and a 1-replica job
simply starts as a cluster of one). JAX itself then finds the coordinator for those. `on` always initialises
(JAX detects); `off` never does.

Preemption. `PreemptionFlag` turns SIGTERM into a flag instead of death. The trainer asks `any_process(flag)`
after every step: a max over processes of one int32 per device (a jitted all-reduce of 4 bytes per device,
read back to the host). Measured with 2 processes x 4 CPU devices on a 2-core machine at load ~11: 17 ms
median per call, about 1% of that setup's 1.5 s training step of the small test model; it also makes every
process wait for the slowest one at each step, which the next step's collectives do anyway. All processes
therefore see the request after the same step, save a checkpoint of that step together and exit 0; the
restarted job resumes from it (data position included) on the same trajectory. A SIGTERM before training
starts (start-up, restore, first compile) ends the process as usual; JAX's own preemption service is
switched off so that it does not take the signal over.

Starting together. gloo, JAX's CPU collectives, gives the processes 30 s to meet the first time a program
connects a group of devices ("Gloo context initialization failed: DEADLINE_EXCEEDED"), and the time to
compile a program differs between processes (one reads it from the compilation cache, another shares a busy
host). `compile_together(name, jitted, *args)` therefore compiles on this process, then waits at a barrier
of the coordination service (`wait_for_all`) until every process has compiled, so the first run finds its
peers within milliseconds; jit's cache serves the real call with the same argument types. The trainer does
this for the train step, the evaluation step and `any_process` before their first run.

Failure detection. `Watchdog` runs two daemon threads in each process of a multi-process job:
  - heartbeat: every ~timeout/10 s (at most 1 s) it writes a counter and the current step under
    `musenet/heartbeat/<p>` in the coordination service's key-value store, and reads everybody's;
  - checker (no I/O, so it never blocks): a process whose counter has not changed for `timeout_s` is dead or
    hung (SIGKILL, OOM kill, SIGSTOP, a lost machine; one that has never beaten gets 5 x `timeout_s`, as
    processes reach the training loop at different times), and so is the coordinator when the store has not
    answered for `timeout_s`; while armed (during train steps, after the compiling first one), a step that
    makes no progress for `timeout_s` means a collective waits on a process that no longer takes part.
Either way the process prints one line `error: ...` naming the missing process(es) to stderr and leaves
with `os._exit(ABORT_EXIT_CODE)`: no clean-up that could block on the dead peer. JAX's own coordination
heartbeat is set to twice the timeout, as a backstop behind this clearer message. A failing collective
(gloo reports a broken connection at once) waits for the watchdog's verdict for up to the timeout, so the
error still names who is gone. Detection therefore takes between `timeout_s` and `timeout_s` + 1 s.

The coordinator's death. JAX's coordination client ends its process at once with SIGABRT and a long fatal
trace when its connection to the coordination service breaks (its error callback is a C++ `LOG(FATAL)`, and
the hook that would replace it cannot call Python: it aborts on converting the error status). With the
service inside process 0, every other process would die that way the moment process 0 does, before
anything could name it. `initialize` therefore runs process 0's service in a helper child process
(`CoordinationServiceProcess`, only in jobs of more than one process): when process 0 dies the service stays
up, and the others see process 0's heartbeats stop like any other peer's, exit with `ABORT_EXIT_CODE` and
name it. The helper ignores SIGINT and SIGTERM (process 0 handles those and exits in order); it stops when
process 0 shuts JAX down at exit (after JAX's shutdown barrier, so no process still uses the service) and,
when process 0 dies instead, once no process is connected to it any more (Linux, from /proc/net/tcp), at the
latest after JAX's own heartbeat timeout plus `SERVICE_LINGER_MARGIN_S`: by then the service has itself
declared process 0 dead, so no process still needs it. It must not outlive its job: a restarted job's service
binds the same port beside it (gRPC sets SO_REUSEPORT), and the new processes could connect to the old one.
Losing process 0's whole host takes the helper too: the others then still end through JAX's abort.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import jax
import numpy as np

MODES = ("auto", "on", "off")
ABORT_EXIT_CODE = 3  # a peer process is gone: distinct from 1 (a user error) and 2 (bad flags)
_HEARTBEAT_DIR = "musenet/heartbeat/"


class DistributedError(ValueError):
    """Bad distributed flags or a failed start-up; one-line message."""


# -- start-up --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
    """How this process joins a job (the musenet-train flags of the same names).

    Attributes:
      mode: 'auto', 'on' or 'off' (see module docstring).
      coordinator_address: HOST:PORT of process 0's coordination service, or None.
      num_processes: N, processes in the job, or None.
      process_id: this process's index in 0..N-1, or None.
      heartbeat_timeout_s: seconds without a heartbeat or step progress after which a process is declared
        missing and the others stop.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: float = 60.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise DistributedError(f"--distributed must be one of {', '.join(MODES)}, got {self.mode!r}")
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(x is not None for x in explicit) and any(x is None for x in explicit):
            raise DistributedError("--coordinator_address, --num_processes and --process_id go together: "
                                   "give all three or none")
        if self.explicit:
            if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.coordinator_address):
                raise DistributedError(f"--coordinator_address must be HOST:PORT, got {self.coordinator_address!r}")
            if self.num_processes < 1:
                raise DistributedError(f"--num_processes must be >= 1, got {self.num_processes}")
            if not 0 <= self.process_id < self.num_processes:
                raise DistributedError(f"--process_id must be in 0..{self.num_processes - 1}, got {self.process_id}")
            if self.mode == "off":
                raise DistributedError("--distributed=off contradicts --coordinator_address/--num_processes/"
                                       "--process_id")
        if not self.heartbeat_timeout_s > 0:
            raise DistributedError(f"--heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}")

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """A description of the multi-process cluster this process runs in, or None (see module docstring)."""
    env = os.environ if environ is None else environ
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"Cloud TPU pod ({len(hosts)} workers)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU multislice"
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS")
    if env.get("SLURM_JOB_ID") and tasks and tasks.isdigit() and int(tasks) > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} ({tasks} tasks)"
    if env.get("JOB_COMPLETION_INDEX"):
        name = env.get("JOBSET_NAME")
        return f"Kubernetes JobSet {name}" if name else "Kubernetes indexed Job"
    return None


def initialize(options: Options) -> str | None:
    """Joins the job described by `options` (call before any other JAX use).

    Returns a one-line description of the job joined, or None for a single process.
    Raises DistributedError with a one-line message when start-up fails.
    """
    if options.mode == "off":
        return None
    cluster = None if options.explicit else detect_cluster()
    if options.mode == "auto" and not options.explicit and cluster is None:
        return None
    kwargs = {}
    if options.explicit:
        kwargs = dict(coordinator_address=options.coordinator_address, num_processes=options.num_processes,
                      process_id=options.process_id)
    # SIGTERM belongs to `PreemptionFlag`: JAX's preemption notifier would otherwise take over the signal
    # from start-up on (a SIGTERM before training started would be swallowed instead of ending the process).
    jax.config.update("jax_enable_preemption_service", False)
    with _service_in_a_helper_process() as started:
        try:
            jax.distributed.initialize(**kwargs,
                                       heartbeat_timeout_seconds=max(int(2 * options.heartbeat_timeout_s), 2))
        except BaseException as e:
            for service in started:  # nobody joined it
                service.shutdown()
            if not isinstance(e, RuntimeError | ValueError):  # XlaRuntimeError is a RuntimeError
                raise
            where = options.coordinator_address or cluster or "the detected cluster"
            raise DistributedError(f"cannot join the job at {where}: {first_line(e)}") from e
    for service in started:
        atexit.register(_shutdown_at_exit, service)
    return (f"process {jax.process_index()} of {jax.process_count()} "
            f"({cluster or 'coordinator ' + str(options.coordinator_address)}), "
            f"{jax.local_device_count()} local of {jax.device_count()} devices")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type name)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def abort(message: str, code: int = ABORT_EXIT_CODE) -> None:
    """Prints `error: message` on stderr and ends the process at once (no clean-up that could block)."""
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


# -- the coordination service in a helper process --------------------------------------------------
SERVICE_LINGER_MARGIN_S = 5.0  # seconds after JAX's heartbeat timeout: a dead process 0's service stops
SERVICE_START_TIMEOUT_S = 120.0  # importing jaxlib on a busy host; a hung helper must not hang start-up

# The helper's program: jaxlib alone (not jax, not this package), so that it starts in a fraction of a second.
# argv[1]: JSON [bind address, number of processes, the service's keyword arguments, linger seconds].
_SERVICE_PROGRAM = r"""
import json, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent = os.getppid()
address, num_nodes, kwargs, linger_s = json.loads(sys.argv[1])
try:
    from jaxlib import _jax
    service = _jax.get_distributed_runtime_service(address, num_nodes, **kwargs)
except Exception as e:
    lines = str(e).strip().splitlines()
    print("error:", lines[0] if lines else type(e).__name__, flush=True)
    sys.exit(1)
print("ready", flush=True)

def connected():  # established connections to the service; None where the system does not tell
    port, count, known = f":{int(address.rsplit(':', 1)[1]):04X}", 0, False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [row.split() for row in f.read().splitlines()[1:]]
        except OSError:
            continue
        known = True
        count += sum(row[1].endswith(port) and row[3] == "01" for row in rows)
    return count if known else None

while True:
    readable, _, _ = select.select([0], [], [], 0.5)
    data = os.read(0, 64) if readable else b""
    if b"stop" in data:
        service.shutdown()
        os._exit(0)
    if readable or os.getppid() != parent:  # end of file or a new parent: process 0 died
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and connected() != 0:
            time.sleep(0.5)
        os._exit(0)  # without shutdown(): it would wait for clients that are gone
"""


class CoordinationServiceProcess:
    """JAX's coordination service running in a helper child process of process 0 (see module docstring).

    Stands in for jaxlib's `DistributedRuntimeService`, whose only method is `shutdown()`.
    Raises RuntimeError (one line) if the service does not start within `SERVICE_START_TIMEOUT_S` seconds.
    """

    def __init__(self, address: str, num_nodes: int, **kwargs):
        linger_s = float(kwargs.get("heartbeat_timeout") or 100) + SERVICE_LINGER_MARGIN_S  # 100: JAX's default
        # stderr is dropped: the helper may outlive process 0, and must not hold its output pipes open then.
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVICE_PROGRAM,
                                       json.dumps([address, num_nodes, kwargs, linger_s])],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        status = ""
        readable, _, _ = select.select([self._proc.stdout], [], [], SERVICE_START_TIMEOUT_S)
        if readable:
            status = self._proc.stdout.readline().decode(errors="replace").strip()
        self._proc.stdout.close()
        if status != "ready":
            self._proc.kill()
            code = self._proc.wait()
            raise RuntimeError(f"the coordination service on {address} did not start: "
                               f"{status.removeprefix('error: ') or f'its process ended with code {code}'}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops the service and waits up to `timeout_s` seconds for its process to end (then kills it)."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(b"stop")
                self._proc.stdin.close()
            except OSError:  # it ended meanwhile
                pass
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class _JaxlibWithServiceProcess:
    """jaxlib's `_jax` module as `jax.distributed` uses it, except that a service of more than one process
    starts in a `CoordinationServiceProcess`."""

    def __init__(self, module, started: list[CoordinationServiceProcess]):
        self._module, self._started = module, started

    def __getattr__(self, name):
        return getattr(self._module, name)

    def get_distributed_runtime_service(self, address, num_nodes, **kwargs):
        if num_nodes < 2:  # nobody to survive process 0
            return self._module.get_distributed_runtime_service(address, num_nodes, **kwargs)
        service = CoordinationServiceProcess(address, num_nodes, **kwargs)
        self._started.append(service)
        return service


@contextlib.contextmanager
def _service_in_a_helper_process() -> Iterator[list[CoordinationServiceProcess]]:
    """Within: `jax.distributed.initialize` starts process 0's service in a helper process; yields the list of
    those started. Without the private module attribute it patches (another JAX version), JAX's own service."""
    from jax._src import distributed as jax_distributed

    started: list[CoordinationServiceProcess] = []
    module = getattr(jax_distributed, "_jax", None)
    if module is None or not hasattr(module, "get_distributed_runtime_service"):
        yield started
        return
    jax_distributed._jax = _JaxlibWithServiceProcess(module, started)
    try:
        yield started
    finally:
        jax_distributed._jax = module


def _shutdown_at_exit(service: CoordinationServiceProcess) -> None:
    # The client first: its shutdown is a barrier of every process, after which none uses the service. Left
    # to interpreter teardown, the client's destructor could run after the service had stopped.
    try:
        jax.distributed.shutdown()
    except Exception:  # a peer already gone: the service must stop all the same
        pass
    finally:
        service.shutdown()


# -- preemption ------------------------------------------------------------------------------------
class PreemptionFlag:
    """Records SIGTERM (and Ctrl-C's SIGINT) instead of dying, until `restore()`. Install from the main thread.

    A second SIGINT raises KeyboardInterrupt at once: whoever presses Ctrl-C twice does not want to wait for
    the step and its checkpoint.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("interrupted: stopping after this step with a checkpoint (Ctrl-C again to stop at once, "
                  "without it)", file=sys.stderr, flush=True)
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def any_process(flag: bool, mesh: jax.sharding.Mesh) -> bool:
    """True on every process if `flag` is True on any process (a jitted max; see module docstring)."""
    if jax.process_count() == 1:
        return bool(flag)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    local = np.full((len(mesh.local_devices),), int(flag), np.int32)
    flags = jax.make_array_from_process_local_data(sharding, local, (mesh.size,))
    if mesh not in _max_compiled:
        compile_together("any_process", _global_max, flags)
        _max_compiled.add(mesh)
    return bool(_global_max(flags))


@jax.jit
def _global_max(x):
    return x.max()


_max_compiled: set[jax.sharding.Mesh] = set()


# -- starting together -----------------------------------------------------------------------------
BARRIER_TIMEOUT_S = 3600.0  # a dead peer is the watchdog's to report, long before; this bounds the rest
_barrier_calls: collections.Counter[str] = collections.Counter()


def wait_for_all(name: str, timeout_s: float = BARRIER_TIMEOUT_S, *, client=None) -> None:
    """Blocks until every process of the job has called `wait_for_all(name)` as many times as this one.

    A barrier of the coordination service (its key-value store, no device collective); a no-op in a
    single-process run. Raises DistributedError (one line, naming the barrier) if it fails or times out.
    """
    if client is None:
        if jax.process_count() == 1:
            return
        from jax._src import distributed as jax_distributed  # the coordination service client

        client = jax_distributed.global_state.client
    _barrier_calls[name] += 1
    barrier_id = f"musenet/{name}/{_barrier_calls[name]}"
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as e:  # the client raises its runtime's error types
        raise DistributedError(f"processes did not all reach {name!r} within {timeout_s:g} s: "
                               f"{first_line(e)}") from e


def compile_together(name: str, jitted, *args, **kwargs) -> None:
    """Compiles `jitted` for these arguments (arrays or `jax.ShapeDtypeStruct`s with shardings), then
    `wait_for_all(name)`: the first run of the program then starts on every process at once (module
    docstring, "Starting together"). Call it inside the same mesh context as the run itself.
    """
    jitted.lower(*args, **kwargs).compile()
    wait_for_all(name)


# -- failure detection -----------------------------------------------------------------------------
class Watchdog:
    """Heartbeats and step-progress watching of a multi-process job (see module docstring).

    Use as a context manager around the training loop; `progress(step)` after each step, `arm()` /
    `disarm()` around the parts that must make progress within the timeout.
    """

    def __init__(self, timeout_s: float, *, process_index: int | None = None, process_count: int | None = None,
                 client=None, on_failure=abort):
        self.timeout_s = float(timeout_s)
        self.startup_grace_s = 5 * self.timeout_s
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if client is None and self.process_count > 1:
            from jax._src import distributed as jax_distributed  # the coordination service's key-value store

            client = jax_distributed.global_state.client
        self._client = client
        self._on_failure = on_failure
        self._interval = min(1.0, self.timeout_s / 10)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        now = time.monotonic()
        self._step = 0
        self._beats = 0
        self._armed = False
        self._last_progress = now
        self._last_contact = now
        self._contact_error = ""
        self._peers = {q: ("", now) for q in range(self.process_count) if q != self.process_index}
        self._peer_steps = {q: -1 for q in self._peers}
        self._threads: list[threading.Thread] = []
        self.failure: str | None = None

    @property
    def active(self) -> bool:
        return self._client is not None and self.process_count > 1

    def start(self) -> Watchdog:
        if self.active and not self._threads:
            self._threads = [threading.Thread(target=self._heartbeat_loop, name="musenet-heartbeat", daemon=True),
                             threading.Thread(target=self._check_loop, name="musenet-watchdog", daemon=True)]
            for t in self._threads:
                t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * self._interval + 1)
        self._threads = []

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def progress(self, step: int) -> None:
        with self._lock:
            self._step, self._last_progress = step, time.monotonic()

    def arm(self) -> None:
        with self._lock:
            self._armed, self._last_progress = True, time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def wait_for_verdict(self) -> None:
        """Blocks up to the timeout (plus a beat) for the checker to find a missing process.

        For a collective that failed: if a peer is gone the process ends with the watchdog's message;
        otherwise this returns and the caller reports the original error.
        """
        if not self.active or not self._threads:
            return
        self.disarm()
        self._stop.wait(self.timeout_s + 2 * self._interval + 1)

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self._interval)

    def beat(self, now: float | None = None) -> None:
        """Publishes this process's heartbeat and reads everybody's (`now`: monotonic time, for tests)."""
        self._beats += 1
        try:
            self._client.key_value_set(f"{_HEARTBEAT_DIR}{self.process_index}", f"{self._beats} {self._step}",
                                       allow_overwrite=True)
            entries = self._client.key_value_dir_get(_HEARTBEAT_DIR)
        except Exception as e:  # any failure of the store means no contact
            with self._lock:
                self._contact_error = first_line(e)
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._last_contact, self._contact_error = now, ""
            for k, value in entries:
                q = int(k.rsplit("/", 1)[-1])
                if q in self._peers and self._peers[q][0] != value:
                    self._peers[q] = (value, now)
                    self._peer_steps[q] = int(value.split()[1])

    def _check_loop(self) -> None:
        while not self._stop.wait(self._interval / 2):
            message = self.check(time.monotonic())
            if message:
                self.failure = message
                self._on_failure(message)
                return

    def check(self, now: float) -> str | None:
        """The failure message if a process is missing at monotonic time `now`, else None."""
        t = self.timeout_s
        me = f"process {self.process_index} of {self.process_count}"
        with self._lock:
            if now - self._last_contact > t:
                detail = f": {self._contact_error}" if self._contact_error else ""
                return (f"{me} lost contact with the coordinator (process 0) for {t:.0f} s{detail}; "
                        "process 0 died or hung; stopping")
            # A peer that has not beaten yet may still be importing or compiling (start-up skew between
            # processes): it gets `startup_grace_s` (JAX's own heartbeat still ends a job whose peer died early).
            silent = sorted(q for q, (value, seen) in self._peers.items()
                            if now - seen > (t if value else max(t, self.startup_grace_s)))
            if silent:
                names = ", ".join(f"process {q} (last step {self._peer_steps[q]})" for q in silent)
                return f"{names} sent no heartbeat for {t:.0f} s: died or hung; stopping {me}"
            if self._armed and now - self._last_progress > t:
                behind = sorted(q for q, s in self._peer_steps.items() if s < self._step)
                who = (", ".join(f"process {q} (at step {self._peer_steps[q]})" for q in behind)
                       if behind else "another process")
                return (f"{me}: step {self._step + 1} made no progress for {t:.0f} s; it waits on {who} "
                        "that no longer takes part in the collectives; stopping")
        return None
