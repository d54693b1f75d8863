"""Infill / accompaniment rearrangements (`data_pipeline.infill`) on real pieces: the round trip back to the
piece, the given notes kept verbatim, the span's length exact, the given events marked."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from data_pipeline import encoding, infill
from data_pipeline.vocab import TokenKind, Vocab

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "midi"
PIECES = ["bach_bwv1.6.mid", "freedoom1_D_E1M1.mid", "mozart_k525short_pedal.mid", "freedoom2_D_ADRIAN.mid"]
VOCAB = Vocab()


def _piece(name: str) -> tuple[encoding.Notes, int]:
    body = encoding.encode_midi(FIXTURES / name, VOCAB).body
    return encoding.decode_tokens(body, VOCAB)


def _rows(notes: encoding.Notes) -> set[tuple]:
    """Notes as comparable rows, velocity as its bin."""
    bins = VOCAB.velocity_bin(notes.velocity)
    return set(zip(notes.instrument.tolist(), notes.pitch.tolist(), bins.tolist(), notes.start.tolist(),
                   notes.end.tolist(), strict=True))


def _tokens(notes: encoding.Notes) -> np.ndarray:
    return encoding.notes_to_body(encoding.canonical_notes(notes, VOCAB), VOCAB)[0]


def _spans(notes: encoding.Notes, duration: int, rng: np.random.Generator):
    used = sorted(set(notes.instrument.tolist()))
    for _ in range(6):
        s = int(rng.integers(0, duration - 1))
        e = int(rng.integers(s + 1, min(duration, s + 800) + 1))
        yield infill.Span(s, e)
        yield infill.Span(s, e, (int(rng.choice(used)),))
    yield infill.Span(0, duration, tuple(used[:1]))  # accompaniment: write one part under the others
    yield infill.Span(0, 1)
    yield infill.Span(duration - 1, duration)


@pytest.mark.parametrize("name", PIECES)
def test_rearranged_pieces_restore_to_the_target_with_given_notes_verbatim(name):
    notes, duration = _piece(name)
    rng = np.random.default_rng(len(name))
    original = _rows(encoding.canonical_notes(notes, VOCAB))
    regenerated = given_in_middle = 0
    for span in _spans(notes, duration, rng):
        span.check(duration, VOCAB)
        target = infill.target_notes(notes, span, VOCAB)
        parts = infill.rearrange(notes, span, VOCAB)
        np.testing.assert_array_equal(_tokens(infill.restore(parts, span, VOCAB)), _tokens(target))

        # Given notes are the source's, unchanged; regenerated ones start in the span and end by its end.
        regen = infill._regenerated(target, span)
        assert _rows(target.take(~regen)) <= original
        assert np.all((target.start[regen] >= span.start) & (target.start[regen] < span.end))
        assert np.all(target.end[regen & (target.instrument != VOCAB.drums_index)] <= span.end)  # drums: onsets

        # Time is exact: before ends by S, the middle lasts E - S, context events sit at their times from S.
        assert VOCAB.wait_units[parts.before].sum() < max(span.start, 1)
        assert VOCAB.wait_units[parts.middle].sum() == span.end - span.start
        assert parts.given.shape == parts.middle.shape

        # The middle's given events are the given notes'; the others belong to regenerated notes.
        kind = VOCAB.kind[parts.middle]
        events = np.isin(kind, (TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM))
        assert not np.any(parts.given & ~events)
        attack = np.isin(kind, (TokenKind.NOTE_ON, TokenKind.DRUM))
        written_attacks = parts.middle[attack & ~parts.given]
        assert len(written_attacks) == int(regen.sum())
        regenerated, given_in_middle = regenerated + int(regen.sum()), given_in_middle + int(parts.given.sum())
        if span.instruments is not None:
            assert np.isin(VOCAB.instrument[parts.middle[events & ~parts.given]], span.instruments).all()
            assert not np.isin(VOCAB.instrument[parts.context[VOCAB.kind[parts.context] == TokenKind.NOTE_ON]],
                               span.instruments).any() or span.start > 0
    assert regenerated > 100 and given_in_middle > 10  # the spans cut real music, with given events inside


def test_accompaniment_gives_the_other_parts_whole_and_writes_the_piece():
    notes, duration = _piece("freedoom1_D_E1M1.mid")
    used = sorted(set(notes.instrument.tolist()))
    span = infill.Span(0, duration, (VOCAB.drums_index,))
    parts = infill.rearrange(notes, span, VOCAB)
    assert len(parts.before) == 0
    assert VOCAB.drums_index in used and not np.any(VOCAB.kind[parts.context] == TokenKind.DRUM)
    others = [i for i in used if i != VOCAB.drums_index]
    assert set(VOCAB.instrument[parts.context[VOCAB.kind[parts.context] == TokenKind.NOTE_ON]]) == set(others)
    drums = VOCAB.kind[parts.middle] == TokenKind.DRUM
    assert drums.any() and not np.any(parts.given[drums])  # every drum hit is written, every other event given
    assert np.all(parts.given[np.isin(VOCAB.kind[parts.middle], (TokenKind.NOTE_ON, TokenKind.NOTE_OFF))])


def test_a_note_held_across_the_span_stays_given_and_one_crossing_its_end_is_cut():
    piano = VOCAB.instruments.index("piano")
    notes = encoding.Notes(np.full(3, piano, np.int32), np.array([60, 64, 67], np.int32), np.full(3, 80, np.int32),
                           np.array([0, 10, 30]), np.array([50, 45, 70]))
    span = infill.Span(20, 40)  # C4 sounds across it (given); G4 starts in it and sounds past it (cut at 40)
    target = infill.target_notes(notes, span, VOCAB)
    assert _rows(target) == _rows(encoding.Notes(notes.instrument, notes.pitch, notes.velocity, notes.start,
                                                 np.array([50, 45, 40])))
    parts = infill.rearrange(notes, span, VOCAB)
    middle = VOCAB.to_text(parts.middle).split()
    assert len(middle) == 3 and middle[0] == middle[2] == "wait:10" and middle[1].endswith(":G4")  # G4 at 30
    assert parts.given.tolist() == [False] * len(middle)  # C4 and E4 release after the span: nothing given in it
    context = VOCAB.to_text(parts.context).split()
    assert [t for t in context if not t.startswith("wait")] == ["piano:v0:E4", "piano:v0:C4"]
    assert VOCAB.wait_units[parts.context].sum() == 50 - 20  # C4's release at 50, counted from S = 20
    np.testing.assert_array_equal(_tokens(infill.restore(parts, span, VOCAB)), _tokens(target))


@pytest.mark.parametrize("span, message", [
    (infill.Span(5, 5), "empty"),
    (infill.Span(-1, 5), "empty or negative"),
    (infill.Span(0, 1001), "after the piece's 10 s"),
    (infill.Span(0, 10, (99,)), "instruments must be classes"),
    (infill.Span(0, 10, ()), "instruments must be classes"),
])
def test_a_span_that_does_not_fit_is_one_line(span, message):
    with pytest.raises(infill.SpanError, match=message):
        span.check(1000, VOCAB)


def test_wait_tokens_write_a_rest_as_the_encoding_does():
    w = VOCAB.config.max_wait
    assert infill.wait_tokens(0, VOCAB).tolist() == []
    assert infill.wait_tokens(2 * w + 3, VOCAB).tolist() == [VOCAB.wait(w), VOCAB.wait(w), VOCAB.wait(3)]
