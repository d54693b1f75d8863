"""A run's checkpoints: orbax saves checked by a manifest, restore with fallback, save failures at once.

    saves = Checkpoints(workdir, config)                  # orbax's CheckpointManager on <workdir>/checkpoints
    step, restored = saves.restore_newest(restore, mesh)  # the newest checkpoint that verifies and reads
    saves.save(step, args)                                # each step boundary: saves.failure() -> None or a line
    saves.finish(); saves.close()

Manifest. Each checkpoint folder `<workdir>/checkpoints/<step>/` saved here holds a manifest of its files in
parts, `manifest.<p>-of-<P>.json`, one for each process p of the P that saved it:
{"format", "folder": "<step>", "process": p, "processes": P, "count": files in the folder, "files": {relative path:
{"bytes", "crc32"}} for p's share}. The protocol:
  1. Save. Orbax writes the step's items under a temporary name and renames the folder once every process's
     files are written (its finalize). A background thread of each process waits for that, lists the folder's
     files (sorted relative paths, manifest parts left out), hashes every P-th of them from its own index p
     and writes its part atomically (`run_dir.write_json`: a temporary name and a rename). The next save, and
     the end of the run, wait for it. Reading back what was just written costs one pass over the bytes, split
     over the processes.
  2. Complete: all P parts are there, agree on P and on the count, and cover that many distinct files.
  3. Verify (resume, export, evaluation): each of the Q processes that read the checkpoint checks every Q-th
     file of the manifest: its size, then its CRC-32 (zlib) streamed in BLOCK_BYTES blocks over a few
     threads; the processes agree on the verdict. A checkpoint without a complete manifest (saved before
     manifests were written, or by a run stopped between its save and its manifest) is read unverified, with
     a one-line note.
A CRC-32 finds torn, truncated and overwritten data, not deliberate tampering, at about the speed the bytes
are read (benchmarks/checkpoint_verify.py).

Fallback. `restore_newest` tries the newest checkpoint first. One that fails verification, or that orbax
cannot read, is skipped and the next older one tried. Once one restores, each skipped one is renamed
`<step>.damaged` (`.damaged-2`, ...) beside it and named in one line with the reason: its files are kept,
never deleted, and orbax no longer lists it, so it is not restored again, not collected by max_to_keep and
not in the way of the next save of that step. When none restores, nothing is renamed and the run stops with
one line naming each failure. `last_good` is the newest checkpoint verified by this process (restored after
its manifest checked out, or saved with this process's part of the manifest), else one restored unverified.

Save failures. Orbax commits an asynchronous save in background threads; a failure there (storage full or
read-only, the folder removed) shows in `failure()` as soon as it happens, one line naming the path and the OS
error; the trainer checks it after every step, and all processes stop after the same one (they vote on it as
on a SIGTERM: `distributed.any_process`). A process whose save failed also posts its line in the coordination
service's key-value store, where the others look while they wait for that save (orbax's commit waits at a
barrier for every process), and a multi-process run then ends at once on every process (`distributed.abort`,
exit code 1) rather than waiting for that barrier to time out. Orbax's own logs of the failure (a traceback
from each thread) are dropped unless absl logging is verbose (-v 0), and so are the "Event loop is closed"
errors that tensorstore reports when a read or write ends after orbax gave its event loop up. Every wait is
bounded: the step folder is created before `save` returns (created in the background, a failure left orbax's
writers waiting 300 s for its signal), orbax's commit times out after SAVE_TIMEOUT_S, and `finish` waits at
most twice that for the save and its manifest.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from musenet_jax import distributed, run_dir

DIRECTORY = "checkpoints"
MANIFEST_FORMAT = "musenet-checkpoint-manifest-v1"
_PART = re.compile(r"manifest\.(\d+)-of-(\d+)\.json")
BLOCK_BYTES = 8 << 20  # a read's size: large enough for object storage, small enough to stay in cache
HASH_THREADS = 8  # files read at once: reads and zlib.crc32 release the GIL
SAVE_TIMEOUT_S = 1200  # orbax's own default for a commit; a pod-size save takes minutes
POLL_S = 0.5  # while waiting for a save: how often to look for another process's failure
_FAILED_KEY = "musenet/checkpoint-failed/"  # coordination service keys: a process's failed save, its line
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved, or no checkpoint that can be restored; one-line message."""


