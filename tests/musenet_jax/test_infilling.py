"""Infilling and accompaniment with a (random, opinionated) model: the given notes kept verbatim, the written ones
inside the span with no note hanging or overlapping a kept one, the span's length exact, the chunks' windows laid
out as training lays out infilling sequences, and one-line refusals."""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import encoding, infill
from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import decode_rules, infilling, sampling
from musenet_jax import model as model_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "midi"
HOT = sampling.SamplingConfig(temperature=4.0)  # a random model that plays many notes: the rules get busy


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(VocabConfig(labels=("bach",), velocity_bins=2, pitch_min=36, pitch_max=84, max_wait=32))


@pytest.fixture(scope="module")
def model(vocab) -> model_lib.MuseNet:
    config = model_lib.ModelConfig(
        vocab_size=vocab.size, d_model=32, num_heads=2, head_dim=16, mlp_dim=48, num_layers=2, max_len=128,
        attention_pattern="strided", attention_stride=8, attention_combination="interleaved", dtype="float32",
        remat_policy="off", init_std=0.2)
    return model_lib.MuseNet(config, rngs=nnx.Rngs(params=0))


def _piece(name: str, vocab: Vocab) -> tuple[encoding.Notes, int]:
    return encoding.decode_tokens(encoding.encode_midi(FIXTURES / name, vocab).body, vocab)


def _rows(notes: encoding.Notes) -> list[tuple]:
    return sorted(zip(notes.instrument.tolist(), notes.pitch.tolist(), notes.velocity.tolist(), notes.start.tolist(),
                      notes.end.tolist(), strict=True))


def _check(result: infilling.InfillResult, notes, duration, span, vocab):
    """Given notes verbatim, written notes of the span's parts inside it, no overlap on a key, tokens before S
    byte-identical."""
    target = infill.target_notes(notes, span, vocab)
    kept = target.take(~dataclasses.replace(span, instruments=span.instruments or tuple(
        np.unique(target.instrument).tolist())).regenerated(target))
    assert _rows(result.given) == _rows(kept)
    written = result.written
    assert len(written) > 0
    assert np.all((written.start >= span.start) & (written.start < span.end))
    pitched = written.instrument != vocab.drums_index
    assert np.all(written.end[pitched] <= span.end)  # no regenerated note hangs past the span
    if span.instruments is not None:
        assert set(written.instrument.tolist()) <= set(span.instruments)
    # The piece is exactly the kept notes and the written ones: no note merged with, or cut by, another.
    assert _rows(result.notes) == sorted(_rows(result.given) + _rows(written))
    for key in set(zip(result.notes.instrument.tolist(), result.notes.pitch.tolist(), strict=True)):
        sel = (result.notes.instrument == key[0]) & (result.notes.pitch == key[1])
        if key[0] != vocab.drums_index:
            starts, ends = result.notes.start[sel], result.notes.end[sel]
            order = np.argsort(starts)
            assert np.all(starts[order][1:] >= ends[order][:-1]), key
    # Token form: everything before S is the source's, byte for byte.
    ours, _ = encoding.notes_to_body(result.notes, vocab, horizon=span.start)
    theirs, _ = encoding.notes_to_body(encoding.canonical_notes(notes, vocab), vocab, horizon=span.start)
    np.testing.assert_array_equal(ours, theirs)
    assert result.duration_units == duration


def test_a_span_of_every_part_is_rewritten_inside_it_and_the_rest_kept(model, vocab):
    notes, duration = _piece("bach_bwv1.6.mid", vocab)
    span = infill.Span(523, 1281)  # 7.6 s: several chunks of at most 4 s
    result = infilling.complete(model, vocab, notes, duration, span, label="bach", sampling_config=HOT, seed=1)
    assert result.chunks >= 2
    _check(result, notes, duration, span, vocab)
    again = infilling.complete(model, vocab, notes, duration, span, label="bach", sampling_config=HOT, seed=1)
    assert _rows(again.notes) == _rows(result.notes)
    other = infilling.complete(model, vocab, notes, duration, span, label="bach", sampling_config=HOT, seed=1,
                               sample=1)
    assert _rows(other.written) != _rows(result.written)


def test_one_part_of_several_and_a_note_held_into_the_span_is_not_overlapped(model, vocab):
    piano = vocab.instruments.index("piano")
    bass = vocab.instruments.index("bass")
    # A piano C4 from 0 to 3 s sounds across the span's start; the bass is given throughout.
    notes = encoding.Notes(np.array([piano, bass, bass, piano], np.int32), np.array([60, 40, 43, 64], np.int32),
                           np.array([80, 80, 80, 80], np.int32), np.array([0, 0, 150, 250]),
                           np.array([300, 150, 400, 380]))
    span = infill.Span(100, 200, (piano,))
    result = infilling.complete(model, vocab, notes, 400, span, label=None, sampling_config=HOT, seed=4)
    _check(result, notes, 400, span, vocab)
    c4 = result.written.take((result.written.instrument == piano) & (result.written.pitch == 60))
    assert len(c4) == 0  # the kept C4 holds its key until 3 s, after the span
    assert len(result.given) == 4


