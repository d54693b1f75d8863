"""The MuseNet vocabulary: token ids <-> meanings, built from a small `VocabConfig`.

One token is one event. With I pitched instrument classes, V velocity bins, P pitches
(`pitch_min..pitch_max`), W wait lengths and L labels, ids are laid out in this order:

| block                | count      | text form           | meaning                                        |
|----------------------|------------|---------------------|------------------------------------------------|
| specials             | 3          | `pad` `start` `end` | padding; start of the music; end of the piece  |
| waits                | W          | `wait:N`            | advance time by N units (N = 1..W)             |
| note-on              | I * V * P  | `piano:v68:C4`      | instrument, velocity (bin centre), pitch       |
| note-off             | I * P      | `piano:v0:C4`       | release (volume 0)                             |
| drum onset           | V * 128    | `drums:v68:C2`      | drum note (GM percussion key) at a velocity    |
| instrument presence  | I + 1      | `piano` .. `drums`  | conditioning: this instrument plays            |
| tasks                | 2 (or 0)   | `hole` `fill`       | infilling: the span's future, then the span     |
| labels               | L          | `bach`              | conditioning: genre / composer / source        |

Ids inside a block run instrument-major, then velocity bin, then pitch. Labels come last, so two
vocabularies that differ only in their label table agree on every other id.

A piece is written `[label] instrument.. start body.. end`: the conditioning prefix is the optional
label, then one presence token per instrument that plays (in table order), then `start`. A piece with a
span to regenerate (infilling, accompaniment: `data_pipeline.infill`) is written
`[label] instrument.. start before.. hole context.. fill middle.. end`: what comes before the span, then
`hole` and the given notes from the span's start on, then `fill` and the regenerated notes of the span.
The task tokens came with format v2 (`infill=True`, the default); a v1 vocab.json loads with
`infill=False`: no task block, every id as before, and its models can only continue a piece. Velocity
bins split 1..127 into V near-equal ranges; the text form prints each bin's centre and parses any
velocity 1..127 into its bin. Pitch names are scientific (MIDI 60 = C4, 0 = C-1), sharps only.

The time unit (`time_unit_ms`, default 10 ms) and all other encoding parameters live in the config,
which is saved beside datasets and models as `vocab.json`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from data_pipeline import instruments as instruments_lib
from data_pipeline import outputs

PAD, START, END = 0, 1, 2
SPECIAL_NAMES = ("pad", "start", "end")
TASK_NAMES = ("hole", "fill")
NUM_DRUM_NOTES = 128

_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_NOTE_INDEX = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_PITCH_RE = re.compile(r"^([A-G])(#|b)?(-?\d+)$")
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class TokenKind(enum.IntEnum):
    SPECIAL = 0
    WAIT = 1
    NOTE_ON = 2
    NOTE_OFF = 3
    DRUM = 4
    INSTRUMENT = 5
    LABEL = 6
    TASK = 7


def pitch_name(pitch: int) -> str:
    return f"{_NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def parse_pitch(text: str) -> int:
    match = _PITCH_RE.match(text)
    if not match:
        raise ValueError(f"bad pitch {text!r} (expected e.g. C4, F#3, Bb-1)")
    letter, accidental, octave = match.groups()
    pitch = _NOTE_INDEX[letter] + {"#": 1, "b": -1, None: 0}[accidental] + 12 * (int(octave) + 1)
    if not 0 <= pitch <= 127:
        raise ValueError(f"pitch {text!r} is outside MIDI range 0..127")
    return pitch


def normalize_label(text: str) -> str:
    """Folds a free-form genre / composer / folder name into a label token name."""
    label = re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")
    if not label:
        raise ValueError(f"label {text!r} has no letters or digits")
    return label


@dataclasses.dataclass(frozen=True)
class VocabConfig:
    """Every parameter of the encoding; saved as `vocab.json` with datasets and models.

    Attributes:
      instrument_set: `musenet10` (default) or `gm`; see `data_pipeline.instruments`.
      velocity_bins: V, velocity bins of every note-on and drum token.
      pitch_min, pitch_max: pitched range kept (inclusive); notes outside it are dropped and counted.
      time_unit_ms: one time unit, in milliseconds.
      max_wait: W, the longest single wait token, in time units (longer rests use several).
      labels: label table (genre / composer / source), in id order.
      num_parts: the part feature splits a piece into this many equal spans of time.
      countdown_max: the countdown feature starts at this value and falls to 0 at the end.
      countdown_unit_ms: one countdown step, in milliseconds of music.
      max_chord: chord-index feature values are clipped to max_chord - 1.
      sustain: `extend` (sustain pedal CC64 >= 64 holds notes until release) or `ignore`.
      drum_duration_units: length written for drum hits when decoding, in time units.
      infill: the vocabulary has the task tokens `hole` and `fill` (format v2); False for a v1 vocab.json.
    """

    instrument_set: str = "musenet10"
    velocity_bins: int = 16
    pitch_min: int = 0
    pitch_max: int = 127
    time_unit_ms: int = 10
    max_wait: int = 128
    labels: tuple[str, ...] = ()
    num_parts: int = 128
    countdown_max: int = 127
    countdown_unit_ms: int = 1000
    max_chord: int = 64
    sustain: str = "extend"
    drum_duration_units: int = 10
    infill: bool = True

    def __post_init__(self):
        instruments_lib.get_instrument_set(self.instrument_set)
        if not 1 <= self.velocity_bins <= 127:
            raise ValueError(f"velocity_bins must be in 1..127, got {self.velocity_bins}")
        if not 0 <= self.pitch_min <= self.pitch_max <= 127:
            raise ValueError(f"bad pitch range {self.pitch_min}..{self.pitch_max}")
        for name in ("time_unit_ms", "max_wait", "num_parts", "countdown_unit_ms", "max_chord",
                     "drum_duration_units"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.countdown_max < 0:
            raise ValueError("countdown_max must be >= 0")
        if self.sustain not in ("extend", "ignore"):
            raise ValueError(f"sustain must be 'extend' or 'ignore', got {self.sustain!r}")
        object.__setattr__(self, "labels", tuple(self.labels))
        reserved = set(SPECIAL_NAMES) | set(TASK_NAMES) | {"wait"} | set(
            instruments_lib.get_instrument_set(self.instrument_set).names)
        seen = set()
        for label in self.labels:
            if not _LABEL_RE.match(label):
                raise ValueError(f"label {label!r} must match [a-z0-9][a-z0-9_]* (normalize_label)")
            if label in reserved:
                raise ValueError(f"label {label!r} collides with a reserved token name")
            if label in seen:
                raise ValueError(f"label {label!r} appears twice")
            seen.add(label)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["labels"] = list(self.labels)
        return out

    def differences(self, other: VocabConfig) -> str:
        """The fields that differ, as `field: mine vs other` (for one-line errors; long values shortened)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return "; ".join(f"{k}: {_short(mine[k])} vs {_short(theirs[k])}" for k in mine if mine[k] != theirs[k])

    @classmethod
    def from_dict(cls, d: dict) -> VocabConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"format", "size"}
        if unknown:
            raise ValueError(f"vocab config has unknown fields: {sorted(unknown)}")
        for field in dataclasses.fields(cls):  # JSON types: a wrong one would fail later, far from here
            value, kind = d.get(field.name, field.default), type(field.default)
            if field.name == "labels":
                if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
                    raise ValueError(f"vocab config labels must be a list of strings, got {value!r}")
            elif kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"vocab config {field.name} must be true or false, got {value!r}")
            elif not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"vocab config {field.name} must be {kind.__name__}, got {value!r}")
        return cls(**{k: (tuple(v) if k == "labels" else v) for k, v in d.items() if k in known})


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Vocab:
    """Token id <-> meaning for one `VocabConfig`, with vectorised lookup tables.

    Lookup tables (numpy, one entry per id): `kind` (TokenKind), `instrument` (class index, -1 if
    none), `pitch` (-1 if none), `velocity_bin` (-1 if none), `wait_units` (0 unless a wait).
    """

    FORMAT = "musenet-vocab-v2"
    OLD_FORMATS = ("musenet-vocab-v1",)  # loaded with infill=False (they predate the task tokens)

    def __init__(self, config: VocabConfig | None = None):
        self.config = config = config or VocabConfig()
        self.instruments = instruments_lib.get_instrument_set(config.instrument_set)
        self.num_pitched = self.instruments.num_classes - 1
        self.drums_index = self.instruments.drums_index
        self.num_pitches = config.pitch_max - config.pitch_min + 1
        v, p, i = config.velocity_bins, self.num_pitches, self.num_pitched
        self.wait_base = len(SPECIAL_NAMES)
        self.on_base = self.wait_base + config.max_wait
        self.off_base = self.on_base + i * v * p
        self.drum_base = self.off_base + i * p
        self.instrument_base = self.drum_base + v * NUM_DRUM_NOTES
        self.task_base = self.instrument_base + self.instruments.num_classes
        self.label_base = self.task_base + (len(TASK_NAMES) if config.infill else 0)
        self.size = self.label_base + len(config.labels)
        self._label_index = {name: k for k, name in enumerate(config.labels)}
        self._build_velocity_tables()
        self._build_lookup_tables()

    # -- velocity bins -----------------------------------------------------------------------------
    def _build_velocity_tables(self):
        v = self.config.velocity_bins
        velocities = np.arange(128)
        bins = np.clip((velocities - 1) * v // 127, 0, v - 1)
        bins[0] = 0  # velocity 0 is a note-off and never binned; keep the table total anyway
        self._velocity_to_bin = bins.astype(np.int32)
        centres = []
        for b in range(v):
            members = np.nonzero(bins[1:] == b)[0] + 1
            centres.append(int((members.min() + members.max()) // 2))
        self._bin_to_velocity = np.array(centres, np.int32)

    def velocity_bin(self, velocity):
        """Velocity 0..127 (scalar or array) -> bin 0..V-1 (0 shares bin 0; it is never an attack)."""
        return self._velocity_to_bin[velocity]

    def bin_velocity(self, vbin):
        """Bin -> the velocity written when decoding (the bin's centre)."""
        return self._bin_to_velocity[vbin]

    # -- ids -------------------------------------------------------------------------------------
    def wait(self, units):
        units = np.asarray(units)
        if np.any((units < 1) | (units > self.config.max_wait)):
            raise ValueError(f"wait must be 1..{self.config.max_wait} units")
        return self.wait_base + units - 1

    def note_on(self, instrument, vbin, pitch):
        v, p = self.config.velocity_bins, self.num_pitches
        return self.on_base + (np.asarray(instrument) * v + vbin) * p + (np.asarray(pitch) - self.config.pitch_min)

    def note_off(self, instrument, pitch):
        return self.off_base + np.asarray(instrument) * self.num_pitches + (np.asarray(pitch) - self.config.pitch_min)

    def drum(self, pitch, vbin):
        return self.drum_base + np.asarray(vbin) * NUM_DRUM_NOTES + pitch

    def instrument_token(self, instrument):
        return self.instrument_base + np.asarray(instrument)

    @property
    def hole(self) -> int:
        """The `hole` id: the given notes from the span's start follow (`data_pipeline.infill`)."""
        return self._task(0)

    @property
    def fill(self) -> int:
        """The `fill` id: the regenerated notes of the span follow."""
        return self._task(1)

    def _task(self, index: int) -> int:
        if not self.config.infill:
            raise ValueError("this vocabulary has no infilling tokens (a format v1 vocab.json, from before "
                             "infilling): its models can only continue a piece")
        return self.task_base + index

    def label_token(self, label: str) -> int:
        if label not in self._label_index:
            raise ValueError(f"unknown label {label!r}; valid: {', '.join(self.config.labels) or '(none)'}")
        return self.label_base + self._label_index[label]

    @functools.cached_property
    def event_ids(self) -> np.ndarray:
        """Body event -> token id, as one table for vectorised encoding: int32[2 * C * 128 * V].

        With C instrument classes (drums included) and V velocity bins, entry
        `((phase * C + instrument) * 128 + pitch) * V + vbin` is the id of a release (phase 0:
        `note_off`, any vbin) or an attack (phase 1: `note_on`, or `drum` for the drums class), for
        every MIDI pitch 0..127 (the id formulas' values, even outside `pitch_min..pitch_max`).
        """
        inst, pitch, vbin = np.meshgrid(np.arange(self.instruments.num_classes), np.arange(128),
                                        np.arange(self.config.velocity_bins), indexing="ij")
        attack = np.where(inst == self.drums_index, self.drum(pitch, vbin), self.note_on(inst, vbin, pitch))
        table = np.stack([self.note_off(inst, pitch), attack]).astype(np.int32).reshape(-1)
        table.setflags(write=False)
        return table

    def _build_lookup_tables(self):
        n = self.size
        self.kind = np.full(n, TokenKind.SPECIAL, np.int8)
        self.instrument = np.full(n, -1, np.int16)
        self.pitch = np.full(n, -1, np.int16)
        self.velocity_bin_of = np.full(n, -1, np.int16)
        self.wait_units = np.zeros(n, np.int32)

        w = np.arange(1, self.config.max_wait + 1)
        self.kind[self.wait(w)] = TokenKind.WAIT
        self.wait_units[self.wait(w)] = w

        inst, vb, pit = np.meshgrid(np.arange(self.num_pitched), np.arange(self.config.velocity_bins),
                                    np.arange(self.config.pitch_min, self.config.pitch_max + 1),
                                    indexing="ij")
        ids = self.note_on(inst, vb, pit)
        self.kind[ids], self.instrument[ids], self.pitch[ids], self.velocity_bin_of[ids] = (
            TokenKind.NOTE_ON, inst, pit, vb)

        inst, pit = np.meshgrid(np.arange(self.num_pitched),
                                np.arange(self.config.pitch_min, self.config.pitch_max + 1), indexing="ij")
        ids = self.note_off(inst, pit)
        self.kind[ids], self.instrument[ids], self.pitch[ids] = TokenKind.NOTE_OFF, inst, pit

        pit, vb = np.meshgrid(np.arange(NUM_DRUM_NOTES), np.arange(self.config.velocity_bins), indexing="ij")
        ids = self.drum(pit, vb)
        self.kind[ids], self.instrument[ids], self.pitch[ids], self.velocity_bin_of[ids] = (
            TokenKind.DRUM, self.drums_index, pit, vb)

        ids = self.instrument_token(np.arange(self.instruments.num_classes))
        self.kind[ids], self.instrument[ids] = TokenKind.INSTRUMENT, np.arange(self.instruments.num_classes)
        self.kind[self.task_base:self.label_base] = TokenKind.TASK
        self.kind[self.label_base:] = TokenKind.LABEL
        for table in (self.kind, self.instrument, self.pitch, self.velocity_bin_of, self.wait_units):
            table.setflags(write=False)

    # -- factored embedding ------------------------------------------------------------------------
    def layout(self) -> tuple[int, ...]:
        """(W, I, V, P, L, X): the block sizes of the id layout (module doc), all a model needs to know of the
        vocabulary to factor its token embedding (`token_parts`); X, the task tokens, is left out when there are
        none, so a v1 vocabulary keeps the layout its models were saved with."""
        layout = (self.config.max_wait, self.num_pitched, self.config.velocity_bins, self.num_pitches,
                  len(self.config.labels))
        return layout + (len(TASK_NAMES),) if self.config.infill else layout

    # -- text form -------------------------------------------------------------------------------
    def id_to_text(self, token: int) -> str:
        token = int(token)
        if not 0 <= token < self.size:
            raise ValueError(f"token id {token} is outside the vocabulary (size {self.size})")
        kind = self.kind[token]
        if kind == TokenKind.SPECIAL:
            return SPECIAL_NAMES[token]
        if kind == TokenKind.WAIT:
            return f"wait:{self.wait_units[token]}"
        if kind == TokenKind.INSTRUMENT:
            return self.instruments.names[self.instrument[token]]
        if kind == TokenKind.LABEL:
            return self.config.labels[token - self.label_base]
        if kind == TokenKind.TASK:
            return TASK_NAMES[token - self.task_base]
        name = self.instruments.names[self.instrument[token]]
        velocity = 0 if kind == TokenKind.NOTE_OFF else int(self.bin_velocity(self.velocity_bin_of[token]))
        return f"{name}:v{velocity}:{pitch_name(int(self.pitch[token]))}"

    def text_to_id(self, text: str) -> int:
        if text in SPECIAL_NAMES:
            return SPECIAL_NAMES.index(text)
        if ":" not in text:
            if text in TASK_NAMES:
                return self._task(TASK_NAMES.index(text))
            if text in self.instruments.names:
                return int(self.instrument_token(self.instruments.index(text)))
            if text in self._label_index:
                return self.label_token(text)
            raise ValueError(f"unknown token {text!r}")
        parts = text.split(":")
        if parts[0] == "wait" and len(parts) == 2:
            try:
                return int(self.wait(int(parts[1])))
            except ValueError:
                raise ValueError(f"bad wait token {text!r} (wait:1..wait:{self.config.max_wait})") from None
        if len(parts) != 3 or not parts[1].startswith("v") or not parts[1][1:].isdigit():
            raise ValueError(f"bad token {text!r} (expected instrument:vVELOCITY:PITCH)")
        instrument = self.instruments.index(parts[0])
        velocity = int(parts[1][1:])
        pitch = parse_pitch(parts[2])
        if velocity > 127:
            raise ValueError(f"velocity in {text!r} is above 127")
        if instrument == self.drums_index:
            if velocity == 0:
                raise ValueError(f"drum tokens have no note-off: {text!r}")
            return int(self.drum(pitch, self.velocity_bin(velocity)))
        if not self.config.pitch_min <= pitch <= self.config.pitch_max:
            raise ValueError(f"pitch in {text!r} is outside this vocabulary's range "
                             f"{pitch_name(self.config.pitch_min)}..{pitch_name(self.config.pitch_max)}")
        if velocity == 0:
            return int(self.note_off(instrument, pitch))
        return int(self.note_on(instrument, self.velocity_bin(velocity), pitch))

    def to_text(self, ids: Iterable[int]) -> str:
        return " ".join(self.id_to_text(t) for t in ids)

    def from_text(self, text: str) -> np.ndarray:
        return np.array([self.text_to_id(t) for t in text.split()], np.int32)

    # -- conditioning ----------------------------------------------------------------------------
    def prefix(self, label: str | None, instruments: Sequence[int]) -> np.ndarray:
        """Conditioning prefix `[label] instrument.. start` (instruments sorted in table order)."""
        head = [] if label is None else [self.label_token(label)]
        present = sorted(set(int(i) for i in instruments))
        return np.array(head + [self.instrument_base + i for i in present] + [START], np.int32)

    # -- persistence -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": self.FORMAT, "size": self.size, **self.config.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"not a {cls.FORMAT} file (a JSON {type(d).__name__}, not an object)")
        if d.get("format") in cls.OLD_FORMATS:
            if "infill" in d:
                raise ValueError(f"a {d['format']} file has no infill field")
            d = {**d, "infill": False}
        elif d.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} file (format={d.get('format')!r})")
        vocab = cls(VocabConfig.from_dict(d))
        if "size" in d and d["size"] != vocab.size:
            raise ValueError(f"vocab.json says size {d['size']} but its config gives {vocab.size}")
        return vocab

    def save(self, path: str | os.PathLike) -> None:
        outputs.write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Reads a vocab.json; ValueError naming the file for one that is not one (not JSON, not UTF-8...)."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
            raise ValueError(f"{os.fspath(path)}: not a usable vocab.json ({' '.join(str(e).split())})") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.config == other.config

    def __hash__(self) -> int:
        return hash(self.config)

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, {self.config})"


def _layout(layout: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """(W, I, V, P, L, X) of a `Vocab.layout()`, X = 0 for a 5-tuple (a v1 vocabulary's)."""
    values = tuple(int(x) for x in layout)
    if len(values) not in (5, 6):
        raise ValueError(f"a token layout is (W, I, V, P, L) or (W, I, V, P, L, X), got {tuple(layout)!r}")
    return values + (0,) * (6 - len(values))


def part_blocks(layout: Sequence[int]) -> tuple[int, ...]:
    """Row counts of the part table's blocks, in `token_parts` order: whole tokens, waits, note-on keys, note-on
    loudness, note-off keys, drum keys, drum loudness."""
    w, i, v, p, n_labels, x = _layout(layout)
    return (3 + i + 1 + x + n_labels, w, i * p, i * v, i * p, NUM_DRUM_NOTES, v)


def token_parts(layout: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Each id as the sum of at most two rows of a shared part table, for the factored token embedding.

    With `layout` = `Vocab.layout()` = (W, I, V, P, L[, X]) the part table has R rows, in this order:

    | rows          | count       | used by                                                   |
    |---------------|-------------|-----------------------------------------------------------|
    | whole tokens  | 3+I+1+X+L   | specials, instrument-presence, task tokens, labels (one each)|
    | waits         | W           | `wait:N`                                                  |
    | note-on keys  | I * P       | note-on (instrument, pitch)                               |
    | note-on loud  | I * V       | note-on (instrument, velocity bin)                        |
    | note-off keys | I * P       | note-off (instrument, pitch)                              |
    | drum keys     | 128         | drum onset (drum note)                                    |
    | drum loud     | V           | drum onset (velocity bin)                                 |

    so a note-on is `key(instrument, pitch) + loudness(instrument, velocity)`: the 16 velocities of a key share
    its row, and a rare (key, velocity) pair learns from both halves. Tokens made of one part point their
    second index at row R, which the model keeps at zero.

    Returns:
      (first int32[size], second int32[size], R) for a vocabulary of `size` ids.
    """
    w, i, v, p, n_labels, x = _layout(layout)
    wait_row, on_key_row, on_vel_row, off_key_row, drum_key_row, drum_vel_row, rows = np.cumsum(part_blocks(layout))
    none = rows
    inst, vel, pitch = np.meshgrid(np.arange(i), np.arange(v), np.arange(p), indexing="ij")  # note-on id order
    drum_vel, drum_key = np.meshgrid(np.arange(v), np.arange(NUM_DRUM_NOTES), indexing="ij")  # drum id order
    first = np.concatenate([
        np.arange(3), wait_row + np.arange(w), on_key_row + (inst * p + pitch).ravel(),
        off_key_row + np.arange(i * p), drum_key_row + drum_key.ravel(), 3 + np.arange(i + 1 + x + n_labels)])
    second = np.concatenate([
        np.full(3 + w, none), on_vel_row + (inst * v + vel).ravel(), np.full(i * p, none),
        drum_vel_row + drum_vel.ravel(), np.full(i + 1 + x + n_labels, none)])
    return first.astype(np.int32), second.astype(np.int32), rows
