"""Serving generation to many clients: jobs, a bounded queue, and continuous batching of their pieces.

A `Job` is one client's request: `num_samples` pieces of one set of settings (`sampling.Request` rows, samples
0..n-1 of its seed). The `Scheduler` owns the model. Its worker thread decodes context windows (`sampling.Decoder`)
over the pieces of every running job at once: before each window it takes the oldest waiting jobs whose rows fit
in the rows left free (first come, first served; a job is never split, so its pieces finish together), and after
each window it hands finished jobs their results, so a short piece does not wait for a long one and a new
request joins at the next window instead of after the whole batch. Each window is padded to a bucket size (the
powers of two below `max_batch`, and `max_batch`), and reads a power of two of logit columns
(`decode_rules.column_count`: 4096 while its rows play one pitched instrument each, more for more), so that the
compiled decode loop exists for a few shapes only (every piece uses the buffer of the longest allowed one).
When it starts from idle, or a job has just finished, it waits up to `batch_wait_s` for requests to fill the
free rows (clients that send together, or send again on a result, arrive a few milliseconds apart). Between
windows it publishes each piece's progress (seconds of music written) and stops the rows of jobs that were
cancelled (DELETE, or the client left) or ran past `max_job_seconds`.

A job may instead be infilling tasks (`infilling.InfillTask`, one per sample): each row decodes its task's chunks,
one window each; when a chunk's row stops, the task takes its piece and the row's next chunk joins the next window
as a new slot, so infilling rows are batched with the others. Their progress is the seconds of span written.

Bounded: at most `queue_size` jobs wait (`submit` raises `QueueFull`); the newest `keep_finished` finished jobs
are kept (older ones are forgotten); a result holds its MIDI bytes, and its WAV once asked for.

Threads: the worker decodes; the web server's event loop reads jobs (`Job.view`) and waits for their changes
with `Job.listen`, which the worker wakes through the listener's loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Sequence

import numpy as np

from data_pipeline import encoding, infill, rendering
from data_pipeline.vocab import END, Vocab
from musenet_jax import decode_rules, infilling, sampling, window_loop

FINAL = ("done", "failed", "cancelled")


class QueueFull(Exception):
    """The queue holds `queue_size` jobs; `retry_after` is a guess of the seconds until one finishes."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass
class Result:
    """One finished piece: body tokens int32[T] (given primer + generated, no END), how many were given, its length
    (seconds), whether it ended (END) rather than being stopped, its notes and MIDI bytes, WAV bytes once made, and
    for an infilling task the span it rewrote ((start, end) seconds)."""

    tokens: np.ndarray
    primer_tokens: int
    seconds: float
    ended: bool
    notes: list[dict]
    midi: bytes
    wav: bytes | None = None
    span: tuple[float, float] | None = None


