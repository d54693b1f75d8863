"""Infill / accompaniment rearrangements (`data_pipeline.infill`) on real pieces: the round trip back to the
piece, the given notes kept verbatim, the span's length exact, the given events marked."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from data_pipeline import encoding, features, infill
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
    regenerated = 0
    for span in _spans(notes, duration, rng):
        span.check(duration, VOCAB)
        target = infill.target_notes(notes, span, VOCAB)
        parts = infill.rearrange(notes, span, VOCAB)
        np.testing.assert_array_equal(_tokens(infill.restore(parts, span, VOCAB)), _tokens(target))

        # Given notes are the source's, unchanged; regenerated ones start in the span and end by its end.
        regen = span.regenerated(target)
        assert _rows(target.take(~regen)) <= original
        assert np.all((target.start[regen] >= span.start) & (target.start[regen] < span.end))
        assert np.all(target.end[regen & (target.instrument != VOCAB.drums_index)] <= span.end)  # drums: onsets

        # Time is exact: before lasts S, the middle E - S; the middle's attacks are the regenerated notes'.
        assert VOCAB.wait_units[parts.before].sum() == span.start
        assert VOCAB.wait_units[parts.middle].sum() == span.end - span.start
        kind = VOCAB.kind[parts.middle]
        attack = np.isin(kind, (TokenKind.NOTE_ON, TokenKind.DRUM))
        assert int(attack.sum()) == int(regen.sum())
        context_attacks = np.isin(VOCAB.kind[parts.context], (TokenKind.NOTE_ON, TokenKind.DRUM)).sum()
        assert context_attacks == int(((target.start >= span.start) & ~regen).sum())
        regenerated += int(regen.sum())
        if span.instruments is not None:
            events = np.isin(kind, (TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM))
            assert np.isin(VOCAB.instrument[parts.middle[events]], span.instruments).all()
    assert regenerated > 100  # the spans cut real music


def test_accompaniment_gives_the_other_parts_whole_and_writes_the_piece():
    notes, duration = _piece("freedoom1_D_E1M1.mid")
    used = sorted(set(notes.instrument.tolist()))
    span = infill.Span(0, duration, (VOCAB.drums_index,))
    parts = infill.rearrange(notes, span, VOCAB)
    assert len(parts.before) == 0
    assert VOCAB.drums_index in used and not np.any(VOCAB.kind[parts.context] == TokenKind.DRUM)
    others = [i for i in used if i != VOCAB.drums_index]
    assert set(VOCAB.instrument[parts.context[VOCAB.kind[parts.context] == TokenKind.NOTE_ON]]) == set(others)
    kinds = set(VOCAB.kind[parts.middle].tolist())
    assert TokenKind.DRUM in kinds and not kinds & {TokenKind.NOTE_ON, TokenKind.NOTE_OFF}  # only the drums


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
    assert middle[0] == middle[2] == "wait:10" and middle[1].endswith(":G4") and middle[3] == "piano:v0:G4"
    assert len(middle) == 4  # G4 at 30, released at the span's end 40
    assert VOCAB.to_text(parts.before).split()[-1] == "wait:10"  # waits up to S = 20 after E4's attack at 10
    context = VOCAB.to_text(parts.context).split()
    assert [t for t in context if not t.startswith("wait")] == ["piano:v0:E4", "piano:v0:C4"]
    assert VOCAB.wait_units[parts.context].sum() == 50 - 20  # C4's release at 50, counted from S = 20
    np.testing.assert_array_equal(_tokens(infill.restore(parts, span, VOCAB)), _tokens(target))

    # The sequence: timing restarts at S for context and middle; the notes held across S sound in context.
    seq = infill.infill_sequence(parts, span, 70, VOCAB, before_tokens=100, context_tokens=100)
    text = VOCAB.to_text(seq.body).split()
    hole, fill = text.index("hole"), text.index("fill")
    assert text[seq.prompt_len - 1] == "fill" and text[-1] == "end" and fill == seq.prompt_len - 1
    assert seq.features.timing[hole] == 0 and seq.features.sounding[hole] == 2  # C4 and E4 held across S
    assert seq.features.sounding[fill] == 0 and seq.features.timing[-1] == 20  # the middle lasts E - S
    assert seq.features.countdown[fill] == 0  # 20 units of 10 ms: under one countdown step
    assert seq.scored.tolist() == [i not in (hole, fill) for i in range(len(text))]
    g4 = text.index(middle[1], fill)
    assert seq.features.timing[g4] == 10 and seq.features.sounding[g4] == 1


@pytest.mark.parametrize("name", PIECES)
def test_sequences_decode_to_their_parts_and_their_features_are_each_segments(name):
    """An infilling sequence is its three segments (cropped) with the features of each computed alone, as a
    sampler writing the middle computes them; crops open `before` at a time step and keep `context`'s head."""
    notes, duration = _piece(name)
    rng = np.random.default_rng(7)
    mix = infill.TaskMix(infill_rate=0.5, accompany_rate=0.5)
    seen = set()
    for _ in range(12):
        task = infill.draw_task(notes.instrument, duration, mix, rng, VOCAB)
        assert task is not None
        span, accompany = task
        seen.add(accompany)
        seq = infill.task_sequence(notes, duration, span, accompany, 1000, VOCAB, rng)
        assert seq is not None and len(seq.body) <= 1000
        text = VOCAB.to_text(seq.body).split()
        hole, fill = text.index("hole"), seq.prompt_len - 1
        assert text[fill] == "fill" and text[-1] == "end" and text.count("hole") == text.count("fill") == 1
        middle = seq.body[fill + 1:-1]
        feats = seq.features
        # The middle's features are compute_features of fill + middle + end over the span.
        shortened = int(VOCAB.wait_units[middle].sum())
        alone = features.compute_features(seq.body[fill:], VOCAB, duration_units=shortened)
        for key in ("timing", "chord", "part", "countdown", "sounding"):
            np.testing.assert_array_equal(getattr(feats, key)[fill:], getattr(alone, key), err_msg=key)
        assert np.all(feats.timing[hole:fill] == features.compute_features(seq.body[hole:fill], VOCAB).timing)
        assert np.all(feats.sounding >= 0)
        if hole:  # before opens at a time step: its first token is an event
            assert VOCAB.wait_units[seq.body[0]] == 0 or feats.timing[0] == 0
    assert seen == ({False, True} if len(set(notes.instrument.tolist())) > 1 else {False})  # one part: no accompaniment


def test_task_draws_are_plain_windows_outside_the_mix_and_fixed_in_count():
    notes, duration = _piece("bach_bwv1.6.mid")
    plain = infill.TaskMix()
    assert not plain.active
    rng = np.random.default_rng(0)
    assert all(infill.draw_task(notes.instrument, duration, plain, rng, VOCAB) is None for _ in range(20))
    # The same number of draws whatever the task: the next draw after any task is the same.
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    infill.draw_task(notes.instrument, duration, infill.TaskMix(infill_rate=1.0), a, VOCAB)
    infill.draw_task(notes.instrument, duration, plain, b, VOCAB)
    assert a.random() == b.random()
    with pytest.raises(ValueError, match="<= 1"):
        infill.TaskMix(infill_rate=0.7, accompany_rate=0.5)


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
