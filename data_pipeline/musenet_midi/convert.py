"""MIDI bytes -> dataset records on every core: split assignment, dedupe, filters, reject report.

The parent process reads the source (safely, see `data_pipeline.archives`), hashes each file
(sha256 of its bytes), drops exact duplicates (the first path in source order wins), assigns the
split and sends batches of bytes to a spawn-started process pool; workers parse, tokenize, filter
and compute features, and send back pickled records, which the parent appends to one spill file per
split. The TFDS split generators then stream the spill files, so the source is read and converted
once and every split's size is known before TFDS starts writing (TFDS refuses empty splits).

Records (one per kept file; the schema the input pipeline reads):
  tokens: int32[T] body tokens (after `start`, ending with `end`).
  timing, chord, part, countdown: int32[T] `compute_features(piece.tokens)[prefix_len:]`.
  label: normalised label name; instruments: int32[K] instrument classes that play.
  path: path relative to the source root; content_hash: sha256 hex of the MIDI bytes.
  duration_s: float32 seconds (duration_units * time_unit_ms / 1000); num_notes: int32.

Reject reasons (counted in the dataset metadata and listed in `rejected.tsv`): the archive reasons
of `data_pipeline.archives` (`unsafe_path`, `symlink`, `hardlink`, `special_file`, `too_large`,
`encrypted`, `corrupt_member`, `broken_archive`: an archive in a folder that cannot be read past some
point, its readable entries kept), and
  not_midi_name: a file without a MIDI suffix (.mid .midi .kar .smf); never read.
  no_label / bad_label: no label for the file (MAESTRO file missing from the CSV) / a label name
    with no letters or digits.
  duplicate: the same bytes as an earlier file (the detail names it).
  invalid_midi: the MIDI reader refused the file (empty, truncated, not MIDI, ...).
  no_notes: a valid file without notes in the vocabulary's range.
  too_few_notes, too_long, too_many_tokens: the `Filters`.
  error: anything unexpected while converting (the detail has the exception), or a file that made
    its worker process crash twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from data_pipeline import encoding, midi_io
from data_pipeline import features as features_lib
from data_pipeline.vocab import Vocab, VocabConfig

SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi", ".kar", ".smf")

NOT_MIDI_NAME = "not_midi_name"
NO_LABEL = "no_label"
BAD_LABEL = "bad_label"
DUPLICATE = "duplicate"
INVALID_MIDI = "invalid_midi"
NO_NOTES = "no_notes"
TOO_FEW_NOTES = "too_few_notes"
TOO_LONG = "too_long"
TOO_MANY_TOKENS = "too_many_tokens"
ERROR = "error"

# Files per task sent to a worker, and the byte budget of one task: enough to amortise the IPC.
_BATCH_FILES = 32
_BATCH_BYTES = 8 << 20
_LEN = struct.Struct("<Q")


def is_midi_name(path: str) -> bool:
    return path.lower().endswith(MIDI_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which converted pieces are kept (a piece failing one is rejected with that reason).

    Attributes:
      min_notes: fewest notes (attacks, drums included) a piece must have.
      max_duration_s: longest piece kept, in seconds of music.
      max_tokens: most body tokens a piece may have.
    """

    min_notes: int = 16
    max_duration_s: float = 3600.0
    max_tokens: int = 262_144


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One file of a source, as the parent sees it before conversion.

    Attributes:
      path: path relative to the source root.
      data: the file's bytes, or None when already rejected.
      label: normalised label name (None only when rejected).
      split: a fixed split (MAESTRO's own), or None to split by content hash.
      rejected: reject reason, or None.
      detail: note on the reason.
    """

    path: str
    data: bytes | None
    label: str | None = None
    split: str | None = None
    rejected: str | None = None
    detail: str = ""


def printable_path(path: str) -> str:
    """`path` as UTF-8 text that says what it is, for records and `rejected.tsv`: bytes that are not UTF-8
    (file systems and archives may hold any) as `\\xNN`, control characters (tab, newline) as escapes."""
    try:
        raw = path.encode("utf-8", "surrogateescape")  # undecodable bytes come as surrogates from os / tarfile
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def split_for_hash(content_hash: str, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the first 32 bits of a sha256 hex digest, read as a fraction in
    [0, 1): [0, 1 - v - t) -> train, then validation, then test."""
    x = int(content_hash[:8], 16) / 2.0 ** 32
    if x < 1.0 - validation_fraction - test_fraction:
        return "train"
    return "validation" if x < 1.0 - test_fraction else "test"


# -- worker side --------------------------------------------------------------------------------
_VOCABS: dict[str, Vocab] = {}


def _vocab(instrument_set: str) -> Vocab:
    # Labels do not change any body id (they sit at the end of the id space), so workers use a
    # label-free vocabulary of the same instrument set.
    if instrument_set not in _VOCABS:
        _VOCABS[instrument_set] = Vocab(VocabConfig(instrument_set=instrument_set))
    return _VOCABS[instrument_set]


def convert_one(path: str, data: bytes, label: str, content_hash: str, instrument_set: str,
                filters: Filters) -> dict | tuple[str, str]:
    """MIDI bytes -> a record dict, or (reject reason, detail)."""
    try:
        return _convert_one(path, data, label, content_hash, instrument_set, filters)
    except midi_io.MidiError as e:
        reason = NO_NOTES if e.reason.startswith("no notes") else INVALID_MIDI
        return reason, e.reason
    except Exception as e:  # a bug on one odd file must cost that file, not the whole build
        return ERROR, f"{type(e).__name__}: {e}"


def _convert_one(path, data, label, content_hash, instrument_set, filters):
    vocab = _vocab(instrument_set)
    piece = encoding.encode_midi(data, vocab, path=path)
    duration_s = piece.duration_units * vocab.config.time_unit_ms / 1000.0
    body = piece.body
    if piece.num_notes < filters.min_notes:
        return TOO_FEW_NOTES, f"{piece.num_notes} notes < {filters.min_notes}"
    if duration_s > filters.max_duration_s:
        return TOO_LONG, f"{duration_s:.1f} s > {filters.max_duration_s:g} s"
    if len(body) > filters.max_tokens:
        return TOO_MANY_TOKENS, f"{len(body)} tokens > {filters.max_tokens}"
    feats = features_lib.compute_features(piece.tokens, vocab)
    record = {name: getattr(feats, name)[piece.prefix_len:].astype(np.int32)
              for name in features_lib.STORED_FEATURE_NAMES}
    record.update(
        tokens=body.astype(np.int32),
        label=label,
        instruments=np.asarray(piece.instruments, np.int32),
        path=path,
        content_hash=content_hash,
        duration_s=np.float32(duration_s),
        num_notes=np.int32(piece.num_notes),
    )
    return record


def _convert_batch(batch, instrument_set: str, filters: Filters) -> list:
    """Worker task: [(path, data, label, hash)] -> [pickled record bytes | (reason, detail)]."""
    out = []
    for path, data, label, content_hash in batch:
        result = convert_one(path, data, label, content_hash, instrument_set, filters)
        out.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL) if isinstance(result, dict)
                   else result)
    return out


