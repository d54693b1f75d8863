"""Held-out scoring of infilling and accompaniment: what seeing the span's future (or the given parts) is worth.

For each held-out piece, spans are drawn as training draws them (`data_pipeline.infill.draw_task`, a generator
seeded by (seed, piece index), so every model is scored on the same spans): `infill` regenerates a 1-4 s span
(of every instrument, or of one part of several), `accompany` writes a random proper subset of the parts over
4-12 s with none of them after it, each shortened as training shortens it until its middle takes at most half a
window (`fit_span`). The piece to complete is `target_notes` (the regenerated notes ended by E).

Each span is scored twice by the same model, on the same tokens:

- infilling: the span's infilling sequence (`infill_sequence`: prefix, `before`, `hole`, `context`, `fill`,
  middle, `end`), `before` and `context` cropped to half each of what the middle leaves of one window;
- continuation: the target piece encoded as usual, scored left to right by windows whose ends are half a window
  apart, so that each token sees at least half a window of its past and none of its future (as `musenet-eval`
  scores a piece, and as a model writes it).

The tokens compared are the regenerated notes' events (note-ons, note-offs, drum hits), matched by (time, id):
the waits differ between the two layouts (the middle's waits only join regenerated events), and a release at E
is not written in the full piece when its key is re-attacked there, so only the events both sequences hold are
counted. Infilling's whole middle (its waits and `end` too) is reported beside, in bits/token. A span that does
not fit (a one-unit span's middle over half a window) is skipped (counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipeline import encoding, infill
from data_pipeline import windows as windows_lib
from data_pipeline.vocab import TokenKind, Vocab

TASKS = ("infill", "accompany")
_EVENTS = (TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM)


@dataclasses.dataclass(frozen=True)
class SpanExample:
    """One span as scored rows (`windows.BATCH_KEYS` arrays [L]): `infill` and the `continuation` windows score the
    same `events` tokens; `middle` marks all of infilling's middle tokens (events, waits, `end`); `kind` is
    'every part' (the span regenerates every instrument) or 'some parts' (the others are given inside it)."""

    infill: dict
    continuation: list[dict]
    middle: np.ndarray
    events: int
    kind: str


def _events_at(tokens: np.ndarray, timing: np.ndarray, vocab: Vocab) -> np.ndarray:
    """int64 codes (time, id) of the event tokens among `tokens` (others: -1)."""
    is_event = np.isin(vocab.kind[tokens], _EVENTS)
    return np.where(is_event, (timing.astype(np.int64) << 20) | tokens, -1)


def span_example(piece: windows_lib.Piece, notes: encoding.Notes, duration: int, span: infill.Span,
                 accompany: bool, vocab: Vocab, seq_len: int) -> SpanExample | None:
    """The two rows of one span of a piece (its notes and length D decoded from its body; module doc), or None
    when it does not fit a window."""
    prefix = vocab.prefix(piece.label, np.unique(notes.instrument).tolist())
    room = seq_len + 1 - len(prefix)
    fitted = infill.fit_span(notes, span, accompany, room, vocab)
    if fitted is None:
        return None
    notes, span, parts = fitted
    target = infill.target_notes(notes, span, vocab)
    free = room - len(parts.middle) - 3
    before = min(len(parts.before), free // 2)
    context = min(len(parts.context), free - before)
    seq = infill.infill_sequence(parts, span, duration, vocab, before_tokens=free - context,
                                 context_tokens=context)
    middle = np.arange(len(seq.body)) >= seq.prompt_len
    codes = np.where(middle, _events_at(seq.body, seq.features.timing + span.start, vocab), -1)

    encoded = encoding.encode_notes(target, vocab, label=piece.label)
    whole = windows_lib.Piece.from_encoded(encoded, vocab, name=piece.name)
    plain = _events_at(whole.body, whole.timing, vocab)
    shared = np.intersect1d(codes[codes >= 0], plain[plain >= 0])
    if not len(shared):
        return None
    at = np.flatnonzero(np.isin(plain, shared))
    continuation = []
    capacity = seq_len + 1 - len(whole.prefix)
    lo, hi = int(at[0]), int(at[-1]) + 1
    while lo < hi:  # windows ending half a window apart: each token sees at least half a window of its past
        stop = min(lo + capacity // 2, hi)
        start = max(0, stop - capacity)
        row = windows_lib.window_example(whole, (start, lo, stop), seq_len)
        row["loss_mask"][:] = 0.0
        mine = at[(at >= lo) & (at < stop)]
        row["loss_mask"][len(whole.prefix) - 1 + mine - start] = 1.0
        continuation.append(row)
        lo = stop

    row = windows_lib.pack_example(prefix, seq.body, seq.features, seq_len)
    targets = len(prefix) - 1 + np.arange(len(seq.body))  # body token k is the target at p - 1 + k
    row["loss_mask"][:] = 0.0
    row["loss_mask"][targets[np.isin(codes, shared)]] = 1.0
    middle_mask = np.zeros(seq_len, np.float32)
    middle_mask[targets[middle]] = 1.0
    return SpanExample(row, continuation, middle_mask, len(shared),
                       "every part" if span.instruments is None else "some parts")


def span_examples(pieces: Sequence[windows_lib.Piece], task: str, vocab: Vocab, seq_len: int, *,
                  spans_per_piece: int = 4, seed: int = 0) -> tuple[list[SpanExample], int]:
    """`spans_per_piece` spans of each piece for `task` (module doc); returns (examples, spans skipped)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    mix = infill.TaskMix(infill_rate=1.0) if task == "infill" else infill.TaskMix(accompany_rate=1.0)
    examples, skipped = [], 0
    for index, piece in enumerate(pieces):
        rng = np.random.default_rng((seed, index))
        notes, duration = encoding.decode_tokens(piece.body, vocab)
        for _ in range(spans_per_piece):
            drawn = infill.draw_task(notes.instrument, duration, mix, rng, vocab)
            if drawn is None or drawn[1] != (task == "accompany"):
                skipped += 1  # a piece of one part has nothing to accompany
                continue
            example = span_example(piece, notes, duration, *drawn, vocab, seq_len)
            if example is None:
                skipped += 1
            else:
                examples.append(example)
    return examples, skipped


