"""Reading MIDI bytes into note arrays (two interchangeable readers) and writing MIDI files.

Readers turn a Standard MIDI File into a `RawScore`: every note as a row of tick-valued arrays, the
tempo map and the sustain-pedal controls. Everything after that (ticks -> time, sustain, instrument
classes, quantisation) is shared numpy code in `data_pipeline.encoding`, so the two readers give the
same tokens whenever they parse the same notes:

- `symusic` (default): a C++ parser, thousands of times faster than a pure-Python one; the bulk path.
- `miditoolkit`: the project's reference MIDI library (pure Python on top of mido).

Both are strict: a file with broken chunk lengths or data bytes > 127 is rejected, not guessed at.
Format 2 files (independent sequences) are rejected; SMPTE time division is supported.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct

import numpy as np

from data_pipeline import outputs

DEFAULT_TEMPO_US = 500_000  # MIDI's default: 120 quarter notes per minute
SUSTAIN_CC = 64
READERS = ("symusic", "miditoolkit")


class MidiError(ValueError):
    """A MIDI file that cannot be used; str() is one line naming the file and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path or '<bytes>'}: {reason}")


@dataclasses.dataclass
class RawScore:
    """A parsed MIDI file, in ticks. One row per note (N), per tempo change (K), per pedal event (M).

    Attributes:
      ticks_per_quarter: metrical time division (unused when `ticks_per_second` is set).
      ticks_per_second: SMPTE time division (frames/s x ticks/frame), else None.
      tempo_tick, tempo_us: int64[K], tempo changes: tick and microseconds per quarter note.
      track, program, is_drum: int32[N], int32[N], bool[N]: the note's track (reader-specific
        grouping), its GM program and whether it is on MIDI channel 10.
      start, end: int64[N], note-on and note-off ticks.
      pitch, velocity: int32[N].
      pedal_track, pedal_tick, pedal_value: sustain pedal (CC64) events of each track.
    """

    ticks_per_quarter: int
    ticks_per_second: float | None
    tempo_tick: np.ndarray
    tempo_us: np.ndarray
    track: np.ndarray
    program: np.ndarray
    is_drum: np.ndarray
    start: np.ndarray
    end: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    pedal_track: np.ndarray
    pedal_tick: np.ndarray
    pedal_value: np.ndarray

    @property
    def num_notes(self) -> int:
        return len(self.start)


def _check_header(data: bytes, path) -> float | None:
    """Validates the MThd chunk; returns SMPTE ticks per second, or None for metrical time."""
    if len(data) == 0:
        raise MidiError(path, "empty file")
    if len(data) < 14:
        raise MidiError(path, f"file is too short to be MIDI ({len(data)} bytes)")
    if data[:4] != b"MThd":
        if data[:4] == b"RIFF" and data[8:12] == b"RMID":
            raise MidiError(path, "RIFF RMID wrapper is not supported; extract the MIDI data first")
        raise MidiError(path, "not a MIDI file (no MThd header)")
    length, fmt, num_tracks, division = struct.unpack(">IHHH", data[4:14])
    if length < 6:
        raise MidiError(path, f"bad MThd header length {length}")
    if fmt == 2:
        raise MidiError(path, "MIDI format 2 (independent sequences) is not supported")
    if fmt > 2:
        raise MidiError(path, f"unknown MIDI format {fmt}")
    if num_tracks == 0:
        raise MidiError(path, "header declares no tracks")
    if division & 0x8000:
        fps = -struct.unpack(">b", data[12:13])[0]
        ticks_per_frame = data[13]
        if fps not in (24, 25, 29, 30) or ticks_per_frame == 0:
            raise MidiError(path, f"bad SMPTE time division ({fps} fps, {ticks_per_frame} ticks/frame)")
        return (29.97 if fps == 29 else fps) * ticks_per_frame
    if division == 0:
        raise MidiError(path, "time division is 0 ticks per quarter note")
    return None


def _empty(dtype) -> np.ndarray:
    return np.zeros(0, dtype)


def _tempo_arrays(ticks, us_per_quarter) -> tuple[np.ndarray, np.ndarray]:
    """Tempo changes -> the tempo map: int64 ticks (first 0, ascending, unique) and us per quarter."""
    ticks = np.asarray(ticks, np.int64)
    us = np.asarray(us_per_quarter, np.int64)
    if len(ticks) == 1 and ticks[0] == 0 and us[0] > 0:
        return ticks, us  # the usual map, one tempo set at the start: nothing to sort or fix
    if len(ticks) == 0 or ticks.min() > 0:
        ticks = np.concatenate([[0], ticks])
        us = np.concatenate([[DEFAULT_TEMPO_US], us])
    # Stable sort by tick; of several changes at one tick the last one written wins.
    order = np.argsort(ticks, kind="stable")
    ticks, us = ticks[order], us[order]
    keep = np.append(ticks[1:] != ticks[:-1], True)
    us = np.where(us > 0, us, DEFAULT_TEMPO_US)
    return ticks[keep], us[keep]


