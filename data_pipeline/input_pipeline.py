"""Grain input pipeline: random training windows with MuseNet's augmentations, and eval windows.

Records. A random-access source (`source[i]` is a dict; the TFDS builder writes exactly these, and
`record_from_piece` makes one from an `EncodedPiece`) holds one piece each:

- `tokens`: int32[T] the BODY tokens (after `start`, ending with `end`).
- `timing`, `chord`, `part`, `countdown`: int32[T] structural features of the body (`features.py`); the
  `sounding` feature is computed from the tokens when a record is read.
- `label`: label name (in the vocab's label table) or empty; `instruments`: int32[K] class indices.
- `path`, `content_hash`: text (str or bytes); `duration_s`: float32; `num_notes`: int32.

Examples. An example is one window of L (= `seq_len`) positions:

    seq     = prefix (P tokens: [label] instrument.. start) + body[s : s + L + 1 - P] + pad
    inputs  = seq[:L]        targets = seq[1 : L + 1]
    loss_mask = 1 where the target is a body token (the prefix and the padding are never scored)

Batches are dicts of numpy arrays: `inputs`, `targets` int32[B, L]; `loss_mask` float32[B, L];
`timing`, `chord`, `part`, `countdown`, `sounding` int32[B, L] aligned with `inputs`. Prefix positions get
timing 0, chord 0 and sounding 0 (as in `compute_features` of a whole piece, where the prefix sits before any
wait or attack) and the part and countdown of the window's first body token, so that the model knows
where in the piece the window starts as soon as it reads the prefix. Padding gets 0 everywhere.

Training windows start at a uniformly drawn body position, moved forward to the next time-step
start (the first event after a wait) so a window never opens in the middle of a chord; the last
window of a piece ends with `end` followed by padding, and a piece shorter than a window is taken
whole. How often a piece is drawn is `InputConfig.window_sampling`:

- 'tokens' (the default): a piece of T body tokens gives w = max(1, ceil(T / W)) examples per epoch,
  W = L + 1 - (the longest prefix) the body tokens a window holds: about one window per W tokens, so
  every body token is about equally likely to be trained on, as every one is scored once in
  evaluation. The token counts come from the dataset (`datasets.token_counts`), else from reading
  every record once.
- 'pieces': one example per piece per epoch, so a 400-token chorale weighs as much as a 30,000-token
  symphony, and a corpus of many short pieces dominates training beyond its share of the music.
  It suits held-out music made mostly of such short pieces: on the bundled corpus (359 chorales of
  457 pieces, a quarter of the tokens) 'pieces' scores the chorales better and every other style
  worse than 'tokens', and its training loss falls far below the validation loss.

Evaluation windows (`make_eval_batches`) are consecutive and cover every body token of every piece
once, each with the prefix.

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
recomputed. Under 'fold', the notes held across the crop's start join them (`_held_notes`): folding can
move another note onto their key, and the collision must resolve as in the whole piece. With every
augmentation at identity this reproduces the stored tokens and features.

Determinism. The training stream is ONE global sequence of examples, the same for any number of
processes: global example g (0, 1, 2, ...) is slot `order_e[g mod n]` of epoch e = g // n (n slots, one
per example of an epoch: record i fills w_i consecutive slots, `RepeatRecords`; a fresh permutation
`order_e` per epoch, `EpochShuffle`), and all its random draws (window start, augmentation) come from
a generator seeded by (seed, g) alone. Global batch k is examples
[k * G, (k + 1) * G) with G = batch_size * process_count; a last partial global batch is dropped.

Sharding. Process p of P reads only rows [p * B, (p + 1) * B) of each global batch (B = `batch_size`,
the per-process batch), i.e. global examples k * G + p * B + r for r < B. So the processes together see
exactly the batches one process with batch_size G would see, row for row, and the stream position is
"global batches consumed", the same number on every process. Restoring on a different process count
maps that position unchanged: `make_train_iterator(..., start_batch=k)` on every new process starts at
global batch k and reads its own rows of it, with the new P (`start_batch` is what the trainer stores
in its checkpoints; Grain's `get_state`/`set_state` also resumes exactly, but only on the same P).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline import encoding
from data_pipeline import features as features_lib
from data_pipeline.vocab import END, PAD, TokenKind, Vocab

BATCH_KEYS = ("inputs", "targets", "loss_mask", *features_lib.FEATURE_NAMES)
OUT_OF_RANGE_POLICIES = ("drop", "fold")
WINDOW_SAMPLING = ("tokens", "pieces")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Input pipeline settings (field names match an ml_collections `config.data` block).

    Attributes:
      seq_len: L, the model's context in tokens (prefix included).
      batch_size: B, examples per batch on this process.
      seed: seeds the shuffle and every example's random draws (0 .. 2**32 - 1).
      shuffle: shuffle the epoch's examples (reshuffled every epoch).
      num_epochs: passes over the records (each record `w` times, see `window_sampling`); None
        repeats forever.
      window_sampling: 'tokens': a record gives one example per W of its body tokens each epoch;
        'pieces': one example per record (module docstring).
      worker_count: Grain worker processes (0: build batches in this process).
      worker_buffer_size: batches each worker keeps ready.
      read_threads: threads preparing examples in the process that builds batches (0: none, the
        caller's thread does the work when it asks for a batch).
      prefetch_buffer_size: examples those threads keep ready.
      transpose: switch for transposition; transpose_max: N, semitones (shift uniform in -N..N).
      out_of_range: what happens to notes transposed out of the pitch range: 'drop' or 'fold'.
      volume: switch for volume; volume_max_shift: M, velocity bins (shift uniform in -M..M).
      stretch: switch for timing stretch; stretch_min, stretch_max: range of the factor (uniform).
    """

    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    window_sampling: str = "tokens"
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    prefetch_buffer_size: int = 64
    transpose: bool = True
    transpose_max: int = 3
    out_of_range: str = "drop"
    volume: bool = True
    volume_max_shift: int = 2
    stretch: bool = True
    stretch_min: float = 0.95
    stretch_max: float = 1.05

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        for name in ("batch_size", "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("worker_count", "read_threads", "prefetch_buffer_size", "transpose_max",
                     "volume_max_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if self.window_sampling not in WINDOW_SAMPLING:
            raise ValueError(f"window_sampling must be one of {WINDOW_SAMPLING}, got {self.window_sampling!r}")
        if self.out_of_range not in OUT_OF_RANGE_POLICIES:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE_POLICIES}, got {self.out_of_range!r}")
        if not 0 < self.stretch_min <= self.stretch_max:
            raise ValueError(f"need 0 < stretch_min <= stretch_max, got {self.stretch_min}, {self.stretch_max}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> InputConfig:
        """From a dict or an ml_collections ConfigDict (`.to_dict()`); unknown keys are an error."""
        d = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown input config fields: {sorted(unknown)}")
        return cls(**d)

    def without_augmentation(self) -> InputConfig:
        return dataclasses.replace(self, transpose=False, volume=False, stretch=False)


# -- records ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Piece:
    """One record, validated. Arrays are int32[T] over the body tokens.

    Attributes:
      duration_units: the piece's length D in time units (the time of `end`).
    """

    tokens: np.ndarray
    timing: np.ndarray
    chord: np.ndarray
    part: np.ndarray
    countdown: np.ndarray
    sounding: np.ndarray
    label: str | None
    instruments: tuple[int, ...]
    path: str
    duration_units: int


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_from_piece(piece: encoding.EncodedPiece, vocab: Vocab, *, path: str = "",
                      content_hash: str = "") -> dict[str, Any]:
    """An `EncodedPiece` -> one source record (the dict layout in the module docstring).

    The label is read back from the piece's prefix; features are those of the body with the
    piece's duration.
    """
    body = np.asarray(piece.body, np.int32)
    feats = features_lib.compute_features(body, vocab, piece.duration_units)
    first = int(piece.tokens[0]) if len(piece.tokens) else PAD
    label = vocab.config.labels[first - vocab.label_base] if vocab.kind[first] == TokenKind.LABEL else ""
    return {
        "tokens": body,
        **{name: getattr(feats, name) for name in features_lib.STORED_FEATURE_NAMES},
        "label": label,
        "instruments": np.asarray(piece.instruments, np.int32),
        "path": path,
        "content_hash": content_hash,
        "duration_s": np.float32(piece.duration_units * vocab.config.time_unit_ms / 1000.0),
        "num_notes": np.int32(piece.num_notes),
    }


def parse_record(record: Mapping[str, Any], vocab: Vocab) -> Piece:
    """Validates a source record; raises ValueError naming the record's path."""
    path = _text(record.get("path", ""))
    where = path or "record"
    tokens = np.asarray(record["tokens"])
    if tokens.ndim != 1 or len(tokens) == 0:
        raise ValueError(f"{where}: tokens must be a non-empty 1-D array, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab.size:
        raise ValueError(f"{where}: token ids outside the vocabulary (size {vocab.size})")
    feats = {}
    for name in features_lib.STORED_FEATURE_NAMES:
        feats[name] = np.asarray(record[name], np.int32)
        if feats[name].shape != tokens.shape:
            raise ValueError(f"{where}: feature {name} has shape {feats[name].shape}, tokens {tokens.shape}")
    label = _text(record.get("label", "")) or None
    if label is not None and label not in vocab.config.labels:
        raise ValueError(f"{where}: label {label!r} is not in the vocabulary's label table")
    instruments = tuple(int(i) for i in np.asarray(record["instruments"]).reshape(-1))
    if any(not 0 <= i < vocab.instruments.num_classes for i in instruments):
        raise ValueError(f"{where}: instrument index outside 0..{vocab.instruments.num_classes - 1}")
    tokens = tokens.astype(np.int32)
    feats["sounding"] = features_lib.sounding_counts(tokens, vocab)
    duration = int(feats["timing"][-1]) + int(vocab.wait_units[tokens[-1]])
    return Piece(tokens=tokens, label=label, instruments=instruments, path=path, duration_units=duration,
                 **feats)


def max_prefix_len(vocab: Vocab) -> int:
    """The longest conditioning prefix: label, every instrument, `start`."""
    return (1 if vocab.config.labels else 0) + vocab.instruments.num_classes + 1


# -- augmentation ----------------------------------------------------------------------------------
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


def draw_augmentation(rng: np.random.Generator, config: InputConfig) -> Augmentation:
    """Draws every switched-on augmentation (always three draws, so switches do not shift the stream)."""
    shift = int(rng.integers(-config.transpose_max, config.transpose_max + 1))
    volume = int(rng.integers(-config.volume_max_shift, config.volume_max_shift + 1))
    stretch = float(rng.uniform(config.stretch_min, config.stretch_max))
    return Augmentation(shift=shift if config.transpose else 0, volume=volume if config.volume else 0,
                        stretch=stretch if config.stretch else 1.0, out_of_range=config.out_of_range)


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


def _crop_notes(tokens: np.ndarray, rel: np.ndarray, sentinel: int, vocab: Vocab) -> encoding.Notes:
    """Body tokens of a crop with their (stretched, relative >= 1) times -> notes.

    A pitched note lasts from its note-on to the next event of its key; a key whose first event in
    the crop is a release gets a note from time 0 (before the crop); a note with no later event in
    the crop ends at `sentinel`. Velocities are bins.
    """
    kind = vocab.kind[tokens]
    inst, pitch, vbin = vocab.instrument[tokens], vocab.pitch[tokens], vocab.velocity_bin_of[tokens]
    pos = np.flatnonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.NOTE_OFF))
    key = inst[pos].astype(np.int64) * 128 + pitch[pos]
    order = np.argsort(key, kind="stable")  # by key, then position (= time)
    pos, key = pos[order], key[order]
    is_on = kind[pos] == TokenKind.NOTE_ON
    same_next = np.zeros(len(pos), bool)
    same_next[:-1] = key[1:] == key[:-1]
    first_of_key = np.ones(len(pos), bool)
    first_of_key[1:] = ~same_next[:-1]
    next_time = np.full(len(pos), sentinel, np.int64)
    next_time[:-1] = np.where(same_next[:-1], rel[pos[1:]], sentinel)
    lead_off = ~is_on & first_of_key
    drums = np.flatnonzero(kind == TokenKind.DRUM)
    rows = np.concatenate([pos[is_on], pos[lead_off], drums])
    start = np.concatenate([rel[pos[is_on]], np.zeros(int(lead_off.sum()), np.int64), rel[drums]])
    end = np.concatenate([next_time[is_on], rel[pos[lead_off]], rel[drums] + 1])
    return encoding.Notes(inst[rows].astype(np.int32), pitch[rows].astype(np.int32),
                          np.maximum(vbin[rows], 0).astype(np.int32), start, end)


