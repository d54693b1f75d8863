"""Structural features: timing, chord index, part, countdown."""

from __future__ import annotations

import numpy as np

from data_pipeline import encoding
from data_pipeline.features import compute_features, sounding_counts
from data_pipeline.vocab import Vocab, VocabConfig


def test_features_of_a_small_piece():
    vocab = Vocab(VocabConfig(countdown_unit_ms=100, num_parts=4))
    text = ("piano drums start piano:v68:C4 piano:v68:E4 drums:v68:C2 wait:50 piano:v0:C4 piano:v0:E4 "
            "piano:v68:G4 wait:50 piano:v0:G4 end")
    f = compute_features(vocab.from_text(text), vocab)
    np.testing.assert_array_equal(f.timing, [0, 0, 0, 0, 0, 0, 0, 50, 50, 50, 50, 100, 100])
    np.testing.assert_array_equal(f.chord, [0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(f.part, [0] * 7 + [2] * 4 + [3, 3])
    # 100 units = 1 s left at the start = 10 countdown steps of 100 ms.
    np.testing.assert_array_equal(f.countdown, [10] * 7 + [5] * 4 + [0, 0])
    # Drums never sound; the count is taken after the token.
    np.testing.assert_array_equal(f.sounding, [0, 0, 0, 1, 2, 2, 2, 1, 0, 1, 1, 0, 0])


def test_sounding_counts_reattacks_once_and_starts_from_held_keys():
    vocab = Vocab()
    text = "piano:v68:C4 piano:v68:C4 wait:10 piano:v0:E4 piano:v0:C4 piano:v0:C4 violin:v68:C4"
    tokens = vocab.from_text(text)
    # A re-attack of a sounding key leaves the count; a release of a silent one (ill-formed) too.
    np.testing.assert_array_equal(sounding_counts(tokens, vocab), [1, 1, 1, 1, 0, 0, 1])
    e4 = int(vocab.instrument[vocab.from_text("piano:v0:E4")[0]]) * 128 + 64
    np.testing.assert_array_equal(sounding_counts(tokens, vocab, held_keys=[e4]), [2, 2, 2, 1, 0, 0, 1])


def test_chord_index_is_clipped():
    vocab = Vocab(VocabConfig(max_chord=3))
    text = "start " + " ".join(f"piano:v68:{n}4" for n in "CDEFGAB") + " end"
    f = compute_features(vocab.from_text(text), vocab)
    assert f.chord.max() == 2


def test_countdown_falls_to_zero_and_part_rises(midi_fixtures):
    vocab = Vocab()
    piece = encoding.encode_midi(midi_fixtures / "bach_bwv1.6.mid", vocab)
    f = compute_features(piece.tokens, vocab)
    assert np.all(np.diff(f.timing) >= 0) and np.all(np.diff(f.part) >= 0) and np.all(np.diff(f.countdown) <= 0)
    assert f.part[-1] == vocab.config.num_parts - 1 and f.countdown[-1] == 0
    assert f.timing[-1] == piece.duration_units
