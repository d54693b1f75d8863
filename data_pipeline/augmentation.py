"""MuseNet's data augmentations of one training window: transposition, volume and timing stretch.

Augmentations (MuseNet's), each with a switch in `InputConfig`, drawn once per example:

- transposition by k in [-N, N] semitones: pitched notes only, drums untouched. A note pushed out of
  the vocabulary's pitch range is dropped (`out_of_range='drop'`) or moved by whole octaves back into
  it (`'fold'`; if the range is narrower than an octave and no octave fits, the note is dropped).
  The instrument-presence prefix then lists the instruments the transposed PIECE still has (the same
  prefix `encode_midi` would write for the transposed file): an instrument disappears only when
  every one of its notes in the whole piece was dropped.
- volume: every attack's velocity bin (pitched and drums) moves by d in [-M, M], clipped to 0..V-1.
- timing stretch by a factor f in [f_min, f_max]: every time t (in units) becomes round(f * t), waits
  are re-emitted, the piece's duration becomes round(f * D), so part and countdown follow.

Augmented windows go through notes: the crop of body tokens is decoded into notes (absolute times
from the stored `timing` feature), the notes are transformed, made canonical with
`encoding.canonical_notes` (folded notes colliding with others, notes merged by a stretch), and
written back as tokens in the encoder's event order with waits re-emitted; the features are then
recomputed. Under 'fold', the notes held across the crop's start join them (`encoding.held_notes`): folding can
move another note onto their key, and the collision must resolve as in the whole piece. With every
augmentation at identity this reproduces the stored tokens and features.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import encoding
from data_pipeline import features as features_lib
from data_pipeline.vocab import END, TokenKind, Vocab
from data_pipeline.windows import Piece

OUT_OF_RANGE_POLICIES = ("drop", "fold")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One example's draw: semitones, velocity bins, time factor and the out-of-range policy."""

    shift: int = 0
    volume: int = 0
    stretch: float = 1.0
    out_of_range: str = "drop"

    @property
    def is_identity(self) -> bool:
        return self.shift == 0 and self.volume == 0 and self.stretch == 1.0


