"""Unusable MIDI files: one clear error naming the file and the reason, from both readers."""

from __future__ import annotations

import pytest

from data_pipeline import encoding, midi_io
from data_pipeline.vocab import Vocab
from tests.data_pipeline import midi_factory

GOOD = midi_factory.midi_bytes([[(0, "on", 0, 60, 100), (480, "off", 0, 60)]])


def _bad_track_data() -> bytes:
    # A data byte > 127 inside a note-on: every strict parser must refuse it.
    i = GOOD.index(b"\x90")
    return GOOD[: i + 1] + b"\xbc" + GOOD[i + 2:]


BAD_FILES = {
    "empty": (b"", "empty file"),
    "not_midi": (b"RIFF....WAVEfmt this is not a midi file at all", "not a MIDI file"),
    "text": (b"hello, world\n" * 10, "not a MIDI file"),
    "truncated": (GOOD[: len(GOOD) - 9], "bad MIDI data"),
    "short_header": (GOOD[:10], "too short"),
    "bad_track_length": (GOOD[:18] + b"\x7f\xff\xff\xff" + GOOD[22:], "bad MIDI data"),
    "bad_data_byte": (_bad_track_data(), "bad MIDI data"),
    "no_notes": (midi_factory.midi_bytes([[(0, "program", 0, 5)]]), "no notes"),
    "format_2": (GOOD[:8] + b"\x00\x02" + GOOD[10:], "format 2"),
    "zero_division": (GOOD[:12] + b"\x00\x00" + GOOD[14:], "time division"),
}


@pytest.mark.parametrize("reader", midi_io.READERS)
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_give_one_line_errors(name, reader, tmp_path):
    data, reason = BAD_FILES[name]
    path = tmp_path / f"{name}.mid"
    path.write_bytes(data)
    with pytest.raises(midi_io.MidiError) as err:
        encoding.encode_midi(path, Vocab(), reader=reader)
    message = str(err.value)
    assert message.startswith(str(path) + ": "), message
    assert reason in message
    assert "\n" not in message


def test_missing_file():
    with pytest.raises(midi_io.MidiError, match="cannot read file"):
        midi_io.read_midi("/nonexistent/dir/song.mid")


def test_header_with_too_many_tracks_still_reads(midi_fixtures):
    # The header counts 18 tracks, the file has 19: tolerated, as both parsers read what is there.
    piece = encoding.encode_midi(midi_fixtures / "music21_test04_extra_track.mid", Vocab())
    assert piece.num_notes > 1000
