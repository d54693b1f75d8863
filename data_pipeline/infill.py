"""Infilling and accompaniment as rearrangements of a piece: what a model is given, and what it writes.

A `Span` names what is regenerated: the notes of instruments J (every instrument by default) that start in
[S, E) time units. Every other note is given, verbatim. A regenerated note ends by E (the span's end closes
it: a pitched note that sounded past E in the source is cut there; drum hits are onsets), so the piece a
model learns to complete is `target_notes(notes, span)`. `rearrange` writes it as three bodies (events and
waits, no prefix, no END), each exact in time:

- `before`: every event before S, then waits up to S (all given: no regenerated note starts before S).
- `context`: the given notes' events from S on, waits counted from S: what the regenerated part must fit,
  in and after the span (the releases of notes held across S; the other instruments when J is not all).
- `middle`: the regenerated notes' events, waits counted from S, then waits up to E: the span as the
  regenerated parts play it. Their releases at E close it.

One sequence (`infill_sequence`, the vocabulary's layout table) holds them all:

    [label] instrument.. start  before..  hole context..  fill middle.. end

so a decoder-only model reads what comes before the span, then the span's future (`context`), and writes the
middle, as fill-in-the-middle training does; the given notes inside the span sit in `context`, where the model
finds them by their time (each segment's `timing` restarts at S, so context and middle tokens of one moment
share it). Features (`data_pipeline.features`) per segment: `before` carries the piece's (timing from 0, part
and countdown over the piece's D); `hole` + context restart at S with part and countdown over the rest of the
piece (D - S) and count the given notes held across S as sounding; `fill` + middle + `end` restart at S with
part and countdown over the span (E - S), so the countdown tells the model where the span ends, and sounding
counts the regenerated notes alone: what a sampler writing the middle knows (`musenet_jax.infilling`).

Accompaniment is infilling with J the parts to write and no notes of J after the span (they are to be written
too): `drop_later` removes them. A long span is written in chunks, each a span of this kind
(`musenet_jax.infilling`). `restore` inverts `rearrange`: the notes of `restore(rearrange(notes, span, vocab),
span, vocab)` encode to the same tokens as `target_notes`. Velocities are MIDI velocities (bin centres once
encoded); times are time units.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import encoding
from data_pipeline import features as features_lib
from data_pipeline.encoding import Notes
from data_pipeline.vocab import END, Vocab


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

    def regenerated(self, notes: Notes) -> np.ndarray:
        """bool[N]: the notes the span regenerates."""
        mine = np.ones(len(notes), bool) if self.instruments is None else np.isin(notes.instrument, self.instruments)
        return mine & (notes.start >= self.start) & (notes.start < self.end)


@dataclasses.dataclass(frozen=True)
class Rearranged:
    """A piece as `rearrange` writes it (module doc): int32 bodies before [Tb], context [Tc], middle [Tm], and
    `held`, the given pitched notes sounding across S (`held_at`): context's sounding notes when it opens."""

    before: np.ndarray
    context: np.ndarray
    middle: np.ndarray
    held: Notes


def wait_tokens(units: int, vocab: Vocab) -> np.ndarray:
    """int32 waits that pass `units` time units as the encoding writes a rest: `wait:W` tokens, then the rest."""
    units, w = int(units), vocab.config.max_wait
    full, rest = divmod(max(units, 0), w)
    return np.asarray([vocab.wait(w)] * full + ([vocab.wait(rest)] if rest else []), np.int32)


def target_notes(notes: Notes, span: Span, vocab: Vocab) -> Notes:
    """The canonical notes of the piece with the span's notes ended by its end (module doc)."""
    notes = encoding.canonical_notes(notes, vocab)
    regen = span.regenerated(notes)
    end = np.where(regen, np.minimum(notes.end, span.end), notes.end)
    return encoding.canonical_notes(dataclasses.replace(notes, end=end), vocab)


def accompaniment_span(notes: Notes, duration: int, instruments, vocab: Vocab) -> Span:
    """The span that writes `instruments` (class indices) under the given notes: [0, D); `SpanError` (one line)
    when the given notes already play one of them."""
    clash = sorted(set(instruments) & set(np.unique(notes.instrument).tolist()))
    if clash:
        names = ", ".join(vocab.instruments.names[i] for i in clash)
        raise SpanError(f"the given parts already play {names}: choose other instruments to add, or leave those "
                        f"parts out of the given ones")
    return Span(0, duration, tuple(sorted(set(instruments))))


def drop_later(notes: Notes, span: Span) -> Notes:
    """The notes without those of the span's instruments that start at or after its end (accompaniment)."""
    mine = np.ones(len(notes), bool) if span.instruments is None else np.isin(notes.instrument, span.instruments)
    return notes.take(~(mine & (notes.start >= span.end)))


