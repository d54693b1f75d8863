"""The vectorised hot path (step 1's note-off rule, step 6, waits, the event id table, the symusic reader, the
tempo map) against plain-Python references written from the specification or built track by track."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from data_pipeline import encoding, midi_io
from data_pipeline.vocab import END, TokenKind, Vocab, VocabConfig

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "midi"
# A short max_wait makes multi-wait rests common; a narrow pitch range and GM classes move the id blocks.
VOCABS = {
    "default": Vocab(),
    "short_waits": Vocab(VocabConfig(max_wait=8, velocity_bins=5)),
    "gm_narrow": Vocab(VocabConfig(instrument_set="gm", pitch_min=30, pitch_max=90, velocity_bins=32)),
}


def _reference_tokens(notes: encoding.Notes, vocab: Vocab) -> list[int]:
    """Step 6 of `encoding`'s docstring, one event at a time, for canonical notes."""
    rows = list(zip(notes.instrument.tolist(), notes.pitch.tolist(), notes.velocity.tolist(),
                    notes.start.tolist(), notes.end.tolist()))
    attacked = {(s, i, p) for i, p, _, s, _ in rows}
    events = []  # (time, 0 = release / 1 = attack, instrument, pitch, token id)
    for i, p, v, s, e in rows:
        b = int(vocab.velocity_bin(v))
        if i == vocab.drums_index:
            events.append((s, 1, i, p, int(vocab.drum(p, b))))
            continue
        events.append((s, 1, i, p, int(vocab.note_on(i, b, p))))
        if (e, i, p) not in attacked:  # a note-on on a sounding key ends the sounding note itself
            events.append((e, 0, i, p, int(vocab.note_off(i, p))))
    body, now = [], 0
    for time, *_, token in sorted(events):
        while now < time:
            step = min(vocab.config.max_wait, time - now)
            body.append(int(vocab.wait(step)))
            now += step
        body.append(token)
    return vocab.prefix(None, {i for i, *_ in rows}).tolist() + body + [END]


def _notes_strategy(vocab: Vocab):
    """Crowded random notes: few pitches and short spans, so keys overlap, touch and re-attack."""
    pitches = st.sampled_from([vocab.config.pitch_min, vocab.config.pitch_min + 1, vocab.config.pitch_max])
    row = st.tuples(st.sampled_from([0, 1, vocab.drums_index]), pitches, st.integers(1, 127),
                    st.integers(0, 40) | st.integers(0, 5000), st.integers(0, 12))
    return st.lists(row, min_size=1, max_size=50)


def _notes(rows) -> encoding.Notes:
    arr = np.array(rows, np.int64).reshape(-1, 5)
    return encoding.Notes(arr[:, 0].astype(np.int32), arr[:, 1].astype(np.int32),
                          arr[:, 2].astype(np.int32), arr[:, 3], arr[:, 3] + arr[:, 4])


def _reference_release(rows) -> list[int]:
    """Step 1's note-off rule as `_release_at_note_offs` states it, note by note: (voice, pitch, start, end) rows
    -> the end tick of each."""
    ends = []
    for voice, pitch, start, _ in rows:
        key = [(s, e) for v, p, s, e in rows if (v, p) == (voice, pitch)]
        sounding_before = sum(s < start for s, _ in key) - sum(e < start for _, e in key)
        if sum(e == start for _, e in key) > sounding_before:
            ends.append(start)  # released at its own attack: zero length
        else:
            ends.append(min([s for s, _ in key if s > start] + [e for _, e in key if e > start]))
    return ends


def _release(rows) -> list[int]:
    arr = np.array(rows, np.int64).reshape(-1, 4)
    return encoding._release_at_note_offs(arr[:, 0].astype(np.int32), arr[:, 1].astype(np.int32), arr[:, 2],
                                          arr[:, 3]).tolist()


# Crowded notes on few keys (overlapping, nested, tied, zero-length), at small ticks and at large and huge ones,
# which with a huge voice index leave too few bits to pack the note index beside a code (the argsort path) or to
# pack a code at all (the ranked path).
_VOICE_NOTE = st.tuples(st.sampled_from([0, 1, 2**30]), st.sampled_from([0, 60, 127]),
                        st.integers(0, 30) | st.integers(2**23, 2**23 + 30) | st.integers(2**40, 2**40 + 30),
                        st.integers(0, 8) | st.just(0))