def score_spans(scorer, examples: Sequence[SpanExample]) -> dict:
    """Bits of the span examples under `scorer` (`evaluation.Scorer`): per event token for infilling and for
    continuation (and velocity-free), the gain, infilling's bits per middle token; and the same by `kind`."""
    bsz, seq_len = scorer.batch_size, scorer.seq_len

    def forward(rows):
        """float64[len(rows), 2]: each row's summed bits and velocity-free bits, B rows per forward."""
        out = np.zeros((len(rows), 2))
        for lo in range(0, len(rows), bsz):
            chunk = rows[lo:lo + bsz] + [windows_lib.empty_example(seq_len)] * (bsz - len(rows[lo:lo + bsz]))
            bits, bits_nv = scorer({k: np.stack([r[k] for r in chunk]) for k in windows_lib.BATCH_KEYS})
            n = min(bsz, len(rows) - lo)
            out[lo:lo + n] = np.stack([bits.sum(axis=1), bits_nv.sum(axis=1)], axis=1)[:n]
        return out

    infill_bits = forward([e.infill for e in examples])
    owner = np.repeat(np.arange(len(examples)), [len(e.continuation) for e in examples])
    plain_bits = np.zeros((len(examples), 2))
    np.add.at(plain_bits, owner, forward([r for e in examples for r in e.continuation]))
    middle_bits = forward([dict(e.infill, loss_mask=e.middle) for e in examples])[:, 0]

    def summary(rows: np.ndarray) -> dict:
        events = int(sum(examples[i].events for i in rows))
        middle = int(sum(examples[i].middle.sum() for i in rows))
        infill, plain = infill_bits[rows].sum(axis=0), plain_bits[rows].sum(axis=0)
        per = (lambda x: float(x / events) if events else None)
        return {"spans": len(rows), "event_tokens": events, "infill_bits_per_event": per(infill[0]),
                "continuation_bits_per_event": per(plain[0]), "infill_bits_per_event_no_velocity": per(infill[1]),
                "continuation_bits_per_event_no_velocity": per(plain[1]),
                "infill_gain": float(1.0 - infill[0] / plain[0]) if plain[0] else None, "middle_tokens": middle,
                "infill_bits_per_middle_token": float(middle_bits[rows].sum() / middle) if middle else None}

    kinds = sorted({e.kind for e in examples})
    return {**summary(np.arange(len(examples))),
            "by_kind": {k: summary(np.flatnonzero([e.kind == k for e in examples])) for k in kinds}}