def body_until(notes: Notes, vocab: Vocab, *, origin: int, until: int, horizon: int | None = None) -> np.ndarray:
    """The events of canonical notes from `origin` (before `horizon`), then waits up to `until`: a body that lasts
    exactly `until - origin` units, its closing rest written as the encoding writes a rest."""
    events, last = encoding.notes_to_body(notes, vocab, origin=origin, horizon=horizon)
    return np.concatenate([events, wait_tokens(until - origin - (last if len(events) else 0), vocab)])


def rearrange(notes: Notes, span: Span, vocab: Vocab) -> Rearranged:
    """`Rearranged` bodies of `target_notes(notes, span)` (module doc). The span must fit the piece
    (`Span.check`)."""
    target = target_notes(notes, span, vocab)
    regen = span.regenerated(target)
    given = target.take(~regen)
    before = body_until(target, vocab, origin=0, until=span.start, horizon=span.start)
    context, _ = encoding.notes_to_body(given, vocab, origin=span.start)
    middle = body_until(target.take(regen), vocab, origin=span.start, until=span.end)
    return Rearranged(before.astype(np.int32), context.astype(np.int32), middle.astype(np.int32),
                      held_at(given, span.start, vocab))


def restore(parts: Rearranged, span: Span, vocab: Vocab) -> Notes:
    """The canonical notes of a piece from its `Rearranged` bodies: the given notes from `before` and `context`,
    the regenerated ones from `middle` (a middle a model wrote restores the same way)."""
    given, _ = encoding.decode_tokens(np.concatenate([parts.before, parts.context]), vocab)
    written, _ = encoding.decode_tokens(np.concatenate([wait_tokens(span.start, vocab), parts.middle]), vocab)
    return encoding.canonical_notes(given.concat(written), vocab)


def held_at(notes: Notes, time: int, vocab: Vocab) -> Notes:
    """The pitched notes sounding across `time`: started before it, ending at or after it."""
    return notes.take((notes.start < time) & (notes.end >= time) & (notes.instrument != vocab.drums_index))


def _keys(notes: Notes) -> np.ndarray:
    return notes.instrument.astype(np.int64) * 128 + notes.pitch


# -- the model's sequence ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InfillSequence:
    """The body of one infilling sequence (after the prefix) and its features (module doc).

    Attributes:
      body: int32[T] before (a tail of it) + hole + context (a head of it) + fill [+ middle + end].
      features: the `data_pipeline.features.Features` of the body's tokens.
      prompt_len: tokens up to and including `fill` (the middle starts there).
      scored: bool[T] the tokens a model is trained to predict: all but `hole` and `fill`, which sit where the
        crop put them.
    """

    body: np.ndarray
    features: features_lib.Features
    prompt_len: int
    scored: np.ndarray


def _segment_features(tokens: np.ndarray, vocab: Vocab, duration: int, held: Notes) -> features_lib.Features:
    feats = features_lib.compute_features(tokens, vocab, duration_units=duration)
    feats.sounding = features_lib.sounding_counts(tokens, vocab, _keys(held))
    return feats