def test_accompaniment_writes_only_the_new_parts_under_the_given_ones(model, vocab):
    notes, _ = _piece("bach_bwv1.6.mid", vocab)
    short = notes.take(notes.start < 600)
    write = (vocab.instruments.index("bass"), vocab.drums_index)
    span = infill.accompaniment_span(short, 600, write, vocab)
    result = infilling.complete(model, vocab, short, 600, span, label="bach", sampling_config=HOT, seed=2,
                                accompany=True)
    _check(result, short, 600, span, vocab)
    assert result.chunks >= 1
    with pytest.raises(infill.SpanError, match="already play piano"):
        infill.accompaniment_span(short, 600, (vocab.instruments.index("piano"),), vocab)


@pytest.mark.parametrize("span, message", [
    (infill.Span(100, 100), "empty or negative"),
    (infill.Span(0, 10_000), "after the piece's"),
])
def test_a_span_that_does_not_fit_is_one_line(model, vocab, span, message):
    notes, duration = _piece("bach_bwv1.6.mid", vocab)
    with pytest.raises(sampling.GenerationError, match=message):
        infilling.complete(model, vocab, notes, duration, span, label=None)


def test_a_model_from_before_infilling_can_only_continue(vocab):
    old = Vocab(dataclasses.replace(vocab.config, infill=False))
    notes, duration = _piece("bach_bwv1.6.mid", old)
    with pytest.raises(sampling.GenerationError, match=r"no infilling tokens.*only continue"):
        infilling.complete(None, old, notes, duration, infill.Span(0, 100), label=None)


def test_free_from_forbids_attacking_a_held_key_until_it_is_free(vocab):
    """`decode_rules.constrain`: a key whose `free_from` is later than now cannot be attacked; from then on it can."""
    tables = decode_rules.rule_tables(vocab)
    columns = jnp.asarray(np.flatnonzero(decode_rules.allowed_body_tokens(vocab, [0]))[None, :].astype(np.int32))
    ctables = decode_rules.column_tables(columns, tables)
    key = 0 * 128 + 60
    free_from = np.zeros((1, decode_rules.num_keys(vocab)), np.int32)
    free_from[0, key] = 50
    state = decode_rules.SoundingState(*(jnp.asarray(x)[None] for x in decode_rules.sounding_state([], vocab)))
    c4 = np.flatnonzero(np.asarray(columns[0]) == vocab.note_on(0, 1, 60))[0]
    for now, allowed in ((49, False), (50, True)):
        limits = decode_rules.Limits(columns, jnp.asarray([200]), jnp.asarray([0]), jnp.asarray([0]),
                                     jnp.asarray(free_from), jnp.asarray([True]))
        logits = decode_rules.constrain(jnp.zeros(columns.shape), state, jnp.asarray([vocab.wait(1)]),
                                        jnp.asarray([now]), limits, tables, ctables)
        assert bool(jnp.isfinite(logits[0, c4])) == allowed


def test_an_exact_end_moves_the_waits_past_the_span_onto_its_end(vocab):
    """`Limits.exact_end`: 30 units before D, waits longer than 30 are cut and their probability goes to wait:30 (a
    rest to the span's end) rather than to the notes; without it (a piece, far from its ending window) they are
    only masked."""
    tables = decode_rules.rule_tables(vocab)
    columns = jnp.asarray(np.flatnonzero(decode_rules.allowed_body_tokens(vocab, [0]))[None, :].astype(np.int32))
    ctables = decode_rules.column_tables(columns, tables)
    state = decode_rules.SoundingState(*(jnp.asarray(x)[None] for x in decode_rules.sounding_state([], vocab)))
    wait30 = np.flatnonzero(np.asarray(columns[0]) == vocab.wait(30))[0]
    got = {}
    for exact in (False, True):
        limits = decode_rules.Limits(columns, jnp.asarray([1000]), jnp.asarray([0]), jnp.asarray([0]),
                                     jnp.zeros((1, decode_rules.num_keys(vocab)), jnp.int32), jnp.asarray([exact]))
        logits = decode_rules.constrain(jnp.zeros(columns.shape), state, jnp.asarray([vocab.note_on(0, 1, 60)]),
                                        jnp.asarray([970]), limits, tables, ctables)
        got[exact] = float(logits[0, wait30])
    cut = vocab.config.max_wait - 30  # waits 31..W, each with logit 0
    assert got[False] == 0.0 and got[True] == pytest.approx(np.log(cut + 1), rel=1e-5)


def test_the_servers_infill_request_is_checked_before_it_is_queued(model, vocab):
    """`web.parse_infill`: a result's piece and a span become one task per sample; a model from before infilling,
    or a span past the piece, is a one-line 400."""
    from musenet_jax import web

    notes, _ = _piece("bach_bwv1.6.mid", vocab)
    tokens = encoding.notes_to_body(encoding.canonical_notes(notes.take(notes.start < 500), vocab), vocab)[0]
    limits = web.Limits(max_seconds=60.0, max_num_samples=4, max_upload_bytes=1 << 20, max_job_seconds=60.0)
    body = {"tokens": tokens.tolist(), "from_seconds": 1.0, "to_seconds": 3.0, "seed": 1, "num_samples": 2}
    tasks, seconds, settings = web.parse_infill(body, vocab, model.config, limits)
    assert len(tasks) == 2 and seconds == 2.0 and settings["from_seconds"] == 1.0
    assert tasks[0].span.start == 100 and tasks[1].sample == 1
    with pytest.raises(web.BadRequest, match="after the piece's"):
        web.parse_infill({**body, "to_seconds": 30.0}, vocab, model.config, limits)
    old = Vocab(dataclasses.replace(vocab.config, infill=False))
    with pytest.raises(web.BadRequest, match="no infilling tokens"):
        web.parse_infill(body, old, model.config, limits)
