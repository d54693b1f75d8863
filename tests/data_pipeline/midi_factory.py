"""Hand-made MIDI files for tests (mido), for cases the real fixtures do not cover."""

from __future__ import annotations

import io

import mido


def midi_bytes(tracks: list[list[tuple]], *, ticks_per_beat: int = 480, fmt: int = 1,
               tempo_events: list[tuple[int, int]] = ()) -> bytes:
    """Builds a MIDI file.

    Args:
      tracks: per track, events `(abs_tick, kind, *args)` with kind one of
        `on` (channel, pitch, velocity), `off` (channel, pitch), `program` (channel, program),
        `cc` (channel, control, value).
      ticks_per_beat: time division.
      fmt: MIDI format (0 merges everything into one track).
      tempo_events: `(abs_tick, microseconds_per_quarter)` written to the first track.
    """
    out = mido.MidiFile(type=fmt, ticks_per_beat=ticks_per_beat)
    all_tracks = [list(t) for t in tracks] or [[]]
    all_tracks[0] = all_tracks[0] + [(tick, "tempo", us) for tick, us in tempo_events]
    for events in all_tracks:
        track = mido.MidiTrack()
        now = 0
        for tick, kind, *args in sorted(events, key=lambda e: e[0]):
            if kind == "on":
                msg = mido.Message("note_on", channel=args[0], note=args[1], velocity=args[2])
            elif kind == "off":
                msg = mido.Message("note_off", channel=args[0], note=args[1], velocity=0)
            elif kind == "program":
                msg = mido.Message("program_change", channel=args[0], program=args[1])
            elif kind == "cc":
                msg = mido.Message("control_change", channel=args[0], control=args[1], value=args[2])
            elif kind == "tempo":
                msg = mido.MetaMessage("set_tempo", tempo=args[0])
            else:
                raise ValueError(kind)
            track.append(msg.copy(time=tick - now))
            now = tick
        out.tracks.append(track)
    if fmt == 0:
        out.tracks = [mido.merge_tracks(out.tracks)]
    buf = io.BytesIO()
    out.save(file=buf)
    return buf.getvalue()


def to_format0(data: bytes) -> bytes:
    """The same music as a format-0 file (all tracks merged into one)."""
    midi = mido.MidiFile(file=io.BytesIO(data))
    merged = mido.MidiFile(type=0, ticks_per_beat=midi.ticks_per_beat)
    merged.tracks.append(mido.merge_tracks(midi.tracks))
    buf = io.BytesIO()
    merged.save(file=buf)
    return buf.getvalue()


def with_smpte_division(data: bytes, fps: int, ticks_per_frame: int) -> bytes:
    """Rewrites the header's time division to SMPTE (the tick values in the tracks are kept)."""
    header = bytearray(data[:14])
    header[12] = (256 - fps) & 0xFF
    header[13] = ticks_per_frame
    return bytes(header) + data[14:]


# -- pieces with statistics known by hand (tests/data_pipeline/test_music_stats.py) ----------------------------------
# At MIDI's default tempo (120 quarter notes per minute) and 480 ticks per quarter, one second is 960 ticks.
TICKS_PER_SECOND = 960


def _note(channel: int, pitch: int, on_s: float, off_s: float, velocity: int = 80) -> list[tuple]:
    return [(round(on_s * TICKS_PER_SECOND), "on", channel, pitch, velocity),
            (round(off_s * TICKS_PER_SECOND), "off", channel, pitch)]


def c_major_scale() -> bytes:
    """C4 D4 E4 F4 G4 A4 B4 C5 on a piano, quarter notes (0.5 s each) back to back: 0 - 4 s."""
    pitches = (60, 62, 64, 65, 67, 69, 71, 72)
    return midi_bytes([[e for i, p in enumerate(pitches) for e in _note(0, p, 0.5 * i, 0.5 * (i + 1))]])


def held_chord_and_melody() -> bytes:
    """A piano chord C3 E3 G3 held 0 - 6 s under a violin melody C5 1 - 1.5 s, D5 1.5 - 2 s, E5 4 - 5 s,
    F5 6 - 7 s. The violin's track comes first in the file (the piano comes first in the instrument table)."""
    violin = [(0, "program", 1, 40), *_note(1, 72, 1, 1.5), *_note(1, 74, 1.5, 2), *_note(1, 76, 4, 5),
              *_note(1, 77, 6, 7)]
    piano = [e for p in (48, 52, 55) for e in _note(0, p, 0, 6)]
    return midi_bytes([violin, piano])


def notes_with_gaps_and_drums() -> bytes:
    """Piano C4 0 - 1 s, D4 3 - 4 s, E4 6 - 7 s; drum hits (channel 10, written 0.5 s long) at 3 s (under
    the D4) and 5 s (in the gap)."""
    piano = _note(0, 60, 0, 1) + _note(0, 62, 3, 4) + _note(0, 64, 6, 7)
    drums = _note(9, 36, 3, 3.5) + _note(9, 38, 5, 5.5)
    return midi_bytes([piano, drums])