# -- parent side --------------------------------------------------------------------------------
@dataclasses.dataclass
class Summary:
    """What one conversion run did."""

    files_seen: int = 0
    bytes_read: int = 0
    examples: dict[str, int] = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
    label_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # path, reason, detail

    @property
    def reject_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(r for _, r, _ in self.rejected).items()))

    def report_tsv(self) -> str:
        """`rejected.tsv`: a header line, then `path<TAB>reason<TAB>detail` per rejected file, by path."""
        clean = lambda s: " ".join(str(s).split())  # no tabs or newlines inside a field
        rows = sorted(self.rejected)  # paths are already printable (`printable_path`): kept as they are
        lines = ["path\treason\tdetail"] + [f"{p}\t{r}\t{clean(printable_path(d))}" for p, r, d in rows]
        return "\n".join(lines) + "\n"


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, else printed every 30 s."""

    def __init__(self, name: str, stream=None):
        self.name, self.stream = name, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, summary: Summary, final: bool = False):
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        kept = sum(summary.examples.values())
        rate = summary.files_seen / max(now - self.start, 1e-9)
        line = (f"{self.name}: {summary.files_seen} files, {kept} kept, {len(summary.rejected)} rejected, "
                f"{summary.bytes_read / 1e6:.1f} MB read, {rate:.0f} files/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class _SpillWriter:
    """Length-prefixed pickled records, one file per split."""

    def __init__(self, spill_dir: str):
        self.files = {s: open(spill_path(spill_dir, s), "wb") for s in SPLITS}

    def write(self, split: str, blob: bytes):
        f = self.files[split]
        f.write(_LEN.pack(len(blob)))
        f.write(blob)

    def close(self):
        for f in self.files.values():
            f.close()


def read_spill(path: str) -> Iterator[tuple[str, dict]]:
    """(key, record) pairs of a spill file; the key is the content hash (unique after dedupe)."""
    with open(path, "rb") as f:
        while header := f.read(_LEN.size):
            (n,) = _LEN.unpack(header)
            record = pickle.loads(f.read(n))
            yield record["content_hash"], record


def spill_path(spill_dir: str, split: str) -> str:
    return os.path.join(spill_dir, f"{split}.records")


class ConversionError(RuntimeError):
    """Conversion cannot go on (worker processes die even on single files)."""


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds Ctrl-C / SIGTERM until the block ends, then delivers them as they would have been.

    The pool spawns a worker inside `submit` and writes the worker's start-up data to a pipe there;
    an interrupt raised half-way through that write leaves the worker reading a cut pickle, and it
    prints an `EOFError` traceback before any code of ours runs in it.
    """
    if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread
        yield
        return
    held = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Ignored signals stay ignored; a handler installed outside Python (None) cannot be put back.
    previous = {sig: h for sig, h in previous.items() if h is not None and h != signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in held[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


class _Workers:
    """A spawn-started process pool that is rebuilt when a worker dies.

    A file that kills its worker (a crash in a C++ MIDI parser, say) must cost that file only: after
    a crash the batches in flight are re-run one file per task, and a file whose task crashes again
    is rejected with reason `error`.
    """

    def __init__(self, num_workers: int, instrument_set: str, filters: Filters, fn=None):
        self.num_workers = num_workers
        self.fn = fn or _convert_batch  # the task run on each batch (module level: it is pickled)
        self.args = (instrument_set, filters)
        self.crashes = 0
        self.successes = 0
        self.pool = self._new_pool()

    def _new_pool(self):
        # Spawn: safe with the threads JAX / TFDS may have started, and the same on every OS.
        return concurrent.futures.ProcessPoolExecutor(self.num_workers,
                                                      mp_context=multiprocessing.get_context("spawn"))

    def restart(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._new_pool()

    def _restart_if_broken(self):
        # Futures of a pool that broke earlier keep failing after the restart; only a broken
        # current pool needs replacing.
        if getattr(self.pool, "_broken", False):
            self.restart()

    def submit(self, batch):
        self._restart_if_broken()
        with _interrupts_deferred():
            return self.pool.submit(self.fn, batch, *self.args)

    def result(self, future, batch) -> list:
        try:
            out = future.result()
            self.successes += 1
            return out
        except concurrent.futures.process.BrokenProcessPool:
            return [self._isolated(entry) for entry in batch]

    def _isolated(self, entry):
        # Twice: the first failure may be the pool breaking under another file's task.
        for _ in range(2):
            try:
                out = self.submit([entry]).result()[0]
                self.successes += 1
                return out
            except concurrent.futures.process.BrokenProcessPool:
                pass
        self.crashes += 1
        if self.successes == 0 and self.crashes >= 2:
            raise ConversionError("conversion worker processes die at start-up (run builds from a "
                                  "script file or module: spawn re-imports __main__)")
        return ERROR, "the conversion process crashed on this file"

    def close(self):
        try:
            self.pool.shutdown(wait=True, cancel_futures=True)
        except RuntimeError:
            # Interrupted (Ctrl-C, SIGTERM) while the pool was starting its manager thread: there is no thread
            # to join ("cannot join thread before it is started"), and that error would replace the interrupt.
            # The worker processes it had launched are stopped here instead.
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                process.terminate()


def convert_all(items: Iterable[SourceItem], *, spill_dir: str, instrument_set: str, filters: Filters,
                split_fn: Callable[[str], str], num_workers: int, progress_name: str = "musenet_midi",
                progress_stream=None) -> Summary:
    """Converts every item, writing kept records to `spill_dir/<split>.records`.

    Args:
      items: the source's files in a deterministic order.
      spill_dir: an existing folder for the spill files.
      instrument_set: vocabulary instrument set.
      filters: which pieces to keep.
      split_fn: content hash -> split name, for items without a fixed split.
      num_workers: worker processes; 0 converts in this process.
    """
    summary = Summary()
    progress = _Progress(progress_name, progress_stream)
    spill = _SpillWriter(spill_dir)
    first_path_of: dict[str, str] = {}
    pending: collections.deque = collections.deque()  # (future, batch, metas), in source order
    batch: list = []
    metas: list = []  # (path, split, label) per batch entry, to route results
    batch_bytes = 0

    def collect(results, metas):
        for result, (path, split, label) in zip(results, metas):
            if isinstance(result, bytes):
                spill.write(split, result)
                summary.examples[split] += 1
                summary.label_counts[label] += 1
            else:
                summary.rejected.append((path, result[0], result[1]))
        progress.update(summary)

    workers = _Workers(num_workers, instrument_set, filters) if num_workers > 0 else None
    max_pending = 2 * max(num_workers, 1)

    def drain(keep: int):
        while len(pending) > keep:
            future, done_batch, done_metas = pending.popleft()
            collect(workers.result(future, done_batch), done_metas)

    def flush():
        nonlocal batch, metas, batch_bytes
        if batch:
            if workers is None:
                collect(_convert_batch(batch, instrument_set, filters), metas)
            else:
                pending.append((workers.submit(batch), batch, metas))
                drain(max_pending - 1)  # bounded in flight: read the source only as fast as we convert
        batch, metas, batch_bytes = [], [], 0

    try:
        for item in items:
            item = dataclasses.replace(item, path=printable_path(item.path))
            summary.files_seen += 1
            if item.rejected is not None:
                summary.rejected.append((item.path, item.rejected, item.detail))
                progress.update(summary)
                continue
            summary.bytes_read += len(item.data)
            content_hash = hashlib.sha256(item.data).hexdigest()
            if content_hash in first_path_of:
                detail = f"same bytes as {first_path_of[content_hash]}"
                summary.rejected.append((item.path, DUPLICATE, detail))
                continue
            first_path_of[content_hash] = item.path
            batch.append((item.path, item.data, item.label, content_hash))
            metas.append((item.path, item.split or split_fn(content_hash), item.label))
            batch_bytes += len(item.data)
            if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_BYTES:
                flush()
        flush()
        if workers is not None:
            drain(0)
    finally:
        spill.close()
        if workers is not None:
            workers.close()
    progress.update(summary, final=True)
    return summary