class DamagedCheckpoint(Exception):
    """What a restore function raises for a checkpoint it cannot read: `restore_newest` tries an older one."""


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Orbax's CheckpointManager on `<workdir>/checkpoints` with the run's settings and bounded waits."""
    # Step folders created before save() returns: an error there is raised at once, not left to time out.
    async_options = ocp.AsyncOptions(timeout_secs=SAVE_TIMEOUT_S, create_directories_asynchronously=False)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.max_to_keep, enable_async_checkpointing=config.checkpoint.async_save,
        create=True, async_options=async_options)
    return ocp.CheckpointManager(run_dir.resolve(workdir) / DIRECTORY, options=options)


# -- manifest --------------------------------------------------------------------------------------
def part_name(index: int, count: int) -> str:
    return f"manifest.{index}-of-{count}.json"


def _is_manifest(name: str) -> bool:
    # `run_dir.write_json` writes a part as `.<name>.<random>.partial` first: another process may list it.
    return _PART.fullmatch(name) is not None or name.startswith(".manifest.")


def list_files(step_dir: epath.Path) -> list[str]:
    """The relative paths ('/'-separated) of the files under a checkpoint folder, sorted, manifest left out."""
    base, files = os.fspath(step_dir).rstrip("/"), []
    for root, _, names in step_dir.walk():
        rel = os.fspath(root)[len(base):].strip("/")
        files += [f"{rel}/{n}" if rel else n for n in names if rel or not _is_manifest(n)]
    return sorted(files)


def digest(path: epath.Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in blocks of BLOCK_BYTES."""
    crc = size = 0
    with path.open("rb") as f:
        while block := f.read(BLOCK_BYTES):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def _map(fn: Callable, items: list) -> list:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(min(HASH_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def write_manifest(step_dir: epath.Path, index: int = 0, count: int = 1) -> int:
    """Writes process `index` of `count`'s part of the folder's manifest (module docstring); returns the
    bytes it hashed."""
    files = list_files(step_dir)
    share = files[index::count]
    sizes = _map(lambda rel: digest(step_dir / rel), share)
    part = {"format": MANIFEST_FORMAT, "folder": step_dir.name, "process": index, "processes": count,
            "count": len(files), "files": {rel: {"bytes": n, "crc32": c} for rel, (n, c) in zip(share, sizes)}}
    run_dir.write_json(step_dir / part_name(index, count), part)
    return sum(n for n, _ in sizes)


def read_manifest(step_dir: epath.Path) -> tuple[dict[str, tuple[int, int]] | None, str]:
    """({relative path: (bytes, CRC-32)}, "") of a checkpoint's complete manifest, or (None, what it lacks).

    Raises DamagedCheckpoint for a part that cannot be read or parts that contradict each other.
    """
    try:
        names = [n for n in (p.name for p in step_dir.iterdir()) if _PART.fullmatch(n)]
    except OSError as e:
        raise DamagedCheckpoint(describe_error(e)) from None
    if not names:
        return None, "no manifest (saved before manifests were written, or by a run stopped before writing it)"
    files: dict[str, tuple[int, int]] = {}
    shape = set()
    for name in sorted(names):
        try:
            part = json.loads((step_dir / name).read_text())
            shape.add((part["format"], part["processes"], part["count"]))
            files.update({rel: (int(v["bytes"]), int(v["crc32"])) for rel, v in part["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedCheckpoint(f"{name}: unreadable ({describe_error(e)})") from None
    if len(shape) > 1 or next(iter(shape))[0] != MANIFEST_FORMAT:
        raise DamagedCheckpoint(f"its manifest parts disagree ({', '.join(sorted(names))})")
    _, processes, count = next(iter(shape))
    if len(names) < processes:
        return None, (f"an incomplete manifest ({len(names)} of {processes} parts: a run stopped while writing "
                      "it)")
    if len(names) > processes or len(files) != count:
        raise DamagedCheckpoint(f"its manifest lists {len(files)} files in {len(names)} parts, not {count} in "
                                f"{processes}")
    return files, ""


def verify(step_dir: epath.Path, files: dict[str, tuple[int, int]], index: int = 0, count: int = 1) -> str | None:
    """The first problem in process `index` of `count`'s share of a checkpoint's files (every `count`-th of
    the manifest's, sorted), or None when each has the size and CRC-32 the manifest gives."""

    def check(rel: str) -> str | None:
        want_bytes, want_crc = files[rel]
        try:
            if (length := (step_dir / rel).stat().length) != want_bytes:
                return f"{rel}: {length} bytes, the manifest says {want_bytes}"
            size, crc = digest(step_dir / rel)
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as e:
            return f"{rel}: unreadable ({describe_error(e)})"
        if size != want_bytes:
            return f"{rel}: {size} bytes, the manifest says {want_bytes}"
        if crc != want_crc:
            return f"{rel}: contents differ from the manifest (CRC-32 {crc:08x}, expected {want_crc:08x})"
        return None

    return next((p for p in _map(check, sorted(files)[index::count]) if p), None)


def check_checkpoint(step_dir: epath.Path) -> tuple[str | None, str]:
    """(the problem found, or None; a note for a checkpoint read unverified, else "") of all of a checkpoint's
    files, in this process alone (export, evaluation)."""
    try:
        files, note = read_manifest(step_dir)
    except DamagedCheckpoint as e:
        return str(e), ""
    if files is None:
        return None, note
    return verify(step_dir, files), ""


# -- errors ----------------------------------------------------------------------------------------
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_STATUS = re.compile(r"[A-Z][A-Z_]+: ")
_QUOTED_PATH = re.compile(r'"((?:/|[a-z][a-z0-9+.-]*://)[^"]+)"')


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what caused it, outermost first."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def describe_error(error: BaseException) -> str:
    """One line with the file and the OS error of a failed checkpoint read or write, as far as `error` (or
    what caused it) tells them; else its first 300 characters."""
    chain = _chain(error)
    for e in chain:  # an OSError anywhere in the chain: the clearest
        if isinstance(e, OSError) and e.strerror:
            return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    # Orbax wraps tensorstore's error ("OUT_OF_RANGE: Error reading ...") in one that prints a whole spec.
    error = next((e for e in chain if _STATUS.match(str(e))), error)
    text = " ".join(str(error).split()) or type(error).__name__
    if code := _OS_ERROR_CODE.search(text):  # tensorstore: the OS error is a code in its message
        paths = _QUOTED_PATH.findall(text)
        reason = os.strerror(int(code.group(1)))
        return f"{paths[-1]}: {reason}" if paths else f"{reason} ({text[:200]})"
    return text[:300]


# Errors of orbax's asynchronous commits, taken from its log records, in order. Its CheckpointManager raises a
# failed commit only after its finalize thread has passed a barrier of all processes: when the save failed on
# this process alone, that waits for the others to time out (SAVE_TIMEOUT_S). The log record comes at once.
_commit_errors: list[BaseException] = []


class _OrbaxFailureLogs(logging.Filter):
    """Drops orbax's ERROR records, a traceback per thread for one failed save or read, and asyncio's about
    the tasks of orbax's that failed with it ("Task exception was never retrieved"): this module reports each
    failure in one line. Kept when absl logging is verbose (INFO or lower, `-v 0`). Notes the error of a
    failed commit in `_commit_errors` either way."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.name == "absl" and record.funcName == "_thread_func" and record.levelno >= logging.ERROR
                and record.exc_info and record.exc_info[1] is not None):
            _commit_errors.append(record.exc_info[1])
        if record.levelno < logging.ERROR or logging.getLogger("absl").getEffectiveLevel() < logging.WARNING:
            return True
        orbax = f"{os.sep}orbax{os.sep}"
        return orbax not in (record.pathname if record.name == "absl" else record.getMessage())


_quiet_installed = False


def quiet_failures() -> None:
    """Installs (once) the filter of orbax's failure logs and the hook that drops the "Event loop is closed"
    errors of reads and writes that end after orbax closed their event loop (module docstring)."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxFailureLogs())
    previous = sys.unraisablehook

    def hook(unraisable):
        # Orbax runs each checkpoint read or write in an event loop it closes when the first part fails;
        # tensorstore's callbacks for the parts still in flight then find the loop closed. Nothing is lost.
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


# -- a run's checkpoints ---------------------------------------------------------------------------
def _client():
    """The JAX coordination service's client in a multi-process job, else None."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _peer_trouble(error: BaseException) -> bool:
    """Whether a failed save is another process's trouble, not storage's: in a multi-process job, an error of
    JAX's runtime (a collective or barrier whose peer is gone) anywhere in its chain. The watchdog names the
    process (`distributed.Watchdog`); reported as a failed save, it would be blamed on the storage."""
    return jax.process_count() > 1 and any(isinstance(e, jax.errors.JaxRuntimeError) for e in _chain(error))


def _publish_failure(line: str) -> None:
    if (client := _client()) is not None:
        try:
            client.key_value_set(f"{_FAILED_KEY}{jax.process_index()}", line, allow_overwrite=True)
        except Exception:
            pass  # the others still learn of it at the next step's vote


def _peer_failure() -> str | None:
    """The line of a save that failed on another process of this job, if one did."""
    if (client := _client()) is None:
        return None
    try:
        entries = client.key_value_dir_get(_FAILED_KEY)
    except Exception:
        return None
    for key, line in sorted(entries):
        if (p := int(key.rsplit("/", 1)[-1])) != jax.process_index():
            return f"{line} (process {p})"
    return None


class Checkpoints:
    """The checkpoints in `<workdir>/checkpoints` as one process of a run sees them (module docstring).

    Every process of a multi-process run makes one and calls its methods at the same points, like orbax's
    CheckpointManager (`manager`), which it holds.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        quiet_failures()
        self.manager = manager(workdir, config)
        self.directory = self.manager.directory
        self._pending: threading.Thread | None = None
        self._pending_step: int | None = None
        self._commit_errors_seen = 0
        self._failure: str | None = None
        self._verified: set[int] = set()
        self._unverified: int | None = None  # the step restored without a manifest

    def latest_step(self) -> int | None:
        """The newest checkpoint's step (verified or not), None without any."""
        return self.manager.latest_step()

    # -- save
    def save(self, step: int, args: ocp.args.Composite) -> None:
        """Starts saving `args` as checkpoint `step` (asynchronously if the manager is); CheckpointError when
        the previous save failed or this one cannot start."""
        self.finish()
        self._commit_errors_seen = len(_commit_errors)
        try:
            self.manager.save(step, args=args)
        except Exception as e:
            if _peer_trouble(e):
                raise  # the trainer waits for the watchdog to name the process that is gone
            self._fail(step, e)
            raise CheckpointError(self._failure) from None
        self._pending_step = step
        self._pending = threading.Thread(target=self._complete, args=(step,), name=f"checkpoint-{step}-manifest",
                                         daemon=True)  # never keeps a stopping process alive
        self._pending.start()

    def _complete(self, step: int) -> None:
        try:
            self.manager.wait_until_finished()  # orbax's commit, bounded by SAVE_TIMEOUT_S
            write_manifest(self.directory / str(step), jax.process_index(), jax.process_count())
        except BaseException as e:  # reported by failure(), on the main thread
            if not _peer_trouble(e):
                self._fail(step, e)
            return
        self._verified.add(step)

    def _fail(self, step: int, error: BaseException) -> None:
        line = f"checkpoint at step {step} could not be saved: {describe_error(error)}"
        _publish_failure(line)  # first: the others may be waiting for this save, and stop on seeing it
        self._failure = line

    def failure(self) -> str | None:
        """One line about a save of this process that failed, or None; does not wait."""
        if (self._failure is None and self._pending is not None and len(_commit_errors) > self._commit_errors_seen
                and not _peer_trouble(_commit_errors[-1])):
            self._fail(self._pending_step, _commit_errors[-1])
        return self._failure

    def finish(self) -> None:
        """Waits for the last save and its manifest (at most 2 x SAVE_TIMEOUT_S, and no longer once another
        process's save failed); CheckpointError if it failed here or there."""
        if self._pending is not None:
            deadline = time.monotonic() + 2 * SAVE_TIMEOUT_S
            while self._pending.is_alive() and self.failure() is None and time.monotonic() < deadline:
                self._pending.join(POLL_S)
                # Orbax's commit waits for every process at a barrier: one whose save failed never comes.
                self._failure = self._failure or _peer_failure()
            if self._pending.is_alive() and self._failure is None:
                self._failure = (f"checkpoint at step {self._pending_step} was not written within "
                                 f"{2 * SAVE_TIMEOUT_S} s")
            self._pending = None
        if self._failure is not None:
            raise CheckpointError(self._failure)

    def last_good(self, wait: bool = False) -> str:
        """'step N' for the newest checkpoint still listed that this process verified (restored or saved), else
        for one restored unverified (it has no manifest), else 'none'. With `wait`, after the last save and its
        manifest (as `finish`, without raising its failure)."""
        if wait:
            try:
                self.finish()
            except CheckpointError:
                pass  # a failed save is not a good checkpoint
        steps = set(self.manager.all_steps())
        if verified := steps & self._verified:
            return f"step {max(verified)}"
        if self._unverified in steps:
            return f"step {self._unverified} (restored unverified: it has no manifest)"
        return "none"

    def stop_after_failure(self, step: int) -> str:
        """The line a run stops with after step `step` when a save failed here or on another process.

        Single process: closes the manager and returns the line. Several: prints it as `error: ...` and ends
        the process at once (exit code 1, `distributed.abort`), as orbax's threads here may wait at a barrier
        for a process whose save failed and that will never come.
        """
        failure = self._failure or _peer_failure() or "a checkpoint save failed on another process"
        line = f"{failure}; stopped after step {step}, last good checkpoint: {self.last_good()}"
        if jax.process_count() > 1:
            distributed.abort(line, code=1)
        self.close()
        return line

    def close(self) -> None:
        """Closes the manager. A failure already reported is not raised again (orbax would, once per thread)."""
        try:
            self.finish()
        except CheckpointError:
            # Orbax raises a failed save again in each thread that waits for it: once here, then it closes.
            for call in (self.manager.wait_until_finished, self.manager.close):
                try:
                    call()
                except Exception:
                    pass
            return
        self.manager.close()

    # -- restore
    def restore_newest(self, restore: Callable[[int], Any], mesh: jax.sharding.Mesh | None = None) -> tuple[int, Any]:
        """(step, restore(step)) of the newest checkpoint that verifies and restores (module docstring,
        "Fallback"); CheckpointError when none does.

        Args:
          restore: reads checkpoint `step`; raises DamagedCheckpoint for one it cannot read (other errors,
            e.g. a checkpoint of another model, are raised as they are).
          mesh: the run's mesh, over which the processes agree on each verdict (call inside `jax.set_mesh`);
            None in a single process.
        """
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem, note, result = self._try(step, restore, mesh)
            if problem is None:
                break
            skipped.append((step, problem))
        else:
            failures = "; ".join(f"step {s}: {p}" for s, p in skipped)
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored ({failures}); move them away "
                                  "to start over")
        kept = self._set_aside([s for s, _ in skipped])
        for s, problem in skipped:  # `kept` is process 0's, the one that speaks
            self._say(f"checkpoint at step {s} is damaged ({problem}): skipped, resuming from step {step}; "
                      f"kept as {kept.get(s)}")
        if note:
            self._say(f"checkpoint at step {step} has {note}: restored without verification")
        return step, result

    def _try(self, step: int, restore: Callable[[int], Any], mesh) -> tuple[str | None, str, Any]:
        step_dir = self.directory / str(step)
        files, note, problem, result = None, "", None, None
        try:
            files, note = read_manifest(step_dir)
        except DamagedCheckpoint as e:
            problem = str(e)
        if files is not None:
            problem = verify(step_dir, files, jax.process_index(), jax.process_count())
        problem = self._agree(problem, mesh)
        if problem is None:
            try:
                result = restore(step)
            except DamagedCheckpoint as e:
                problem = str(e) or "unreadable"
            problem = self._agree(problem, mesh)
        if problem is None and files is not None:
            self._verified.add(step)
        elif problem is None:
            self._unverified = step
        return problem, note, result

    @staticmethod
    def _agree(problem: str | None, mesh) -> str | None:
        """The verdict of all processes: a problem found by any of them (each checked its own share)."""
        if jax.process_count() == 1 or mesh is None:
            return problem
        if problem is not None and jax.process_index() != 0:  # process 0 speaks for the run; this one knows why
            print(f"process {jax.process_index()}: {problem}", file=sys.stderr, flush=True)
        anywhere = distributed.any_process(problem is not None, mesh)
        return problem if problem is not None or not anywhere else "a file fails its check on another process"

    def _set_aside(self, steps: list[int]) -> dict[int, str]:
        """{step: what it is kept as}: process 0 renames each folder `<step>.damaged[-n]`; all then reload."""
        kept: dict[int, str] = {}
        if not steps:
            return kept
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                for n in range(1, 1000):
                    target = self.directory / f"{step}{DAMAGED_SUFFIX}{'' if n == 1 else f'-{n}'}"
                    if not target.exists():
                        break
                try:
                    source.rename(target)
                    kept[step] = os.fspath(target)
                except OSError as e:
                    kept[step] = f"{source} (not renamed: {describe_error(e)})"
        distributed.wait_for_all("damaged checkpoints set aside")
        self.manager.reload()
        return kept

    @staticmethod
    def _say(text: str) -> None:
        if jax.process_index() == 0:
            print(text, file=sys.stderr, flush=True)
