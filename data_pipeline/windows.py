"""Pieces and their windows: the rules that training, evaluation and sampling share, with no Grain.

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

A window opens at a time-step start (`snap_to_step_start`: the first event after a wait), so it never opens
in the middle of a chord; `slice_window` cuts a piece's stored tokens and features from there and
`pack_example` lays a prefix and a window out as one example.

Scoring every token once (`plan_windows`, used by the trainer's validation and by `musenet-eval`). A piece
with P prefix tokens fits C = L + 1 - P body tokens in one window. The first window (s = 0) scores all its body
tokens; each later window ends S body tokens further (the last one at the end of the piece, full) and scores
only the body tokens not scored before, i.e. at most its last S. So a token scored in a later window sees at
least L + 1 - S >= L - S tokens before it (prefix included); prefix tokens are never scored. S = C (the
trainer's validation) scores each token once with the fewest windows; S = L // 2 (`musenet-eval`'s default)
gives every token at least half a window of context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import encoding
from data_pipeline import features as features_lib
from data_pipeline.vocab import PAD, TokenKind, Vocab

BATCH_KEYS = ("inputs", "targets", "loss_mask", *features_lib.FEATURE_NAMES)


# -- records and pieces ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece to train on or score: a validated record (`parse_record`). Arrays are int32[T] over the body
    tokens (after `start`, ending with `end`), the features those of the whole piece (`features.py`).

    Attributes:
      label, instruments: its conditioning (label name or None; instrument class indices).
      path: where it came from (reports name the piece by it).
      duration_units: the piece's length D in time units (the time of `end`).
      prefix: int32[P] its conditioning prefix `[label] instrument.. start`.
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
    prefix: np.ndarray

    @property
    def body(self) -> np.ndarray:
        return self.tokens

    @property
    def name(self) -> str:
        return self.path

    @property
    def features(self) -> features_lib.Features:
        return features_lib.Features(*(getattr(self, name) for name in features_lib.FEATURE_NAMES))

    @classmethod
    def from_encoded(cls, piece: encoding.EncodedPiece, vocab: Vocab, name: str = "") -> Piece:
        """From `encode_midi` / `encode_notes` output, as a dataset would store and read it."""
        return parse_record(record_from_piece(piece, vocab, path=name), vocab)


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
                 prefix=vocab.prefix(label, instruments).astype(np.int32), **feats)


def max_prefix_len(vocab: Vocab) -> int:
    """The longest conditioning prefix: label, every instrument, `start`."""
    return (1 if vocab.config.labels else 0) + vocab.instruments.num_classes + 1


# -- windows ---------------------------------------------------------------------------------------
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


# -- scoring every token once ----------------------------------------------------------------------
def default_stride(seq_len: int) -> int:
    return max(seq_len // 2, 1)


def plan_windows(num_body: int, prefix_len: int, seq_len: int, stride: int) -> np.ndarray:
    """The windows that score a piece's n body tokens once each (module doc: scoring every token once).

    Args:
      num_body: n, body tokens of the piece.
      prefix_len: P, tokens of its conditioning prefix.
      seq_len: L, the window length in tokens (prefix included).
      stride: S, body tokens a later window moves by; 1 <= S <= L + 1 - P.
    Returns:
      int64[W, 3] rows (start, score_from, score_to) in body positions: the window holds body tokens
      start .. start + L - P and scores body[score_from : score_to]. The score ranges tile 0..n.
    """
    capacity = seq_len + 1 - prefix_len  # C, body tokens one window holds (the last one as a target only)
    if capacity < 1:
        raise ValueError(f"a {prefix_len}-token prefix leaves no room in a {seq_len}-token window")
    if not 1 <= stride <= capacity:
        raise ValueError(f"stride must be in 1..{capacity} (L + 1 - P for L={seq_len}, P={prefix_len}), "
                         f"got {stride}")
    windows = [(0, 0, min(num_body, capacity))]
    end = windows[0][2]
    while end < num_body:
        new_end = min(end + stride, num_body)
        windows.append((new_end - capacity, end, new_end))
        end = new_end
    return np.asarray(windows, np.int64).reshape(-1, 3)


def window_example(piece: Piece, window: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
    """One [L] row (`data_pipeline.windows.BATCH_KEYS`) for `window` = (start, score_from, score_to).

    The layout is the training pipeline's; `loss_mask` is 1 only on the targets body[score_from:score_to].
    """
    start, lo, hi = (int(x) for x in window)
    p = len(piece.prefix)
    sl = slice(start, start + seq_len + 1 - p)
    feats = features_lib.Features(*(getattr(piece, name)[sl] for name in features_lib.FEATURE_NAMES))
    example = pack_example(piece.prefix, piece.body[sl], feats, seq_len)
    mask = np.zeros(seq_len, np.float32)
    # Body token k is the target at position p - 1 + (k - start).
    mask[p - 1 + lo - start:p - 1 + hi - start] = 1.0
    example["loss_mask"] = mask
    return example
