"""Per-token structural features for the model's extra embeddings (MuseNet's timing, chord, part and
countdown embeddings), computed from the tokens alone.

For tokens [T] of one piece (prefix, body, end) and its length D time units:

- `timing`: int32[T], the time in units at which the token sits: the sum of the waits before it. All
  tokens of one time step (a chord, its releases) share it; a wait token carries the time it leaves.
- `chord`: int32[T], how many attacks (note-on or drum tokens) precede the token within its time
  step, so the notes of a chord count 0, 1, 2, ...; clipped to `max_chord - 1`.
- `part`: int32[T], floor(num_parts * timing / D), in 0..num_parts-1: which of `num_parts` equal
  spans of the piece the token falls in.
- `countdown`: int32[T], remaining time D - timing in `countdown_unit_ms` steps, clipped to
  `countdown_max`: it counts down to 0 as the end approaches.
- `sounding`: int32[T], how many pitched notes sound once the token is placed (keys attacked and not
  released; a re-attack of a sounding key counts once, drums never). A model that reads only a window of
  the piece cannot see the attacks of notes held from before it; this count tells it how many there are,
  as a musician knows how many voices are holding.

The first four are stored in dataset records (`STORED_FEATURE_NAMES`); `sounding` is computed from the
tokens when a record is read. Generation computes the same values token by token as it writes a piece, from its
target length D (`musenet_jax.sampling`, tested against `compute_features` of the pieces it writes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline.vocab import TokenKind, Vocab

FEATURE_NAMES = ("timing", "chord", "part", "countdown", "sounding")
# What a dataset record holds (the TFDS builder's features); `sounding` is derived when a record is read.
STORED_FEATURE_NAMES = FEATURE_NAMES[:4]


@dataclasses.dataclass
class Features:
    """int32[T] arrays, one value per token (see module docstring)."""

    timing: np.ndarray
    chord: np.ndarray
    part: np.ndarray
    countdown: np.ndarray
    sounding: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in FEATURE_NAMES}


def part_and_countdown(timing, duration_units: int, vocab: Vocab):
    """part and countdown (int32 arrays) for token times `timing` in a piece of `duration_units`."""
    cfg = vocab.config
    timing = np.asarray(timing, np.int64)
    duration = max(int(duration_units), 1)
    part = np.clip(cfg.num_parts * np.minimum(timing, duration) // duration, 0, cfg.num_parts - 1)
    remaining_ms = np.maximum(duration_units - timing, 0) * cfg.time_unit_ms
    countdown = np.minimum(remaining_ms // cfg.countdown_unit_ms, cfg.countdown_max)
    return part.astype(np.int32), countdown.astype(np.int32)


def sounding_counts(tokens, vocab: Vocab, held_keys=()) -> np.ndarray:
    """int32[T]: pitched notes sounding after each token (the `sounding` feature).

    Args:
      tokens: int[T] token ids.
      held_keys: keys (instrument * 128 + pitch) already sounding before the first token, for a crop of a
        piece whose earlier attacks it does not hold.
    """
    tokens = np.asarray(tokens, np.int64)
    held = np.unique(np.asarray(held_keys, np.int64).reshape(-1))
    kind = vocab.kind[tokens]
    pos = np.flatnonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.NOTE_OFF))
    key = vocab.instrument[tokens[pos]].astype(np.int64) * 128 + vocab.pitch[tokens[pos]]
    order = np.argsort(key, kind="stable")  # each key's events in time order
    pos, key = pos[order], key[order]
    after = (kind[pos] == TokenKind.NOTE_ON).astype(np.int64)
    before = np.empty_like(after)
    if len(pos):
        first_of_key = np.concatenate([[True], key[1:] != key[:-1]])
        before[1:] = after[:-1]
        before[first_of_key] = np.isin(key[first_of_key], held)
    delta = np.zeros(len(tokens), np.int64)
    np.add.at(delta, pos, after - before)  # +1 an attack of a silent key, -1 a release of a sounding one
    return (len(held) + np.cumsum(delta)).astype(np.int32)


def compute_features(tokens, vocab: Vocab, duration_units: int | None = None) -> Features:
    """Structural features of one piece's tokens [T].

    Args:
      tokens: int[T] token ids.
      vocab: the vocabulary the ids belong to.
      duration_units: the piece's length in time units; defaults to the sum of all waits.
    """
    tokens = np.asarray(tokens, np.int64)
    waits = vocab.wait_units[tokens].astype(np.int64)
    timing = np.cumsum(waits) - waits
    if duration_units is None:
        duration_units = int(waits.sum())
    kind = vocab.kind[tokens]
    attack = ((kind == TokenKind.NOTE_ON) | (kind == TokenKind.DRUM)).astype(np.int64)
    attacks_before = np.cumsum(attack) - attack
    is_wait = waits > 0
    step = np.cumsum(is_wait) - is_wait  # a wait closes the step it follows
    step_start = np.concatenate([[True], step[1:] != step[:-1]]) if len(tokens) else np.zeros(0, bool)
    base = attacks_before[step_start][step] if len(tokens) else attacks_before
    chord = np.minimum(attacks_before - base, vocab.config.max_chord - 1)
    part, countdown = part_and_countdown(timing, duration_units, vocab)
    return Features(timing.astype(np.int32), chord.astype(np.int32), part, countdown,
                    sounding_counts(tokens, vocab))