class Job:
    """One request of `num_samples` pieces; its state changes only under the scheduler's lock."""

    def __init__(self, requests: Sequence[sampling.Request], target_seconds: float, settings: dict,
                 tasks: Sequence[infilling.InfillTask] | None = None):
        self.id = uuid.uuid4().hex
        self.tasks = None if tasks is None else list(tasks)  # infilling: requests are their first chunks
        self.requests = list(requests) if tasks is None else [t.next_request() for t in self.tasks]
        self.target_seconds = target_seconds
        self.settings = settings  # the request as understood, echoed to the client
        self.status = "queued"
        self.error: str | None = None
        self.progress = [0.0] * len(requests)
        self.results: list[Result] = []
        self.created = time.monotonic()
        self.started: float | None = None
        self.cancel_requested = False
        self.timed_out = False
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._listeners_lock = threading.Lock()

    def listen(self) -> asyncio.Event:
        """An event of the running loop, set after every change of this job (call `unlisten` when done)."""
        event = asyncio.Event()
        with self._listeners_lock:
            self._listeners.add((asyncio.get_running_loop(), event))
        return event

    def unlisten(self, event: asyncio.Event) -> None:
        with self._listeners_lock:
            self._listeners = {(loop, e) for loop, e in self._listeners if e is not event}

    def notify(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the listener's loop has closed (server shutting down)
                pass


class Scheduler:
    """The worker thread and queue (module doc). Thread-safe; `close` stops the worker.

    Args:
      model, vocab: an exported model and its vocabulary.
      max_batch: most rows decoded together (>= 1); also the most pieces one job may ask for.
      queue_size: most jobs waiting (not yet decoding).
      max_job_seconds: a job decoding longer than this (wall seconds) fails, its rows stopped.
      keep_finished: finished jobs remembered for their clients.
      audio: (fluidsynth, soundfont) to render WAV, or None.
      max_seconds: the longest piece a request may ask for; every batch uses the piece buffer of that length
        (`sampling.piece_buffer`), so the decode loop compiles once per batch size and column count. None: the
        model's limit.
      batch_wait_s: how long a batch that is not full waits for more requests before it starts (seconds).
    """

    def __init__(self, model, vocab: Vocab, *, max_batch: int = 4, queue_size: int = 32,
                 max_job_seconds: float = 600.0, keep_finished: int = 256, audio: tuple[str, str] | None = None,
                 max_seconds: float | None = None, batch_wait_s: float = 0.05):
        if max_batch < 1 or queue_size < 1 or not max_job_seconds > 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_job_seconds > 0")
        self.model, self.vocab = model, vocab
        limit = sampling.max_seconds(model.config, vocab)
        self.max_seconds = limit if max_seconds is None else min(max_seconds, limit)
        self.capacity = sampling.piece_buffer(vocab, sampling.default_max_tokens(self.max_seconds, model.config))
        self.max_batch, self.queue_size, self.max_job_seconds = max_batch, queue_size, max_job_seconds
        self.keep_finished, self.audio, self.batch_wait_s = keep_finished, audio, batch_wait_s
        self.buckets = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._finished: collections.deque[str] = collections.deque()
        self._closed = False
        self._seconds_per_job = 10.0  # running mean of a job's wall time, for Retry-After
        self.counts = collections.Counter()  # jobs by final status, batches, rows
        self.windows_by_rows = collections.Counter()  # rows decoded together (before padding) -> windows
        self.decoder = sampling.Decoder(model, vocab, self.capacity)
        self._thread = threading.Thread(target=self._run, name="musenet-serve-decoder", daemon=True)
        self._thread.start()

    # -- the clients' side ------------------------------------------------------------------------------
    def submit(self, requests: Sequence[sampling.Request], target_seconds: float, settings: dict,
               tasks: Sequence[infilling.InfillTask] | None = None) -> Job:
        """Queues a job of checked requests (`sampling.check_request`), or of infilling tasks (the requests are then
        their chunks'); raises QueueFull."""
        job = Job(requests, target_seconds, settings, tasks)
        if not 1 <= len(job.requests) <= self.max_batch:
            raise ValueError(f"num_samples must be in 1..{self.max_batch}")
        with self._cv:
            if self._closed:
                raise QueueFull(60)
            if len(self._waiting) >= self.queue_size:
                rows_ahead = sum(len(j.requests) for j in self._waiting) + len(job.requests)
                raise QueueFull(max(1, round((1 + rows_ahead / self.max_batch) * self._seconds_per_job)))
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            return self._jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """Stops a job: a waiting one at once, a decoding one at its next window boundary."""
        with self._cv:
            if job.status in FINAL:
                return
            job.cancel_requested = True
            if job.status == "queued":
                self._waiting.remove(job)
                self._finish(job, "cancelled")
        job.notify()

    def view(self, job: Job) -> dict:
        """The job's state as JSON-ready values, read under the lock (results: `Result`s, unconverted)."""
        with self._cv:
            return {"id": job.id, "status": job.status, "error": job.error, "progress": list(job.progress),
                    "target_seconds": job.target_seconds, "settings": job.settings,
                    "results": list(job.results) if job.status == "done" else []}

    def wav(self, result: Result) -> bytes:
        """The result's audio, rendered on first use (raises rendering.RenderError)."""
        if result.wav is None:
            if self.audio is None:
                raise rendering.RenderError("this server cannot render audio (fluidsynth or a soundfont missing)")
            with tempfile.TemporaryDirectory(prefix="musenet-serve-") as tmp:
                midi, wav = os.path.join(tmp, "piece.mid"), os.path.join(tmp, "piece.wav")
                with open(midi, "wb") as f:
                    f.write(result.midi)
                fluidsynth, soundfont = self.audio
                rendering.render_wav(midi, wav, soundfont=soundfont, fluidsynth=fluidsynth, timeout_s=120.0)
                with open(wav, "rb") as f:
                    result.wav = f.read()
        return result.wav

    def stats(self) -> dict:
        """Counters for operators and tests: jobs by final status, pieces finished ("rows") and windows decoded
        ("windows") in `jobs`; windows by the rows decoded together; compiled decode loops; queue length."""
        with self._cv:
            by_rows = {str(k): v for k, v in sorted(self.windows_by_rows.items())}
            return {"queued": len(self._waiting), "jobs": dict(self.counts), "max_batch": self.max_batch,
                    "buckets": self.buckets, "windows_by_rows": by_rows,
                    "compiled_decode_loops": window_loop.TRACE_COUNTS["decode_window"]}

    def close(self) -> None:
        """Cancels every job (decoding ones stop at their next window) and stops the worker."""
        with self._cv:
            self._closed = True
            for job in list(self._waiting):
                job.cancel_requested = True
                self._finish(job, "cancelled")
            self._waiting.clear()
            for job in self._jobs.values():
                job.cancel_requested = True
            self._cv.notify_all()
        self._thread.join(timeout=60)

    # -- the worker -------------------------------------------------------------------------------------
    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        """Under the lock: a final status; the oldest finished jobs beyond `keep_finished` are forgotten."""
        job.status, job.error = status, error
        self.counts[status] += 1
        self._finished.append(job.id)
        while len(self._finished) > self.keep_finished:
            self._jobs.pop(self._finished.popleft(), None)

    def _take(self, free: int) -> list[Job]:
        """Under the lock: the oldest waiting jobs whose rows fit in `free` rows, now running."""
        jobs, rows = [], 0
        while self._waiting and rows + len(self._waiting[0].requests) <= free:
            job = self._waiting.popleft()
            job.status, job.started = "running", time.monotonic()
            jobs.append(job)
            rows += len(job.requests)
        return jobs

    def _run(self) -> None:
        decoder = self.decoder
        running: list[tuple[Job, list[sampling.Slot]]] = []
        fill = True  # wait for requests to fill the free rows before the next window (module doc)
        while True:
            with self._cv:
                while not self._waiting and not running and not self._closed:
                    self._cv.wait()
                used = sum(len(slots) for _, slots in running)
                deadline = time.monotonic() + (self.batch_wait_s if fill else 0.0)
                while (not self._closed and used + sum(len(j.requests) for j in self._waiting) < self.max_batch
                       and (left := deadline - time.monotonic()) > 0):
                    self._cv.wait(left)
                if self._closed:
                    for job, _ in running:
                        self._finish(job, "cancelled")
                    break
                jobs = self._take(self.max_batch - used)
            for job in jobs:
                try:
                    running.append((job, [decoder.add(r) for r in job.requests]))
                except sampling.GenerationError as e:  # checked at submit: only a server bug gets here
                    with self._cv:
                        self._finish(job, "failed", str(e))
                job.notify()
            if not running:
                fill = True
                continue
            try:
                self._window(decoder, running)
                self._next_chunks(decoder, running)
                fill = self._deliver(running)
            except Exception as e:  # a bug, not bad input (requests are checked at submit): keep serving
                traceback.print_exc(file=sys.stderr)
                with self._cv:
                    for job, _ in running:
                        if job.status not in FINAL:
                            self._finish(job, "failed", f"internal error while decoding ({type(e).__name__})")
                for job, _ in running:
                    job.notify()
                running.clear()
                fill = True
        for job, _ in running:
            job.notify()

    def _window(self, decoder: sampling.Decoder, running: list) -> None:
        """One window of every running row; then progress, cancellations and time limits."""
        active = [slot for _, slots in running for slot in slots if not slot.done]
        if active:
            decoder.window(active, min(b for b in self.buckets if b >= len(active)))
            with self._cv:
                self.windows_by_rows[len(active)] += 1
                self.counts["windows"] += 1
        now = time.monotonic()
        with self._cv:
            for job, slots in running:
                job.progress = ([decoder.seconds(slot) for slot in slots] if job.tasks is None
                                else [task.seconds_written for task in job.tasks])
                if now - job.started > self.max_job_seconds:
                    job.timed_out = True
                if job.cancel_requested or job.timed_out:
                    for slot in slots:
                        slot.done = True
        for job, _ in running:
            job.notify()

    def _next_chunks(self, decoder: sampling.Decoder, running: list) -> None:
        """Infilling rows whose chunk has stopped: their task takes the piece, and the next chunk takes the row (a
        task that fails ends its job, failed, with the task's one-line reason)."""
        for job, slots in running:
            if job.tasks is None or job.cancel_requested or job.timed_out or job.status in FINAL:
                continue
            try:
                for i, (task, slot) in enumerate(zip(job.tasks, slots, strict=True)):
                    if slot.done and not task.done:
                        task.accept(decoder.piece(slot))
                        request = task.next_request()
                        if request is not None:
                            slots[i] = decoder.add(request)
            except sampling.GenerationError as e:
                for slot in slots:
                    slot.done = True
                with self._cv:  # clients read the job under the lock
                    job.error = str(e)

    def _deliver(self, running: list) -> bool:
        """Finishes the jobs whose rows have all stopped (removed from `running`); True if any did."""
        finished = [(job, slots) for job, slots in running if all(slot.done for slot in slots)]
        for job, slots in finished:
            running.remove((job, slots))
            stopped = job.cancel_requested or job.timed_out or job.error is not None
            results = [] if stopped else ([self._result(slot) for slot in slots] if job.tasks is None
                                          else [self._task_result(task) for task in job.tasks])
            with self._cv:
                self.counts["rows"] += len(slots)
                if job.cancel_requested:
                    self._finish(job, "cancelled")
                elif job.error is not None:
                    self._finish(job, "failed", job.error)
                elif job.timed_out:
                    self._finish(job, "failed", f"the job ran past the server's limit of {self.max_job_seconds:g} s")
                else:
                    job.results = results
                    self._finish(job, "done")
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - job.started)
            job.notify()
        return bool(finished)

    def _result(self, slot: sampling.Slot) -> Result:
        piece = self.decoder.piece(slot)
        body = piece.tokens[piece.prefix_len:]
        body = body[:-1] if len(body) and body[-1] == END else body
        notes, duration = encoding.decode_tokens(body, self.vocab)
        midi = midi_bytes(notes, self.vocab, duration)
        return Result(body.astype(np.int32), piece.primer_len, piece.seconds, piece.ended,
                      note_list(notes, self.vocab), midi)

    def _task_result(self, task: infilling.InfillTask) -> Result:
        done = task.result()
        vocab, unit_s = self.vocab, self.vocab.config.time_unit_ms / 1000.0
        # The piece keeps its length: its closing rest, which the encoding does not write, is written as waits.
        body = infill.body_until(done.notes, vocab, origin=0, until=done.duration_units).astype(np.int32)
        return Result(body, 0, done.duration_units * unit_s, True, note_list(done.notes, vocab),
                      midi_bytes(done.notes, vocab, done.duration_units),
                      span=(task.span.start * unit_s, task.span.end * unit_s))