def _held_notes(body: np.ndarray, start: int, tokens: np.ndarray, rel: np.ndarray, sentinel: int,
                vocab: Vocab) -> encoding.Notes:
    """Pitched notes sounding at body position `start` that `_crop_notes` cannot see in the crop `tokens`.

    A key sounds at `start` when its last event before it is an attack. Its note reaches into the crop
    from time 0 and ends at the key's first event in the crop, a re-attack (rel time), or after the crop
    (`sentinel`) when the crop has none; keys whose first event in the crop is a release are `_crop_notes`'
    lead notes already. Folding can move another note onto such a key: without these notes the crop would
    resolve that collision differently from the whole piece.
    """
    def key_events(ids):
        """(positions of note-ons / -offs in `ids`, their keys instrument * 128 + pitch)."""
        kind = vocab.kind[ids]
        pos = np.flatnonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.NOTE_OFF))
        return pos, vocab.instrument[ids[pos]].astype(np.int64) * 128 + vocab.pitch[ids[pos]]

    pos, key = key_events(body[:start])
    held_key, last = np.unique(key[::-1], return_index=True)  # each key's last event before `start`
    held = pos[::-1][last]
    attack = vocab.kind[body[held]] == TokenKind.NOTE_ON
    held, held_key = held[attack], held_key[attack]
    if len(held) == 0:
        return encoding.Notes.empty()
    crop_pos, crop_key = key_events(tokens)
    crop_kind = vocab.kind[tokens]
    order = np.argsort(crop_key, kind="stable")  # by key, then position: the first event of each key first
    crop_key, crop_pos = crop_key[order], crop_pos[order]
    i = np.minimum(np.searchsorted(crop_key, held_key), max(len(crop_key) - 1, 0))
    found = (crop_key[i] == held_key) if len(crop_key) else np.zeros(len(held), bool)
    first = crop_pos[i] if len(crop_key) else np.zeros(len(held), np.int64)
    keep = ~(found & (crop_kind[first] == TokenKind.NOTE_OFF))
    end = np.where(found, rel[first], sentinel)[keep]
    held = held[keep]
    return encoding.Notes(vocab.instrument[body[held]].astype(np.int32), vocab.pitch[body[held]].astype(np.int32),
                          np.maximum(vocab.velocity_bin_of[body[held]], 0).astype(np.int32),
                          np.zeros(len(held), np.int64), end.astype(np.int64))