def transpose_pitches(pitch: np.ndarray, shift: int, policy: str, vocab: Vocab):
    """Shifts pitched notes by `shift` semitones under the out-of-range policy.

    Returns (new pitch int64[N], keep bool[N]): `keep` is False for dropped notes.
    """
    lo, hi = vocab.config.pitch_min, vocab.config.pitch_max
    moved = np.asarray(pitch, np.int64) + shift
    if policy == "fold":
        # Whole octaves back toward the range; a note that overshoots (range < 12) is then dropped.
        moved = np.where(moved > hi, moved - 12 * -((hi - moved) // 12), moved)
        moved = np.where(moved < lo, moved + 12 * -((moved - lo) // 12), moved)
    return moved, (moved >= lo) & (moved <= hi)


def piece_instruments(piece: Piece, aug: Augmentation, vocab: Vocab) -> tuple[int, ...]:
    """Instruments of the piece after transposition (an instrument goes when all its notes drop)."""
    if aug.shift == 0:
        return piece.instruments
    on = piece.tokens[vocab.kind[piece.tokens] == TokenKind.NOTE_ON]
    _, keep = transpose_pitches(vocab.pitch[on], aug.shift, aug.out_of_range, vocab)
    alive = np.zeros(vocab.instruments.num_classes, bool)
    alive[vocab.instrument[on[keep]]] = True
    alive[vocab.drums_index] = True
    return tuple(i for i in piece.instruments if alive[i])


def _stretch(times: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return times
    return np.floor(times * factor + 0.5).astype(np.int64)


def stretched_units(units: int, aug: Augmentation) -> int:
    """A length in time units (a piece's D) under the augmentation's timing stretch."""
    return int(_stretch(np.array([units]), aug.stretch)[0])


def shift_notes(notes: encoding.Notes, aug: Augmentation, vocab: Vocab) -> encoding.Notes:
    """The transposition and volume of `aug` applied to notes whose velocities are bins, made canonical."""
    if aug.shift:
        pitched = notes.instrument != vocab.drums_index
        moved, keep = transpose_pitches(notes.pitch, aug.shift, aug.out_of_range, vocab)
        notes = dataclasses.replace(notes, pitch=np.where(pitched, moved, notes.pitch).astype(np.int32))
        notes = notes.take(keep | ~pitched)
    if aug.volume:
        notes = dataclasses.replace(notes, velocity=np.clip(notes.velocity + aug.volume, 0,
                                                            vocab.config.velocity_bins - 1))
    return encoding.canonical_notes(notes, vocab)


def augment_notes(notes: encoding.Notes, duration: int, aug: Augmentation,
                  vocab: Vocab) -> tuple[encoding.Notes, int]:
    """A whole piece's notes (MIDI velocities, as `encoding.decode_tokens` gives them) and its duration D
    (units) under `aug`: velocities stay bin centres, times and D stretch."""
    binned = dataclasses.replace(notes, velocity=vocab.velocity_bin(notes.velocity).astype(np.int32),
                                 start=_stretch(notes.start, aug.stretch), end=_stretch(notes.end, aug.stretch))
    out = shift_notes(binned, aug, vocab)
    out = dataclasses.replace(out, velocity=vocab.bin_velocity(out.velocity).astype(np.int32))
    return out, stretched_units(duration, aug)


def augment_window(piece: Piece, start: int, num_tokens: int, aug: Augmentation,
                   vocab: Vocab) -> tuple[np.ndarray, features_lib.Features]:
    """Augmented body tokens from position `start` (a time-step start), at most `num_tokens` of them.

    Returns:
      (tokens int32[n], features of those tokens) with n <= num_tokens; n < num_tokens only when the
      window reaches the end of the piece (its last token is then `end`).
    """
    body, timing = piece.tokens, piece.timing.astype(np.int64)
    total = len(body)
    crop = num_tokens + num_tokens // 4 + 64
    while True:
        origin = int(_stretch(timing[start:start + 1], aug.stretch)[0])
        stop = min(total, start + crop)
        tokens = body[start:stop]
        times = _stretch(timing[start:stop], aug.stretch)
        rel = times - origin + 1  # the crop starts at 1; notes sounding before it start at 0
        at_end = stop == total
        # Inside the piece, time steps before the crop's last one are complete but the last may be
        # cut short: keep times < horizon, and end notes still sounding after it beyond it.
        horizon = np.iinfo(np.int64).max if at_end else int(rel[-1])
        notes = encoding.crop_notes(tokens, rel, int(rel[-1]) + 1, vocab)
        if start > 0:
            # The notes held across the crop's start: the `sounding` feature counts them, and folding can
            # move another note onto their key (the collision must resolve as in the whole piece).
            notes = notes.concat(encoding.held_notes(body, start, tokens, rel, int(rel[-1]) + 1, vocab))
        notes = shift_notes(notes, aug, vocab)
        # Crop times start at 1 (notes sounding before the crop start at 0: only their releases are written).
        out, _ = encoding.notes_to_body(notes, vocab, bins=notes.velocity, origin=1, horizon=horizon)
        if start > 0:
            # The window's first time step may have lost every event (dropped notes): open the window
            # at the next event instead of with a fragment of the wait that now precedes it.
            lead = int(np.argmax(vocab.wait_units[out] == 0)) if len(out) else 0
            out, origin = out[lead:], origin + int(vocab.wait_units[out[:lead]].sum())
        if at_end:
            out = np.append(out, np.int32(END))
        if len(out) >= num_tokens or at_end:
            break
        crop *= 2
    out = out[:num_tokens]
    feats = features_lib.compute_features(out, vocab)
    abs_timing = feats.timing.astype(np.int64) + origin
    duration = stretched_units(piece.duration_units, aug)
    part, countdown = features_lib.part_and_countdown(abs_timing, duration, vocab)
    held = (notes.start < 1) & (notes.end >= 1) & (notes.instrument != vocab.drums_index)
    sounding = features_lib.sounding_counts(out, vocab, notes.instrument[held].astype(np.int64) * 128
                                            + notes.pitch[held])
    return out, features_lib.Features(abs_timing.astype(np.int32), feats.chord, part, countdown, sounding)
