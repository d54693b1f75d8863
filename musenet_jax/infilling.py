"""Regenerating a span of a piece, or writing parts under given ones, with a model trained on infilling sequences.

A request names the piece's notes, the span [S, E) and the parts J to write (`data_pipeline.infill.Span`); every
other note is kept verbatim. The span is written in chunks, each one window of the model (`sampling.Request` with
an `InfillPrompt`): for a chunk from time t the prompt is the infilling sequence of the piece so far
(`data_pipeline.infill.infill_sequence`: the music before t, then `hole` and the given notes from t on, then
`fill`), cropped so that `before` and `context` take at most a quarter of the window each; the sampler writes the
middle from silence at t, with the structured decoding rules of `musenet_jax.sampling` and three more:

- it plays only J's instruments;
- a key held by a given note across t (a note of J begun before the span) is not attacked before that note
  ends (`decode_rules.Limits.free_from`), so no regenerated note overlaps a kept one;
- it ends exactly at the chunk's end: waits that would pass it are masked, and there the sounding notes are
  released, lowest key first, then `end` (END tolerance 0).

A chunk spans at most what training spans were (4 s of infilling, 12 s of accompaniment), less if the source's own
notes of J there would not fit half the window. A chunk that fills its window before its end stops at its last
complete time step: its notes sounding there end there, and the next chunk starts there. Chunks after the first
see the notes written before them in `before`; the notes of J after the span (infilling) stay in `context`.

Accompaniment is the span [0, D) of the given parts with J the parts to write (`accompany`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import encoding, infill
from data_pipeline.encoding import Notes
from data_pipeline.vocab import END, Vocab
from musenet_jax import decode_rules, sampling
from musenet_jax.sampling import GenerationError, SamplingConfig

INFILL_CHUNK_SECONDS = infill.TaskMix().infill_seconds[1]
ACCOMPANY_CHUNK_SECONDS = infill.TaskMix().accompany_seconds[1]


@dataclasses.dataclass(frozen=True)
class InfillResult:
    """A completed piece.

    Attributes:
      notes: its canonical notes: the given ones verbatim, and the regenerated ones.
      given, written: the given notes and the notes the model wrote.
      duration_units: D, the piece's length (the source's, in time units).
      chunks: windows the span was written in.
    """

    notes: Notes
    given: Notes
    written: Notes
    duration_units: int
    chunks: int


def _written_notes(middle: np.ndarray, ended: bool, start: int, vocab: Vocab) -> tuple[Notes, int]:
    """The notes of a chunk's middle tokens (relative times) placed at `start`, and the time the chunk reached. A
    middle cut by its window keeps its complete time steps: the events after its last wait are dropped and the
    notes sounding there end there."""
    if not ended:
        waits = np.flatnonzero(vocab.wait_units[middle] > 0)
        middle = middle[: waits[-1] + 1] if len(waits) else middle[:0]
    notes, reached = encoding.decode_tokens(middle, vocab)
    notes = dataclasses.replace(notes, start=notes.start + start, end=np.minimum(notes.end, reached) + start)
    return notes.take(notes.end > notes.start), start + reached


class InfillTask:
    """One completion, chunk by chunk (module doc): `next_request` gives the next chunk's one-window request (None
    once the span is written), `accept` takes the piece the sampler wrote for it, `result` the completed piece. A
    caller decodes the requests as it likes (`complete` one at a time; `musenet_jax.serving` batched with others).

    Args:
      max_len: the model's context L (tokens); the other arguments are `complete`'s.
    Raises:
      GenerationError: one line, for a vocabulary without infilling tokens, a span that does not fit the piece, or
        a piece with no notes.
    """

    def __init__(self, max_len: int, vocab: Vocab, notes: Notes, duration: int, span: infill.Span, *,
                 label: str | None, sampling_config: SamplingConfig | None = None, seed: int = 0, sample: int = 0,
                 max_note_seconds: float | None = decode_rules.DEFAULT_MAX_NOTE_SECONDS, accompany: bool = False):
        if not vocab.config.infill:
            raise GenerationError("this model's vocabulary has no infilling tokens (format v1, from before "
                                  "infilling): it can only continue a piece")
        try:
            span.check(duration, vocab)
        except infill.SpanError as e:
            raise GenerationError(str(e)) from None
        self.vocab, self.duration, self.label, self.accompany = vocab, duration, label, accompany
        self.sampling, self.seed, self.sample, self.max_note_seconds = (sampling_config or SamplingConfig(), seed,
                                                                        sample, max_note_seconds)
        self.target = infill.target_notes(notes, span, vocab)
        write = (tuple(sorted(set(np.unique(self.target.instrument).tolist()))) if span.instruments is None
                 else span.instruments)
        if not write:
            raise GenerationError("the piece has no notes: there is nothing to regenerate or accompany")
        self.span = dataclasses.replace(span, instruments=write)
        self.given = self.target.take(~self.span.regenerated(self.target))
        self.names = [vocab.instruments.names[i] for i in sorted(set(self.given.instrument.tolist()) | set(write))]
        self.prefix_len = (label is not None) + len(self.names) + 1  # [label] instrument.. start
        self.room = max_len + 1 - self.prefix_len  # body tokens one window holds
        unit_s = vocab.config.time_unit_ms / 1000.0
        self.longest = max(1, round((ACCOMPANY_CHUNK_SECONDS if accompany else INFILL_CHUNK_SECONDS) / unit_s))
        self.written, self.time, self.chunks = Notes.empty(), span.start, 0
        self._pending: tuple[int, int] | None = None  # (prompt body length, chunk end) of the request out

    @property
    def done(self) -> bool:
        return self.time >= self.span.end

    @property
    def seconds_written(self) -> float:
        """Seconds of the span written so far (whole chunks)."""
        return (self.time - self.span.start) * self.vocab.config.time_unit_ms / 1000.0

    def next_request(self) -> sampling.Request | None:
        """The request of the chunk from the time written so far, or None when the span is complete."""
        if self.done:
            return None
        vocab, t, write = self.vocab, self.time, self.span.instruments
        # The chunk: at most `longest`, halved while the source's own notes there would fill over half a window.
        fitted = infill.fit_span(self.target, infill.Span(t, min(self.span.end, t + self.longest), write), False,
                                 self.room, vocab)
        stop = fitted[1].end if fitted is not None else t + 1
        chunk = infill.Span(t, stop, write)
        so_far = encoding.canonical_notes(self.given.concat(self.written), vocab)
        parts = infill.rearrange(so_far, chunk, vocab)
        quarter = (self.room - 3) // 4
        before = min(len(parts.before), quarter)
        context = min(len(parts.context), 2 * quarter - before)
        seq = infill.infill_sequence(parts, chunk, self.duration, vocab, before_tokens=before,
                                     context_tokens=context, with_middle=False)
        free_from = np.zeros(decode_rules.num_keys(vocab), np.int32)
        held = parts.held.take(np.isin(parts.held.instrument, write) & (parts.held.end > t))
        free_from[held.instrument.astype(np.int64) * 128 + held.pitch] = held.end - t
        self._pending = (len(seq.body), stop)
        return sampling.Request(
            self.label, tuple(self.names), (stop - t) * vocab.config.time_unit_ms / 1000.0, sampling=self.sampling,
            seed=self.seed, sample=self.sample * 4096 + self.chunks, max_tokens=self.room,
            max_note_seconds=self.max_note_seconds, infill=sampling.InfillPrompt(seq.body, seq.features, write,
                                                                                 free_from))

    def accept(self, piece: sampling.GeneratedPiece) -> None:
        """Takes the piece decoded for the last request; raises GenerationError when it wrote no complete step."""
        if self._pending is None:
            raise GenerationError("no chunk was asked for")
        prompt_len, stop = self._pending
        self._pending = None
        middle = piece.tokens[self.prefix_len + prompt_len:]
        new, reached = _written_notes(middle[middle != END], piece.ended, self.time, self.vocab)
        self.chunks += 1
        if reached <= self.time:
            unit_s = self.vocab.config.time_unit_ms / 1000.0
            raise GenerationError(f"the model wrote no complete time step of the span from {self.time * unit_s:g} s "
                                  f"in a whole window")
        self.written = self.written.concat(new)
        self.time = stop if piece.ended else reached

    def result(self) -> InfillResult:
        vocab = self.vocab
        return InfillResult(encoding.canonical_notes(self.given.concat(self.written), vocab), self.given,
                            encoding.canonical_notes(self.written, vocab), self.duration, self.chunks)


def complete(model, vocab: Vocab, notes: Notes, duration: int, span: infill.Span, *, label: str | None,
             sampling_config: SamplingConfig | None = None, seed: int = 0, sample: int = 0,
             max_note_seconds: float | None = decode_rules.DEFAULT_MAX_NOTE_SECONDS,
             accompany: bool = False) -> InfillResult:
    """Regenerates `span` of the piece `notes` (module doc), one chunk after the other.

    Args:
      notes: the piece (MIDI velocities, times in units); duration: its length D in units.
      span: what to regenerate (checked: `Span.check`); its instruments None: every instrument of the piece.
      label: the conditioning label, or None.
      seed, sample: the randomness; chunk c of sample s draws as row `s * 4096 + c` of `seed`.
      accompany: the span's parts are new (none of them after it); else they are regenerated inside it.
    Raises:
      GenerationError: one line, for a model without infilling tokens, a span that does not fit, or a chunk in
        which the model wrote no complete time step.
    """
    task = InfillTask(model.config.max_len if model is not None else 0, vocab, notes, duration, span, label=label,
                      sampling_config=sampling_config, seed=seed, sample=sample, max_note_seconds=max_note_seconds,
                      accompany=accompany)
    while (request := task.next_request()) is not None:
        task.accept(sampling.generate_batch(model, vocab, [request])[0])
    return task.result()