def _notes_to_events(notes: encoding.Notes, horizon: int, vocab: Vocab) -> np.ndarray:
    """Canonical notes -> body tokens for times 1 .. horizon - 1, waits counted from time 1.

    Events follow the encoder's order (time, releases before attacks, instrument, pitch), and a
    release is written only when its key is not re-attacked at that time (`encoding` step 6).
    """
    n = len(notes)
    drums = notes.instrument == vocab.drums_index
    key = notes.instrument.astype(np.int64) * 128 + notes.pitch
    by_key = np.lexsort((notes.start, key))
    reattacked = np.zeros(n, bool)
    reattacked[by_key[:-1]] = (key[by_key[1:]] == key[by_key[:-1]]) & (
        notes.start[by_key[1:]] == notes.end[by_key[:-1]])
    released = ~reattacked & ~drums
    on_ids = np.where(drums, vocab.drum(notes.pitch, notes.velocity),
                      vocab.note_on(np.minimum(notes.instrument, vocab.num_pitched - 1), notes.velocity,
                                    np.clip(notes.pitch, vocab.config.pitch_min, vocab.config.pitch_max)))
    times = np.concatenate([notes.start, notes.end[released]])
    ids = np.concatenate([on_ids, vocab.note_off(notes.instrument[released], notes.pitch[released])])
    sort_key = np.concatenate([(1 << 15) | key, key[released]])
    keep = (times >= 1) & (times < horizon)
    times, ids, sort_key = times[keep], ids[keep], sort_key[keep]
    if len(times) == 0:
        return np.zeros(0, np.int32)
    order = np.argsort((times << 16) | sort_key)
    times, ids = times[order], ids[order]

    # Each time step's waits go right before its first event: full `max_wait` waits, then the
    # remainder, as the encoder writes them.
    new_step = np.concatenate([[True], times[1:] != times[:-1]])
    first_event = np.flatnonzero(new_step)
    gaps = np.diff(times[first_event], prepend=1)
    max_wait = vocab.config.max_wait
    n_waits = -(-gaps // max_wait)
    waits_before = np.cumsum(n_waits) - n_waits
    out = np.empty(len(ids) + int(n_waits.sum()), np.int32)
    out[np.arange(len(ids)) + (waits_before + n_waits)[np.cumsum(new_step) - 1]] = ids
    step_of_wait = np.repeat(np.arange(len(gaps)), n_waits)
    within = np.arange(len(step_of_wait)) - waits_before[step_of_wait]
    units = np.where(within < gaps[step_of_wait] // max_wait, max_wait, gaps[step_of_wait] % max_wait)
    out[first_event[step_of_wait] + waits_before[step_of_wait] + within] = vocab.wait(units)
    return out


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
        notes = _crop_notes(tokens, rel, int(rel[-1]) + 1, vocab)
        if start > 0:
            # The notes held across the crop's start: the `sounding` feature counts them, and folding can
            # move another note onto their key (the collision must resolve as in the whole piece).
            notes = notes.concat(_held_notes(body, start, tokens, rel, int(rel[-1]) + 1, vocab))
        if aug.shift:
            pitched = notes.instrument != vocab.drums_index
            moved, keep = transpose_pitches(notes.pitch, aug.shift, aug.out_of_range, vocab)
            notes.pitch = np.where(pitched, moved, notes.pitch).astype(np.int32)
            keep |= ~pitched
            notes = encoding.Notes(notes.instrument[keep], notes.pitch[keep], notes.velocity[keep],
                                   notes.start[keep], notes.end[keep])
        if aug.volume:
            notes.velocity = np.clip(notes.velocity + aug.volume, 0, vocab.config.velocity_bins - 1)
        notes = encoding.canonical_notes(notes, vocab)
        out = _notes_to_events(notes, horizon, vocab)
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
    duration = int(_stretch(np.array([piece.duration_units]), aug.stretch)[0])
    part, countdown = features_lib.part_and_countdown(abs_timing, duration, vocab)
    held = (notes.start < 1) & (notes.end >= 1) & (notes.instrument != vocab.drums_index)
    sounding = features_lib.sounding_counts(out, vocab, notes.instrument[held].astype(np.int64) * 128
                                            + notes.pitch[held])
    return out, features_lib.Features(abs_timing.astype(np.int32), feats.chord, part, countdown, sounding)


def slice_window(piece: Piece, start: int, num_tokens: int) -> tuple[np.ndarray, features_lib.Features]:
    """Body tokens and stored features from `start`, at most `num_tokens` (no augmentation)."""
    sl = slice(start, start + num_tokens)
    return piece.tokens[sl], features_lib.Features(*(getattr(piece, name)[sl]
                                                     for name in features_lib.FEATURE_NAMES))


def snap_to_step_start(tokens: np.ndarray, position: int, limit: int, vocab: Vocab) -> int:
    """The first time-step start (position 0, or an event right after a wait) in
    `position .. position + limit - 1`, else the last one in `position - limit .. position - 1`, else
    `position` (only a piece without waits has none)."""
    lo = max(position - limit, 0)
    is_wait = vocab.wait_units[tokens[lo:position + limit]] > 0
    starts = np.flatnonzero(np.concatenate([[lo == 0], is_wait[:-1] & ~is_wait[1:]])) + lo
    after = starts[starts >= position]
    if len(after):
        return int(after[0])
    return int(starts[-1]) if len(starts) else position


# -- examples --------------------------------------------------------------------------------------
def pack_example(prefix: np.ndarray, body: np.ndarray, feats: features_lib.Features,
                 seq_len: int) -> dict[str, np.ndarray]:
    """prefix int32[P] + body int32[n <= L + 1 - P] -> one example (see module docstring)."""
    p, n = len(prefix), len(body)
    if p > seq_len or p + n > seq_len + 1:
        raise ValueError(f"prefix ({p}) + body ({n}) tokens do not fit seq_len {seq_len} + 1")
    seq = np.zeros(seq_len + 1, np.int32)
    seq[:p] = prefix
    seq[p:p + n] = body
    mask = np.zeros(seq_len, np.float32)
    mask[p - 1:p - 1 + n] = 1.0
    example = {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": mask}
    m = min(n, seq_len - p)  # body tokens that are also inputs (the last one may be a target only)
    for name in features_lib.FEATURE_NAMES:
        values = getattr(feats, name)
        row = np.zeros(seq_len, np.int32)
        row[p:p + m] = values[:m]
        if name in ("part", "countdown") and n:
            row[:p] = values[0]
        example[name] = row
    return example


def empty_example(seq_len: int) -> dict[str, np.ndarray]:
    """All padding, nothing scored (fills the last eval batch)."""
    example = {name: np.zeros(seq_len, np.int32) for name in BATCH_KEYS}
    example["loss_mask"] = np.zeros(seq_len, np.float32)
    return example


def train_example(piece: Piece, vocab: Vocab, config: InputConfig,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random (augmented) window of `piece`; every random draw comes from `rng`."""
    aug = draw_augmentation(rng, config)
    instruments = piece_instruments(piece, aug, vocab)
    prefix = vocab.prefix(piece.label, instruments)
    num_tokens = config.seq_len + 1 - len(prefix)
    latest = max(0, len(piece.tokens) - (config.seq_len + 1 - len(vocab.prefix(piece.label, piece.instruments))))
    start = snap_to_step_start(piece.tokens, int(rng.integers(0, latest + 1)), num_tokens, vocab)
    if aug.is_identity:
        body, feats = slice_window(piece, start, num_tokens)
    else:
        body, feats = augment_window(piece, start, num_tokens, aug, vocab)
    return pack_example(prefix, body, feats, config.seq_len)


class TrainWindows(grain.transforms.MapWithIndex):
    """Record -> training example; the global stream index g seeds the example's generator (picklable)."""

    def __init__(self, vocab: Vocab, config: InputConfig):
        self.vocab, self.config = vocab, config

    def map_with_index(self, index: int, record):
        rng = np.random.default_rng((self.config.seed, index))
        return train_example(parse_record(record, self.vocab), self.vocab, self.config, rng)


# -- datasets --------------------------------------------------------------------------------------
def count_tokens(source: Sequence) -> np.ndarray:
    """int64[n]: the body-token count of every record, read from the records themselves.

    Reads (and decodes) every record: a fraction of a millisecond each from ArrayRecord. A built
    dataset stores these counts (`datasets.token_counts`); this is the fallback.
    """
    return np.fromiter((len(source[i]["tokens"]) for i in range(len(source))), np.int64, len(source))


def record_windows(num_records: int, vocab: Vocab, config: InputConfig,
                   token_counts: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """int64[n]: examples each record gives per epoch under `config.window_sampling`.

    'tokens': max(1, ceil(T / W)) for a record of T body tokens, W = L + 1 - `max_prefix_len(vocab)`
    (`token_counts` required); 'pieces': 1 each (`token_counts` ignored).

    Raises:
      ValueError: counts missing, not one per record, or not all >= 1 (a body always has `end`).
    """
    if config.window_sampling == "pieces":
        return np.ones(num_records, np.int64)
    if token_counts is None:
        raise ValueError("window_sampling='tokens' needs the records' token counts")
    counts = np.asarray(token_counts, np.int64)
    if counts.shape != (num_records,):
        raise ValueError(f"token counts have shape {counts.shape}, the source has {num_records} records "
                         "(counts of another dataset or split?)")
    if num_records and counts.min() < 1:
        raise ValueError(f"token counts must be >= 1, got {counts.min()} for record {int(counts.argmin())}")
    per_window = config.seq_len + 1 - max_prefix_len(vocab)
    return np.maximum(1, -(-counts // per_window))


class RepeatRecords(grain.MapDataset):
    """Record i of its parent repeated `windows[i]` times, consecutively (slot j -> record `owner[j]`)."""

    def __init__(self, parent: grain.MapDataset, windows: np.ndarray):
        super().__init__(parent)
        if len(windows) != len(parent):
            raise ValueError(f"{len(windows)} window counts for {len(parent)} records")
        # int32: a pod's corpus has millions of slots, and workers each get a copy.
        self._owner = np.repeat(np.arange(len(parent), dtype=np.int32), windows)

    def __len__(self) -> int:
        return len(self._owner)

    def __str__(self) -> str:
        return f"RepeatRecords(records={len(self._parent)}, slots={len(self._owner)})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, slot = divmod(index, len(self._owner))
        return self._parent[int(self._owner[slot]) + epoch * len(self._parent)]


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults: the data pipeline itself does not need JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return process_index, process_count


class ProcessRows(grain.MapDataset):
    """This process's rows of each global batch of its parent (the global example stream).

    Local element i (row i mod B of local batch i // B) is global example
    (start_batch + i // B) * B * P + p * B + i mod B (see "Sharding" in the module docstring).
    """

    def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int, process_count: int,
                 start_batch: int = 0):
        super().__init__(parent)
        self._rows, self._process, self._global = batch_size, process_index, batch_size * process_count
        self._start = start_batch

    def __len__(self) -> int:
        return max(len(self._parent) // self._global - self._start, 0) * self._rows

    def __str__(self) -> str:
        return (f"ProcessRows(rows={self._rows}, process={self._process}, global_batch={self._global}, "
                f"start_batch={self._start})")

    def global_index(self, index: int) -> int:
        batch, row = divmod(index, self._rows)
        return (self._start + batch) * self._global + self._process * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.global_index(index)]


class EpochShuffle(grain.MapDataset):
    """Shuffles its parent with a fresh permutation each epoch (index // len), like
    `MapDataset.shuffle`, but at O(1) per element after one O(len) permutation per epoch.

    Why not Grain's own shuffle: its index_shuffle costs roughly 80 ms / len per element on this
    CPU (6 ms per element for 13 records, 0.15 ms for 1000), which dominates small datasets.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _shuffled_index(self, index: int) -> int:
        n = len(self._parent)
        epoch, rank = divmod(index, n)
        cached_epoch, order = self._cached  # one read: another thread may replace it meanwhile
        if cached_epoch != epoch:
            order = np.random.default_rng((self._seed, epoch)).permutation(n)
            self._cached = (epoch, order)
        return int(order[rank]) + epoch * n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._shuffled_index(index)]


def make_train_dataset(source: Sequence, vocab: Vocab, config: InputConfig, *,
                       token_counts: Sequence[int] | np.ndarray | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       start_batch: int = 0) -> grain.IterDataset:
    """The training stream as a Grain `IterDataset` of batches (see `make_train_iterator`)."""
    process_index, process_count = _process_shard(process_index, process_count)
    if config.seq_len <= max_prefix_len(vocab):
        raise ValueError(f"seq_len {config.seq_len} leaves no room after the longest prefix "
                         f"({max_prefix_len(vocab)} tokens)")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if config.window_sampling == "tokens" and token_counts is None:
        token_counts = count_tokens(source)
    windows = record_windows(len(source), vocab, config, token_counts)
    if windows.sum() < process_count:
        raise ValueError(f"{len(source)} records ({windows.sum()} examples per epoch) cannot be shared by "
                         f"{process_count} processes")
    ds = grain.MapDataset.source(source)
    if config.window_sampling != "pieces":
        ds = RepeatRecords(ds, windows)
    if config.shuffle:
        ds = EpochShuffle(ds, seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    # Windows are drawn on the global stream (index = global example g), before this process picks its rows.
    ds = ds.map_with_index(TrainWindows(vocab, config))
    ds = ProcessRows(ds, config.batch_size, process_index, process_count, start_batch)
    ds = ds.batch(config.batch_size, drop_remainder=True)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.prefetch_buffer_size))
    if config.worker_count:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return iter_ds


def make_train_iterator(source: Sequence, vocab: Vocab, config: InputConfig, *,
                        token_counts: Sequence[int] | np.ndarray | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        start_batch: int = 0) -> grain.DatasetIterator:
    """Shuffled, augmented, batched training batches for this process.

    Args:
      source: records (module docstring); anything with `__len__` and `__getitem__` that pickles if
        `config.worker_count > 0` (a list, a TFDS `ArrayRecordDataSource`).
      vocab: the vocabulary of the records' token ids.
      config: window length, per-process batch size B, seed, window sampling, augmentations.
      token_counts: int[n], the body-token count of each record (`datasets.token_counts`), for
        `window_sampling='tokens'`; None reads every record once to count them.
      process_index, process_count: p and P; this process reads rows [p * B, (p + 1) * B) of each
        global batch of B * P examples. Default `jax.process_index()` and `jax.process_count()`.
      start_batch: global batches already consumed (a resume position, valid for any P).
    Returns:
      A Grain iterator of batches (dicts of numpy arrays `BATCH_KEYS`, each [B, L]; with a finite
      `num_epochs` it stops after epochs * E // (B * P) batches, E the examples of an epoch
      (`record_windows(...).sum()`), dropping a last partial global batch) with `get_state()` /
      `set_state()` for exact resume on the same P; it also works with
      `grain.checkpoint.CheckpointSave` / `CheckpointRestore` in an orbax `CheckpointManager`.
      With `worker_count > 0` workers are spawned: call this under `if __name__ == "__main__"` with
      absl flags parsed.
    """
    return iter(make_train_dataset(source, vocab, config, token_counts=token_counts, process_index=process_index,
                                   process_count=process_count, start_batch=start_batch))


class _EvalBatch(grain.transforms.Map):
    """Batch number -> a batch of consecutive eval windows (picklable)."""

    def __init__(self, source, vocab: Vocab, seq_len: int, batches: list[list[tuple[int, int]]]):
        self.source, self.vocab, self.seq_len, self.batches = source, vocab, seq_len, batches

    def map(self, element):
        rows = []
        for record_index, start in self.batches[element]:
            if record_index < 0:
                rows.append(empty_example(self.seq_len))
                continue
            piece = parse_record(self.source[record_index], self.vocab)
            prefix = self.vocab.prefix(piece.label, piece.instruments)
            body, feats = slice_window(piece, start, self.seq_len + 1 - len(prefix))
            rows.append(pack_example(prefix, body, feats, self.seq_len))
        return {name: np.stack([row[name] for row in rows]) for name in BATCH_KEYS}


def make_eval_batches(source: Sequence, vocab: Vocab, seq_len: int, batch_size: int, *,
                      max_windows: int | None = None, token_counts: Sequence[int] | np.ndarray | None = None,
                      prefix_lengths: Sequence[int] | np.ndarray | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> grain.MapDataset:
    """Deterministic validation batches covering every body token of every record exactly once.

    Each piece is cut into consecutive windows of L + 1 - P body tokens (P its prefix length), each
    window with the prefix; every body token is a scored target exactly once. With `max_windows`
    (over all processes), only that many windows are kept, evenly spaced over the whole list, so a
    quick evaluation samples every part of the split rather than its first pieces. Windows are batched
    in record order; the last batch is filled with empty rows (loss_mask 0). Batches are dealt to
    processes in turn (batch k to process k mod n), and each process gets the same number of
    batches (empty ones at the end where needed) so multi-host evaluation steps stay in lockstep.

    The windows are laid out from each record's body-token count and prefix length: given as
    `token_counts` and `prefix_lengths` (int[n], stored with the dataset: `datasets.token_counts`,
    `datasets.prefix_lengths`), no record is read here; without them every record is read once.
    Returns a Grain `MapDataset` of batches (iterate it, index it, or `.to_iter_dataset()` it for
    prefetching); a batch reads only its own records.
    """
    process_index, process_count = _process_shard(process_index, process_count)
    if seq_len <= max_prefix_len(vocab):
        raise ValueError(f"seq_len {seq_len} leaves no room after the longest prefix "
                         f"({max_prefix_len(vocab)} tokens)")
    if (token_counts is None) != (prefix_lengths is None):
        raise ValueError("give both token_counts and prefix_lengths, or neither")
    if token_counts is None:
        pieces = (parse_record(source[i], vocab) for i in range(len(source)))
        sizes = [(len(piece.tokens), len(vocab.prefix(piece.label, piece.instruments))) for piece in pieces]
    else:
        counts, prefixes = np.asarray(token_counts, np.int64), np.asarray(prefix_lengths, np.int64)
        if counts.shape != (len(source),) or prefixes.shape != (len(source),):
            raise ValueError(f"token counts {counts.shape} and prefix lengths {prefixes.shape} for a source of "
                             f"{len(source)} records (stats of another dataset or split?)")
        if len(source) and not (counts.min() >= 1 and 1 <= prefixes.min() and prefixes.max() <= max_prefix_len(vocab)):
            raise ValueError("token counts must be >= 1 and prefix lengths within 1.."
                             f"{max_prefix_len(vocab)} (stats of another vocabulary?)")
        sizes = zip(counts.tolist(), prefixes.tolist())
    windows = []
    for i, (num_tokens, prefix_len) in enumerate(sizes):
        windows.extend((i, s) for s in range(0, num_tokens, seq_len + 1 - prefix_len))
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        if len(windows) > max_windows:
            windows = [windows[k] for k in np.linspace(0, len(windows) - 1, max_windows).round().astype(int)]
    windows.extend([(-1, 0)] * (-len(windows) % batch_size))
    batches = [windows[k:k + batch_size] for k in range(0, len(windows), batch_size)]
    batches.extend([[(-1, 0)] * batch_size] * (-len(batches) % process_count))
    mine = batches[process_index::process_count]
    return grain.MapDataset.range(len(mine)).map(_EvalBatch(source, vocab, seq_len, mine))