def _read_symusic(data: bytes, path, smpte) -> RawScore:
    import symusic

    try:
        score = symusic.Score.from_midi(data)
    except Exception as e:  # symusic raises RuntimeError with the parser's reason
        raise MidiError(path, f"bad MIDI data ({str(e).splitlines()[0]})") from None
    # Files average ~750 notes in ~5 tracks, so fixed per-call costs dominate: gather every track's
    # notes (and controls) into one symusic list and convert that to numpy once, rather than one
    # `.numpy()` (~10 us) and one concatenate per track.
    tracks = score.tracks
    counts, programs, drums, control_counts = [], [], [], []
    notes = controls = None
    for track in tracks:
        track_notes, track_controls = track.notes, track.controls
        counts.append(len(track_notes))
        programs.append(track.program)
        drums.append(track.is_drum)
        control_counts.append(len(track_controls))
        if notes is None:
            notes, controls = track_notes.copy(), track_controls.copy()
        else:
            notes.extend(track_notes)
            controls.extend(track_controls)
    num_notes = sum(counts)
    if num_notes:
        columns = notes.numpy()
        track = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        start = columns["time"].astype(np.int64)
        end = start + columns["duration"]
        pitch, velocity = columns["pitch"].astype(np.int32), columns["velocity"].astype(np.int32)
        program = np.array(programs, np.int32)[track]
        is_drum = np.array(drums, bool)[track]
    else:
        track, program, pitch, velocity = (_empty(np.int32) for _ in range(4))
        start, end, is_drum = _empty(np.int64), _empty(np.int64), _empty(bool)
    pedal_track = pedal_tick = pedal_value = _empty(np.int64)
    if sum(control_counts):
        columns = controls.numpy()
        sustain = columns["number"] == SUSTAIN_CC
        if sustain.any():
            pedal_track = np.repeat(np.arange(len(control_counts), dtype=np.int32), control_counts)[sustain]
            pedal_tick = columns["time"][sustain].astype(np.int64)
            pedal_value = columns["value"][sustain].astype(np.int64)
    tempos = score.tempos.numpy()
    tempo_tick, tempo_us = _tempo_arrays(tempos["time"], tempos["mspq"])
    return RawScore(ticks_per_quarter=int(score.ticks_per_quarter), ticks_per_second=smpte,
                    tempo_tick=tempo_tick, tempo_us=tempo_us, track=track, program=program,
                    is_drum=is_drum, start=start, end=end, pitch=pitch, velocity=velocity,
                    pedal_track=pedal_track, pedal_tick=pedal_tick, pedal_value=pedal_value)


def _read_miditoolkit(data: bytes, path, smpte) -> RawScore:
    import miditoolkit

    try:
        midi = miditoolkit.MidiFile(file=io.BytesIO(data))
    except Exception as e:  # mido raises OSError, EOFError, ValueError, KeyError...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MidiError(path, f"bad MIDI data ({reason})") from None
    cols = {k: [] for k in ("track", "program", "is_drum", "start", "end", "pitch", "velocity")}
    pedals = {k: [] for k in ("track", "tick", "value")}
    for t, inst in enumerate(midi.instruments):
        if inst.notes:
            arr = np.array([(n.start, n.end, n.pitch, n.velocity) for n in inst.notes], np.int64)
            n = len(arr)
            cols["track"].append(np.full(n, t, np.int32))
            cols["program"].append(np.full(n, inst.program, np.int32))
            cols["is_drum"].append(np.full(n, inst.is_drum, bool))
            for k, col in zip(("start", "end", "pitch", "velocity"), arr.T):
                cols[k].append(col)
        sustain = [(c.time, c.value) for c in inst.control_changes if c.number == SUSTAIN_CC]
        if sustain:
            arr = np.array(sustain, np.int64)
            pedals["track"].append(np.full(len(arr), t, np.int32))
            pedals["tick"].append(arr[:, 0])
            pedals["value"].append(arr[:, 1])
    # miditoolkit keeps tempo as float BPM = 6e7 / us_per_quarter; rounding recovers the integer.
    tempo_tick = [tc.time for tc in midi.tempo_changes]
    tempo_us = [round(6e7 / tc.tempo) if tc.tempo > 0 else DEFAULT_TEMPO_US for tc in midi.tempo_changes]
    tempo_tick, tempo_us = _tempo_arrays(tempo_tick, tempo_us)
    return _make_score(int(midi.ticks_per_beat), smpte, tempo_tick, tempo_us, cols, pedals)