@settings(max_examples=300, deadline=None)
@given(notes=st.lists(_VOICE_NOTE, max_size=40))
@example(notes=[(2**30, 60, 2**23, 5), (2**30, 60, 2**23 + 2, 5), (2**30, 60, 2**23 + 4, 0), (0, 0, 2**23 + 9, 0)])
def test_release_at_note_offs_matches_the_reference(notes):
    rows = [(v, p, s, s + d) for v, p, s, d in notes]
    assert _release(rows) == _reference_release(rows)
    # Any other pairing of each key's note-offs with its note-ons (here the readers' one, first in, first out:
    # in time order) gives every attack the same end.
    fifo = []
    for key in {(v, p) for v, p, _, _ in rows}:
        starts = sorted(s for v, p, s, _ in rows if (v, p) == key)
        ends = sorted(e for v, p, _, e in rows if (v, p) == key)
        fifo += [(*key, s, e) for s, e in zip(starts, ends)]
    assert (sorted((v, p, s, e) for (v, p, s, _), e in zip(rows, _release(rows)))
            == sorted((v, p, s, e) for (v, p, s, _), e in zip(fifo, _release(fifo))))


def test_release_at_note_offs_keeps_well_formed_voices():
    # Notes end to end, zero-length ones, and two voices on one pitch overlapping each other: unchanged.
    rows = [(0, 60, 0, 10), (0, 60, 10, 20), (0, 60, 25, 25), (0, 60, 26, 30), (1, 60, 5, 40), (0, 61, 0, 0)]
    assert _release(rows) == [e for *_, e in rows]
    end = np.array([e for *_, e in rows], np.int64)
    assert encoding._release_at_note_offs(np.zeros(6, np.int32), np.arange(6, dtype=np.int32),
                                          np.zeros(6, np.int64), end) is end  # the fast path copies nothing


