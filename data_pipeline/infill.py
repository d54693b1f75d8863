"""Infilling and accompaniment as rearrangements of a piece: what a model is given, and what it writes.

A `Span` names what is regenerated: the notes of instruments J (every instrument by default) that start in
[S, E) time units. Every other note is given, verbatim. A regenerated note ends by E (the span's end closes
it: a pitched note that sounded past E in the source is cut there; drum hits are onsets), so the piece a
model learns to complete is `target_notes(notes, span)`. `rearrange` writes it as three bodies (events and
waits, no prefix, no END), each exact in time:

- `before`: the events before S. All of them are given: no regenerated note starts before S.
- `context`: the given notes' events from S on, waits counted from S: what the regenerated part must fit,
  in and after the span (the releases of notes held across S; the other instruments when J is not all).
- `middle`: every event in [S, E), given and regenerated, waits counted from S, then waits up to E: the
  span as it sounds. A model writes it with the given events forced (`Rearranged.given` marks them), so it
  knows the span's future (`context`) while it writes, as in fill-in-the-middle training.

Accompaniment is the span [0, duration) with J the parts to write: `before` is empty, `context` holds the
given parts from start to end, `middle` the whole piece. `restore` inverts `rearrange`: the notes of
`restore(rearrange(notes, span, vocab), span, vocab)` encode to the same tokens as `target_notes`.

Velocities are the vocabulary's bins (as `encoding.encode_notes` writes them); times are time units.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import encoding
from data_pipeline.encoding import Notes
from data_pipeline.vocab import TokenKind, Vocab


class SpanError(ValueError):
    """A span that does not fit its piece; str() is a one-line user-facing message."""


@dataclasses.dataclass(frozen=True)
class Span:
    """What is regenerated: the notes of `instruments` (class indices; None: all) starting in [start, end).

    Attributes:
      start, end: S and E, time units, 0 <= S < E.
      instruments: the regenerated instrument classes, or None for every instrument.
    """

    start: int
    end: int
    instruments: tuple[int, ...] | None = None

    def check(self, duration: int, vocab: Vocab) -> None:
        """Raises `SpanError` (one line) unless the span is non-empty, inside [0, duration] and names known
        instrument classes."""
        unit_s = vocab.config.time_unit_ms / 1000.0
        if not 0 <= self.start < self.end:
            raise SpanError(f"the span {self.start * unit_s:g}..{self.end * unit_s:g} s is empty or negative")
        if self.end > duration:
            raise SpanError(f"the span ends at {self.end * unit_s:g} s, after the piece's {duration * unit_s:g} s")
        if self.instruments is not None:
            unknown = sorted(set(self.instruments) - set(range(vocab.instruments.num_classes)))
            if unknown or not self.instruments:
                raise SpanError(f"the span's instruments must be classes 0..{vocab.instruments.num_classes - 1}, "
                                f"got {list(self.instruments)}")


@dataclasses.dataclass(frozen=True)
class Rearranged:
    """A piece as `rearrange` writes it (module doc).

    Attributes:
      before: int32[Tb] the events before S.
      context: int32[Tc] the given notes' events from S on (waits from S).
      middle: int32[Tm] every event in [S, E) (waits from S), then waits up to E.
      given: bool[Tm] the middle's given events (forced when a model writes the middle); waits and the
        regenerated notes' events are False.
    """

    before: np.ndarray
    context: np.ndarray
    middle: np.ndarray
    given: np.ndarray


def wait_tokens(units: int, vocab: Vocab) -> np.ndarray:
    """int32 waits that pass `units` time units as the encoding writes a rest: `wait:W` tokens, then the rest."""
    units, w = int(units), vocab.config.max_wait
    full, rest = divmod(max(units, 0), w)
    return np.asarray([vocab.wait(w)] * full + ([vocab.wait(rest)] if rest else []), np.int32)


def _regenerated(notes: Notes, span: Span) -> np.ndarray:
    """bool[N]: the notes the span regenerates."""
    mine = np.ones(len(notes), bool) if span.instruments is None else np.isin(notes.instrument, span.instruments)
    return mine & (notes.start >= span.start) & (notes.start < span.end)


def target_notes(notes: Notes, span: Span, vocab: Vocab) -> Notes:
    """The canonical notes of the piece with the span's notes ended by its end (module doc)."""
    notes = encoding.canonical_notes(notes, vocab)
    regen = _regenerated(notes, span)
    end = np.where(regen, np.minimum(notes.end, span.end), notes.end)
    return encoding.canonical_notes(dataclasses.replace(notes, end=end), vocab)


def _event_times(body: np.ndarray, vocab: Vocab, origin: int) -> np.ndarray:
    """int64[T]: the time (units) of each token of a body whose waits count from `origin`."""
    waits = vocab.wait_units[body].astype(np.int64)
    return origin + np.cumsum(waits) - waits


def rearrange(notes: Notes, span: Span, vocab: Vocab) -> Rearranged:
    """`Rearranged` bodies of `target_notes(notes, span)` (module doc). The span must fit the piece
    (`Span.check`)."""
    target = target_notes(notes, span, vocab)
    regen = _regenerated(target, span)
    given_notes = target.take(~regen)
    before, _ = encoding.notes_to_body(target, vocab, horizon=span.start)
    context, _ = encoding.notes_to_body(given_notes, vocab, origin=span.start)
    events, last = encoding.notes_to_body(target, vocab, origin=span.start, horizon=span.end)
    middle = np.concatenate([events, wait_tokens(span.end - span.start - (last if len(events) else 0), vocab)])

    # A middle event is given when a given note makes it: its attack at (start, key), or its release at
    # (end, key) (canonical notes of one key do not overlap, so each (time, key) names one note).
    def codes(time, key):
        return np.asarray(time, np.int64) << 15 | np.asarray(key, np.int64)

    key_of = given_notes.instrument.astype(np.int64) * 128 + given_notes.pitch
    attacks, releases = codes(given_notes.start, key_of), codes(given_notes.end, key_of)
    kind = vocab.kind[middle]
    code = codes(_event_times(middle, vocab, span.start),
                 vocab.instrument[middle].astype(np.int64) * 128 + vocab.pitch[middle])
    attack = (kind == TokenKind.NOTE_ON) | (kind == TokenKind.DRUM)
    given = (attack & np.isin(code, attacks)) | ((kind == TokenKind.NOTE_OFF) & np.isin(code, releases))
    return Rearranged(before.astype(np.int32), context.astype(np.int32), middle.astype(np.int32), given)


def restore(parts: Rearranged, span: Span, vocab: Vocab) -> Notes:
    """The canonical notes of a piece from its `Rearranged` bodies: the given notes from `before` and `context`,
    the regenerated ones from `before` and `middle` (a middle a model wrote restores the same way)."""
    t_before = int(vocab.wait_units[parts.before].sum())
    bridge = wait_tokens(span.start - t_before, vocab)
    given, _ = encoding.decode_tokens(np.concatenate([parts.before, bridge, parts.context]), vocab)
    written, _ = encoding.decode_tokens(np.concatenate([parts.before, bridge, parts.middle]), vocab)
    # `before` and `context` hold only given notes; `written` also holds the given notes sounding in the span.
    return encoding.canonical_notes(given.concat(written.take(_regenerated(written, span))), vocab)
