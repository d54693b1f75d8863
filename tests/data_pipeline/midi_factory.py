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