@pytest.mark.parametrize("name", sorted(VOCABS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_encode_notes_matches_the_reference(name, data):
    vocab = VOCABS[name]
    canonical = encoding.canonical_notes(_notes(data.draw(_notes_strategy(vocab))), vocab)
    piece = encoding.encode_notes(canonical, vocab, canonical=True)
    assert piece.tokens.dtype == np.int32
    assert piece.tokens.tolist() == _reference_tokens(canonical, vocab)
    # Not declaring the notes canonical gives the same tokens.
    assert encoding.encode_notes(canonical, vocab).tokens.tolist() == piece.tokens.tolist()


@pytest.mark.parametrize("max_wait", [1, 3, 128])
@settings(max_examples=40, deadline=None)
@given(times=st.lists(st.integers(0, 700), min_size=1, max_size=40))
def test_interleave_waits_matches_the_reference(max_wait, times):
    vocab = Vocab(VocabConfig(max_wait=max_wait))
    times = np.sort(np.array(times, np.int64))
    ids = np.arange(1000, 1000 + len(times), dtype=np.int32)  # any non-wait ids
    body, duration = encoding._interleave_waits(times, ids, max_wait, vocab)
    expected, now = [], 0
    for t, token in zip(times.tolist(), ids.tolist()):
        while now < t:
            step = min(max_wait, t - now)
            expected.append(int(vocab.wait(step)))
            now += step
        expected.append(token)
    assert body.dtype == np.int32 and body.tolist() == expected
    assert duration == times[-1]


def test_encode_notes_of_no_notes():
    piece = encoding.encode_notes(encoding.Notes.empty(), VOCABS["default"], label=None)
    assert piece.tokens.tolist() == [1, END] and piece.duration_units == 0 and piece.instruments == ()


@pytest.mark.parametrize("name", sorted(VOCABS))
def test_event_id_table_matches_the_id_formulas(name):
    vocab = VOCABS[name]
    classes, bins = vocab.instruments.num_classes, vocab.config.velocity_bins
    table = vocab.event_ids.reshape(2, classes, 128, bins)
    inst, pitch, vbin = np.meshgrid(np.arange(classes), np.arange(128), np.arange(bins), indexing="ij")
    np.testing.assert_array_equal(table[0], vocab.note_off(inst, pitch))
    pitched = inst != vocab.drums_index
    np.testing.assert_array_equal(table[1][pitched], vocab.note_on(inst, vbin, pitch)[pitched])
    np.testing.assert_array_equal(table[1][~pitched], vocab.drum(pitch, vbin)[~pitched])
    # Inside the vocabulary's range every entry is a real token of the right kind.
    in_range = (pitch >= vocab.config.pitch_min) & (pitch <= vocab.config.pitch_max)
    assert set(vocab.kind[table[1][pitched & in_range]].tolist()) == {TokenKind.NOTE_ON}
    assert set(vocab.kind[table[0][pitched & in_range]].tolist()) == {TokenKind.NOTE_OFF}


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.mid")), ids=lambda p: p.name)
def test_symusic_reader_keeps_every_track_apart(path):
    """The symusic reader gathers all tracks at once; each track's rows must still be exactly that
    track's notes and sustain events, with the dtypes `RawScore` documents."""
    import symusic

    raw = midi_io.read_midi(path, reader="symusic")
    expected_dtypes = {"track": np.int32, "program": np.int32, "is_drum": bool, "start": np.int64,
                       "end": np.int64, "pitch": np.int32, "velocity": np.int32, "pedal_tick": np.int64,
                       "pedal_value": np.int64, "tempo_tick": np.int64, "tempo_us": np.int64}
    for name, dtype in expected_dtypes.items():
        assert getattr(raw, name).dtype == dtype, name
    score = symusic.Score.from_midi(path.read_bytes())
    assert raw.num_notes == score.note_num()
    for t, track in enumerate(score.tracks):
        rows = raw.track == t
        assert set(raw.program[rows].tolist()) <= {track.program}
        assert set(raw.is_drum[rows].tolist()) <= {track.is_drum}
        notes = track.notes.numpy()
        np.testing.assert_array_equal(raw.start[rows], notes["time"])
        np.testing.assert_array_equal(raw.end[rows], notes["time"] + notes["duration"].astype(np.int64))
        np.testing.assert_array_equal(raw.pitch[rows], notes["pitch"])
        np.testing.assert_array_equal(raw.velocity[rows], notes["velocity"])
        sustain = [(c.time, c.value) for c in track.controls if c.number == midi_io.SUSTAIN_CC]
        pedal = raw.pedal_track == t
        assert list(zip(raw.pedal_tick[pedal].tolist(), raw.pedal_value[pedal].tolist())) == sustain


@pytest.mark.parametrize("ticks, us, expected_ticks, expected_us", [
    ([0], [400_000], [0], [400_000]),  # the usual map
    ([], [], [0], [500_000]),  # no tempo: MIDI's default
    ([0], [0], [0], [500_000]),  # a zero tempo is replaced by the default
    ([480, 0, 480], [300_000, 400_000, 200_000], [0, 480], [400_000, 200_000]),  # sorted, last wins
    ([960], [300_000], [0, 960], [500_000, 300_000]),  # default until the first change
])
def test_tempo_arrays(ticks, us, expected_ticks, expected_us):
    got_ticks, got_us = midi_io._tempo_arrays(np.array(ticks, np.int32), np.array(us, np.int32))
    assert got_ticks.dtype == np.int64 and got_us.dtype == np.int64
    assert got_ticks.tolist() == expected_ticks and got_us.tolist() == expected_us


def test_one_tempo_seconds_match_the_tempo_map_formula():
    raw = midi_io.RawScore(
        ticks_per_quarter=480, ticks_per_second=None, tempo_tick=np.array([0]), tempo_us=np.array([437_500]),
        **{f: np.zeros(0, np.int64) for f in ("track", "program", "is_drum", "start", "end", "pitch",
                                              "velocity", "pedal_track", "pedal_tick", "pedal_value")})
    ticks = np.array([0, 1, 479, 480, 12345, 10**9])
    two_tempos = dataclasses.replace(raw, tempo_tick=np.array([0, 10**10]), tempo_us=np.array([437_500, 1]))
    np.testing.assert_array_equal(midi_io.ticks_to_seconds(ticks, raw),
                                  midi_io.ticks_to_seconds(ticks, two_tempos))
    assert midi_io.ticks_to_seconds(np.array([480]), raw)[0] == pytest.approx(0.4375)