def _make_score(tpq, smpte, tempo_tick, tempo_us, cols, pedals) -> RawScore:
    dtypes = {"track": np.int32, "program": np.int32, "is_drum": bool, "start": np.int64,
              "end": np.int64, "pitch": np.int32, "velocity": np.int32}
    notes = {k: (np.concatenate(v).astype(dtypes[k], copy=False) if v else _empty(dtypes[k]))
             for k, v in cols.items()}
    ped = {k: (np.concatenate(v).astype(np.int64 if k != "track" else np.int32, copy=False) if v
               else _empty(np.int64)) for k, v in pedals.items()}
    return RawScore(ticks_per_quarter=tpq, ticks_per_second=smpte, tempo_tick=tempo_tick,
                    tempo_us=tempo_us, pedal_track=ped["track"], pedal_tick=ped["tick"],
                    pedal_value=ped["value"], **notes)


def read_midi(source: bytes | str | os.PathLike, reader: str = "symusic", path=None) -> RawScore:
    """Parses MIDI bytes (or a file path) into a `RawScore`; raises `MidiError` on bad input."""
    if not isinstance(source, (bytes, bytearray, memoryview)):
        path = source
        try:
            with open(source, "rb") as f:
                source = f.read()
        except OSError as e:
            raise MidiError(path, f"cannot read file ({e.strerror or e})") from None
    data = bytes(source)
    smpte = _check_header(data, path)
    if smpte is not None:
        # Neither parser accepts SMPTE division. Tick values do not depend on it, so parse with a
        # metrical division in its place and time the ticks with `ticks_per_second` (tempo is moot).
        data = data[:12] + b"\x01\xe0" + data[14:]
    if reader == "symusic":
        return _read_symusic(data, path, smpte)
    if reader == "miditoolkit":
        return _read_miditoolkit(data, path, smpte)
    raise ValueError(f"unknown MIDI reader {reader!r}; valid: {', '.join(READERS)}")


def ticks_to_seconds(ticks: np.ndarray, score: RawScore) -> np.ndarray:
    """Converts ticks to seconds through every tempo change of the score's tempo map (float64)."""
    ticks = np.asarray(ticks, np.int64)
    if score.ticks_per_second is not None:
        return ticks / score.ticks_per_second
    tt, us = score.tempo_tick, score.tempo_us.astype(np.float64)
    seconds_per_tick = us / (1e6 * score.ticks_per_quarter)
    if len(tt) == 1:
        # One tempo (from tick 0, see `_tempo_arrays`): one scale, the same floats as the general case.
        return ticks * seconds_per_tick[0]
    seg_start = np.concatenate([[0.0], np.cumsum(np.diff(tt) * seconds_per_tick[:-1])])
    idx = np.searchsorted(tt, ticks, side="right") - 1
    return seg_start[idx] + (ticks - tt[idx]) * seconds_per_tick[idx]


# -- writing ---------------------------------------------------------------------------------------
WRITE_TICKS_PER_QUARTER = 500  # with 120 BPM, one tick is exactly one millisecond
WRITE_TEMPO_BPM = 120.0


def write_midi(path: str | os.PathLike, tracks: list[dict], length_ms: int | None = None) -> None:
    """Writes a clean format-1 file atomically: one track per instrument, drums on channel 10.

    Args:
      path: output file; written to a temporary name first, so a failure leaves no partial file.
      tracks: dicts with `name`, `program`, `is_drum`, and int arrays `start_ms`, `end_ms`,
        `pitch`, `velocity` (times in milliseconds).
      length_ms: the music's length when it ends in silence after its last note: a marker ("end") makes
        the file last that long (a file ends with its last event, so a closing rest would be cut off).
    """
    import miditoolkit

    midi = miditoolkit.MidiFile(ticks_per_beat=WRITE_TICKS_PER_QUARTER)
    midi.tempo_changes = [miditoolkit.TempoChange(WRITE_TEMPO_BPM, 0)]
    midi.time_signature_changes = [miditoolkit.TimeSignature(4, 4, 0)]
    ticks_per_ms = WRITE_TICKS_PER_QUARTER * WRITE_TEMPO_BPM / 60_000
    for spec in tracks:
        inst = miditoolkit.Instrument(program=int(spec["program"]), is_drum=bool(spec["is_drum"]),
                                      name=spec["name"])
        rows = zip(spec["start_ms"].tolist(), spec["end_ms"].tolist(), spec["pitch"].tolist(),
                   spec["velocity"].tolist())
        inst.notes = [miditoolkit.Note(velocity=v, pitch=p, start=round(s * ticks_per_ms),
                                       end=round(e * ticks_per_ms)) for s, e, p, v in rows]
        midi.instruments.append(inst)
    last_tick = max((n.end for inst in midi.instruments for n in inst.notes), default=0)
    if length_ms is not None and round(length_ms * ticks_per_ms) > last_tick:
        # The track's end-of-track event follows its last event by one tick.
        midi.markers = [miditoolkit.Marker("end", max(round(length_ms * ticks_per_ms) - 1, 0))]
    with outputs.atomic_path(path) as tmp:
        midi.dump(tmp)