def _step_starts(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Positions where a time step opens: 0, and every event right after a wait."""
    is_wait = vocab.wait_units[tokens] > 0
    return np.flatnonzero(np.concatenate([[True], is_wait[:-1] & ~is_wait[1:]]))


def infill_sequence(parts: Rearranged, span: Span, duration: int, vocab: Vocab, *, before_tokens: int,
                    context_tokens: int, with_middle: bool = True) -> InfillSequence:
    """The sequence of a piece's `rearrange(notes, span)` (module doc), cropped to fit a context.

    Args:
      parts: the piece rearranged around `span`; duration: the piece's length D (units).
      before_tokens: at most this many tokens of `before`, its tail, opening at a time step's start.
      context_tokens: at most this many tokens of `context`, its head.
      with_middle: write the middle and `end` (training, scoring); False stops at `fill` (a sampler's prompt).
    """
    s, e = span.start, span.end
    before_feats = features_lib.compute_features(parts.before, vocab, duration_units=duration)
    opens = _step_starts(parts.before, vocab) if len(parts.before) else np.zeros(1, np.int64)
    cut = opens[opens >= len(parts.before) - before_tokens]
    first = int(cut[0]) if len(cut) else len(parts.before)
    segments = [(parts.before[first:], _slice(before_feats, first, None))]
    hole = np.concatenate([[vocab.hole], parts.context[:max(context_tokens, 0)]]).astype(np.int32)
    segments.append((hole, _segment_features(hole, vocab, duration - s, parts.held)))
    tail = [vocab.fill] + (list(parts.middle) + [END] if with_middle else [])
    fill = np.asarray(tail, np.int32)
    segments.append((fill, _segment_features(fill, vocab, e - s, Notes.empty())))
    body = np.concatenate([tokens for tokens, _ in segments]).astype(np.int32)
    feats = features_lib.Features(*(np.concatenate([getattr(f, name) for _, f in segments]).astype(np.int32)
                                    for name in features_lib.FEATURE_NAMES))
    scored = np.ones(len(body), bool)
    prompt_len = len(segments[0][0]) + len(hole) + 1
    scored[[len(segments[0][0]), prompt_len - 1]] = False
    return InfillSequence(body, feats, prompt_len, scored)


def _slice(feats: features_lib.Features, lo: int, hi: int | None) -> features_lib.Features:
    return features_lib.Features(*(getattr(feats, name)[lo:hi] for name in features_lib.FEATURE_NAMES))


# -- training tasks ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskMix:
    """How often a training example is an infilling or an accompaniment task instead of a plain window.

    Attributes:
      infill_rate: share of examples that regenerate a span (of every instrument, or of one when the piece has
        several: `one_part_rate` of them), `infill_seconds` long (uniform).
      accompany_rate: share that write some of the piece's parts (a random non-empty proper subset) under the
        others over `accompany_seconds` (uniform), with none of those parts after the span (`drop_later`).
    """

    infill_rate: float = 0.0
    accompany_rate: float = 0.0
    one_part_rate: float = 0.3
    infill_seconds: tuple[float, float] = (1.0, 4.0)
    accompany_seconds: tuple[float, float] = (4.0, 12.0)

    def __post_init__(self):
        for name in ("infill_rate", "accompany_rate", "one_part_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.infill_rate + self.accompany_rate > 1.0:
            raise ValueError(f"infill_rate + accompany_rate must be <= 1, got {self.infill_rate + self.accompany_rate}")
        for name in ("infill_seconds", "accompany_seconds"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) seconds with 0 < low <= high, got {(lo, hi)}")

    @property
    def active(self) -> bool:
        return self.infill_rate + self.accompany_rate > 0


def draw_task(instruments, duration: int, mix: TaskMix, rng: np.random.Generator,
              vocab: Vocab) -> tuple[Span, bool] | None:
    """A random task for a piece that plays `instruments` (class indices) for `duration` units: (span,
    accompaniment?), or None for a plain window. Always makes the same draws, so the stream of a piece does not
    depend on which task it got; needs no notes, so a caller decodes a piece only for a task."""
    u, share, pick, subset = rng.random(), rng.random(), rng.integers(1 << 30), rng.random(64)
    instruments = np.unique(np.asarray(instruments, np.int64))
    unit_s = vocab.config.time_unit_ms / 1000.0
    accompany = mix.infill_rate <= u < mix.infill_rate + mix.accompany_rate
    if u >= mix.infill_rate + mix.accompany_rate or duration < 2 or len(instruments) == 0:
        return None
    if accompany and len(instruments) < 2:
        accompany = False  # one part: nothing to accompany, regenerate a span of it instead
    lo, hi = mix.accompany_seconds if accompany else mix.infill_seconds
    length = max(1, min(duration - 1, round((lo + (hi - lo) * share) / unit_s)))
    start = int(pick % (duration - length + 1))
    if accompany:
        chosen = instruments[subset[:len(instruments)] < 0.5]
        if len(chosen) in (0, len(instruments)):
            chosen = instruments[[pick % len(instruments)]]
        return Span(start, start + length, tuple(int(i) for i in chosen)), True
    one = len(instruments) > 1 and subset[0] < mix.one_part_rate
    return Span(start, start + length, (int(instruments[pick % len(instruments)]),) if one else None), False


def fit_span(notes: Notes, span: Span, accompany: bool, room: int,
             vocab: Vocab) -> tuple[Notes, Span, Rearranged] | None:
    """The task's notes (without the span's parts after it, for accompaniment), its span shortened (halved) until the
    middle and `end` take at most half of `room` tokens, and its parts; None when even a one-unit span does not."""
    while True:
        task_notes = drop_later(notes, span) if accompany else notes
        parts = rearrange(task_notes, span, vocab)
        if len(parts.middle) + 1 <= room // 2:
            return task_notes, span, parts
        if span.end - span.start <= 1:
            return None
        span = dataclasses.replace(span, end=span.start + (span.end - span.start) // 2)


def task_sequence(notes: Notes, duration: int, span: Span, accompany: bool, room: int, vocab: Vocab,
                  rng: np.random.Generator) -> InfillSequence | None:
    """A training sequence of `room` body tokens at most for a drawn task (`fit_span`); what the middle leaves is
    shared between `before` and `context` at a random ratio (what one side cannot use, the other gets)."""
    share = 0.25 + 0.5 * rng.random()
    fitted = fit_span(notes, span, accompany, room, vocab)
    if fitted is None:
        return None
    _, span, parts = fitted
    free = room - len(parts.middle) - 3  # hole, fill, end
    before = min(len(parts.before), int(free * share))
    context = min(len(parts.context), free - before)
    before = min(len(parts.before), free - context)
    return infill_sequence(parts, span, duration, vocab, before_tokens=before, context_tokens=context)