def midi_bytes(notes: encoding.Notes, vocab: Vocab, duration_units: int) -> bytes:
    """A piece's MIDI file, as bytes (`encoding.notes_to_midi`, lasting `duration_units`)."""
    with tempfile.TemporaryDirectory(prefix="musenet-serve-") as tmp:
        path = os.path.join(tmp, "piece.mid")
        encoding.notes_to_midi(notes, vocab, path, duration_units=duration_units)
        with open(path, "rb") as f:
            return f.read()


def note_list(notes: encoding.Notes, vocab: Vocab) -> list[dict]:
    """Notes as JSON-ready dicts: instrument name, MIDI pitch and velocity, start / end in seconds, drum flag."""
    unit = vocab.config.time_unit_ms / 1000.0
    names = vocab.instruments.names
    return [{"instrument": names[int(i)], "pitch": int(p), "velocity": int(v), "start": round(float(s) * unit, 4),
             "end": round(float(e) * unit, 4), "drum": int(i) == vocab.drums_index}
            for i, p, v, s, e in zip(notes.instrument, notes.pitch, notes.velocity, notes.start, notes.end,
                                     strict=True)]


def warm_up(scheduler: Scheduler, seconds: float = 0.5) -> None:
    """Compiles the decode loop for every batch bucket and column count now (a short piece in one row), so that
    the first clients do not wait for it (about 3 s each on a laptop CPU). The column counts are those of one,
    two, ... every instrument (`decode_rules.column_count`; four for the default vocabulary)."""
    vocab = scheduler.vocab
    names = vocab.instruments.names
    widths = {}
    for k in range(1, len(names) + 1):
        allowed = decode_rules.allowed_body_tokens(vocab, range(k))
        widths.setdefault(decode_rules.column_count(vocab, int(allowed.sum())), tuple(names[:k]))
    for instruments in widths.values():
        request = sampling.Request(None, instruments, min(seconds, scheduler.max_seconds))
        for bucket in scheduler.buckets:
            sampling.generate_batch(scheduler.model, vocab, [request], batch_size=bucket, capacity=scheduler.capacity)
