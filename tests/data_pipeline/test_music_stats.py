"""Music statistics on hand-made pieces, against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_pipeline import encoding, music_stats
from data_pipeline.vocab import Vocab
from tests.data_pipeline import midi_factory

VOCAB = Vocab()  # 10 ms time units; drum hits last 10 units (0.1 s)


def read(data: bytes) -> tuple[encoding.Notes, int]:
    """MIDI bytes -> (notes, duration units) through the dataset codec, as musenet-stats reads files."""
    piece = encoding.encode_midi(data, VOCAB)
    return encoding.decode_tokens(piece.tokens, VOCAB)


def stats_of(data: bytes, **kwargs) -> dict:
    notes, duration = read(data)
    return music_stats.piece_stats(notes, VOCAB, duration, **kwargs)


def approx(expected: dict) -> dict:
    return {k: pytest.approx(v, abs=1e-9) if isinstance(v, float) else v for k, v in expected.items()}


def test_a_scale_of_quarter_notes():
    stats = stats_of(midi_factory.c_major_scale())
    assert list(stats) == list(music_stats.STAT_NAMES)
    # C twice (C4, C5), D E F G A B once: p = 2/8 and six 1/8.
    entropy = 2 / 8 * 2 + 6 * (1 / 8 * 3)
    assert stats == approx({
        "seconds": 4.0, "notes": 8, "notes_per_second": 2.0,
        "duration_median_s": 0.5, "duration_p95_s": 0.5, "duration_p99_s": 0.5, "long_note_share": 0.0,
        "max_duration_s": 0.5,
        "polyphony_mean": 1.0, "polyphony_median": 1.0,  # each note ends as the next one starts
        "pitch_class_entropy": entropy, "pitch_range": 12, "instruments": ["piano"], "silence_share": 0.0})
    assert entropy == 2.75


def test_a_held_chord_under_a_melody():
    notes, duration = read(midi_factory.held_chord_and_melody())
    stats = music_stats.piece_stats(notes, VOCAB, duration)
    # Durations (s): 6 6 6 (chord), 0.5 0.5 1 1 (melody); sorted 0.5 0.5 1 1 6 6 6.
    # Pitched notes sounding at each onset: 0 s: the chord, 3; 1 s: chord + C5, 4; 1.5 s: chord + D5 (C5 has
    # just ended), 4; 4 s: chord + E5, 4; 6 s: F5 alone (the chord ends at 6 s), 1.
    # Pitch classes: C (C3, C5) 2, E (E3, E5) 2, G 1, D 1, F 1 of 7.
    entropy = 2 * (2 / 7 * math.log2(7 / 2)) + 3 * (1 / 7 * math.log2(7))
    assert stats == approx({
        "seconds": 7.0, "notes": 7, "notes_per_second": 1.0,
        "duration_median_s": 1.0, "duration_p95_s": 6.0, "duration_p99_s": 6.0, "long_note_share": 3 / 7,
        "max_duration_s": 6.0,
        "polyphony_mean": (3 + 4 + 4 + 4 + 1) / 5, "polyphony_median": 4.0,
        "pitch_class_entropy": entropy, "pitch_range": 77 - 48, "instruments": ["piano", "violin"],
        "silence_share": 0.0})
    # "Longer than" is strict: the 1 s notes are not longer than 1 s.
    assert music_stats.piece_stats(notes, VOCAB, long_note_s=1.0)["long_note_share"] == pytest.approx(3 / 7)
    assert music_stats.piece_stats(notes, VOCAB, long_note_s=0.75)["long_note_share"] == pytest.approx(5 / 7)


def test_silence_and_drums():
    stats = stats_of(midi_factory.notes_with_gaps_and_drums())
    # Sounding: piano 0-1, 3-4, 6-7 s; drums 3-3.1 (under D4) and 5-5.1 s: 3.1 s of 7 s.
    # The drums count as notes (5 in all) but not in durations (the 0.5 s written length is not kept either),
    # polyphony (1 at 3 s: D4 alone) or pitch classes.
    assert stats == approx({
        "seconds": 7.0, "notes": 5, "notes_per_second": 5 / 7,
        "duration_median_s": 1.0, "duration_p95_s": 1.0, "duration_p99_s": 1.0, "long_note_share": 0.0,
        "max_duration_s": 1.0, "polyphony_mean": 1.0, "polyphony_median": 1.0,
        "pitch_class_entropy": math.log2(3), "pitch_range": 4, "instruments": ["piano", "drums"],
        "silence_share": 3.9 / 7})


def test_duration_percentiles_interpolate_and_a_closing_rest_counts():
    # One piano note after another lasting 1, 2, 3, 4, 5 s (100..500 units), pitches C4..E4.
    start = np.array([0, 100, 300, 600, 1000])
    notes = encoding.Notes(np.zeros(5, np.int32), np.arange(60, 65, dtype=np.int32), np.full(5, 80, np.int32),
                           start, start + np.arange(100, 600, 100))
    stats = music_stats.piece_stats(notes, VOCAB, duration_units=2000)
    # Linear interpolation between order statistics: p95 at rank 0.95 * 4 = 3.8 -> 4 + 0.8 * (5 - 4).
    assert stats["duration_median_s"] == pytest.approx(3.0)
    assert stats["duration_p95_s"] == pytest.approx(4.8)
    assert stats["duration_p99_s"] == pytest.approx(4.96)
    assert stats["long_note_share"] == pytest.approx(1 / 5)
    assert stats["max_duration_s"] == pytest.approx(5.0)
    assert stats["pitch_class_entropy"] == pytest.approx(math.log2(5))
    # The piece lasts until 20 s (its duration), 15 s of it sounding.
    assert stats["seconds"] == pytest.approx(20.0) and stats["silence_share"] == pytest.approx(0.25)
    assert stats["notes_per_second"] == pytest.approx(0.25)
    # A duration shorter than the notes does not cut the piece.
    assert music_stats.piece_stats(notes, VOCAB, duration_units=50)["seconds"] == pytest.approx(15.0)


def test_pooled_statistics_pool_notes_not_pieces():
    scale, chord = read(midi_factory.c_major_scale()), read(midi_factory.held_chord_and_melody())
    pooled = music_stats.pooled_stats([scale, chord], VOCAB)
    # Durations: ten 0.5 s, two 1 s, three 6 s (15): the 8th is 0.5 s; p95 at rank 13.3 -> 6 s.
    # Polyphony at onsets: eight 1s (scale) and 3 4 4 4 1 (chord): 13 values summing to 24, the 7th sorted is 1.
    # Pitch classes: C 2+2, D 1+1, E 1+2, F 1+1, G 1+1, A 1, B 1 of 15. Range: 48 (C3) .. 77 (F5).
    counts = np.array([4, 2, 3, 2, 2, 1, 1]) / 15
    assert pooled == approx({
        "seconds": 11.0, "notes": 15, "notes_per_second": 15 / 11,
        "duration_median_s": 0.5, "duration_p95_s": 6.0, "duration_p99_s": 6.0, "long_note_share": 3 / 15,
        "max_duration_s": 6.0, "polyphony_mean": 24 / 13, "polyphony_median": 1.0,
        "pitch_class_entropy": float(-(counts * np.log2(counts)).sum()), "pitch_range": 29,
        "instruments": ["piano", "violin"], "silence_share": 0.0})
    # Silence pools as seconds: 3.9 silent s of 7 plus 0 of 4.
    gaps = read(midi_factory.notes_with_gaps_and_drums())
    assert music_stats.pooled_stats([scale, gaps], VOCAB)["silence_share"] == pytest.approx(3.9 / 11)
    # Pooling one piece gives its own statistics.
    assert music_stats.pooled_stats([chord], VOCAB) == music_stats.piece_stats(chord[0], VOCAB, chord[1])
    with pytest.raises(ValueError, match="no pieces"):
        music_stats.pooled_stats([], VOCAB)


def test_empty_and_drum_only_pieces_have_undefined_statistics():
    empty = music_stats.piece_stats(encoding.Notes.empty(), VOCAB)
    assert empty["seconds"] == 0.0 and empty["notes"] == 0 and empty["instruments"] == []
    assert all(empty[k] is None for k in music_stats.NUMERIC_STATS if k not in ("seconds", "notes"))
    rest = music_stats.piece_stats(encoding.Notes.empty(), VOCAB, duration_units=300)
    assert (rest["seconds"], rest["notes_per_second"], rest["silence_share"]) == (3.0, 0.0, 1.0)
    drums = encoding.Notes(np.full(2, VOCAB.drums_index, np.int32), np.array([36, 38], np.int32),
                           np.full(2, 90, np.int32), np.array([0, 50]), np.array([10, 60]))
    stats = music_stats.piece_stats(drums, VOCAB)
    assert stats["notes"] == 2 and stats["instruments"] == ["drums"]
    assert stats["seconds"] == pytest.approx(0.6) and stats["silence_share"] == pytest.approx(0.4 / 0.6)
    for key in ("duration_median_s", "duration_p95_s", "long_note_share", "max_duration_s", "polyphony_mean",
                "polyphony_median", "pitch_class_entropy", "pitch_range"):
        assert stats[key] is None, key
    pooled = music_stats.pooled_stats([(encoding.Notes.empty(), None), (drums, None)], VOCAB)
    assert pooled["notes"] == 2 and pooled["pitch_range"] is None
    json.dumps([empty, stats, pooled])  # None and plain numbers only


def test_percentile_ranges_across_files():
    rows = [{"seconds": float(s), "notes": 10, "polyphony_mean": None if s == 1 else 2.0 * s, "instruments": []}
            for s in range(1, 12)]
    ranges = music_stats.percentile_ranges(rows)
    assert set(ranges) == {"p10", "p50", "p90"}
    # 1..11: p10 at rank 1 -> 2, p50 -> 6, p90 at rank 9 -> 10.
    assert [ranges[p]["seconds"] for p in ("p10", "p50", "p90")] == [2.0, 6.0, 10.0]
    # Pieces where a statistic is None are left out: 4, 6 .. 22 (10 values), p10 at rank 0.9 -> 5.8.
    assert ranges["p10"]["polyphony_mean"] == pytest.approx(5.8)
    assert ranges["p50"]["notes"] == 10.0 and "instruments" not in ranges["p50"]
    assert music_stats.percentile_ranges([{"pitch_range": None}])["p50"] == {"pitch_range": None}
    assert set(music_stats.percentile_ranges(rows, q=(25, 75))) == {"p25", "p75"}


def test_compare_with_a_reference_range():
    reference = [{"notes_per_second": float(x), "pitch_range": 30} for x in range(1, 12)]  # p10 2, p90 10
    generated = [{"notes_per_second": 5.0}, {"notes_per_second": 20.0}, {"notes_per_second": 30.0}]
    rows = music_stats.compare(generated, reference, generated_pooled={"notes_per_second": 9.0})
    assert [r["stat"] for r in rows] == list(music_stats.COMPARED_STATS)
    by_stat = {r["stat"]: r for r in rows}
    assert by_stat["notes_per_second"] == {"stat": "notes_per_second", "pooled": 9.0, "median": 20.0, "low": 2.0,
                                           "high": 10.0, "inside": False, "pooled_inside": True}
    # Undefined on either side: no verdict.
    assert by_stat["pitch_range"]["median"] is None and by_stat["pitch_range"]["inside"] is None
    assert by_stat["polyphony_mean"]["low"] is None and by_stat["polyphony_mean"]["inside"] is None
    # The range's ends are inside.
    edge = music_stats.compare([{"notes_per_second": 10.0}], reference, stats=("notes_per_second",))
    assert edge[0]["inside"] is True and edge[0]["pooled"] is None and edge[0]["pooled_inside"] is None
    table = music_stats.format_comparison(rows)
    assert table.splitlines()[0].split() == ["statistic", "pooled", "median", "ref", "p10", "ref", "p90", "inside?"]
    assert table.splitlines()[1].split() == ["notes_per_second", "9", "20", "2", "10", "NO"]
