"""Held-out scoring: window coverage and context, equality with a plain forward, velocity marginalisation."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline import encoding, windows
from data_pipeline import features as features_lib
from data_pipeline import input_pipeline as input_lib
from data_pipeline.vocab import TokenKind, Vocab, VocabConfig
from musenet_jax import evaluation, losses
from musenet_jax import model as model_lib

L = 64  # the model's context (max_len)
# A small vocabulary (2177 ids) so the [B, L, V] logits stay cheap; two labels so prefixes vary in length.
VOCAB = Vocab(VocabConfig(velocity_bins=4, pitch_min=48, pitch_max=83, max_wait=32, labels=("jazz", "folk")))


def make_notes(num: int, seed: int) -> encoding.Notes:
    """`num` random notes on piano, violin and drums over ~num * 12 time units (chords and rests included)."""
    rng = np.random.default_rng(seed)
    drums = VOCAB.drums_index
    instrument = rng.choice([0, 1, drums], num).astype(np.int32)
    pitch = np.where(instrument == drums, rng.integers(35, 60, num), rng.integers(48, 84, num)).astype(np.int32)
    start = np.sort(rng.integers(0, num * 12, num)).astype(np.int64)
    end = start + rng.integers(1, 40, num)
    return encoding.Notes(instrument, pitch, rng.integers(1, 128, num).astype(np.int32), start, end)


def make_piece(num_notes: int, seed: int, label: str | None = "jazz", name: str = "piece"):
    return evaluation.EvalPiece.from_encoded(encoding.encode_notes(make_notes(num_notes, seed), VOCAB, label),
                                             VOCAB, name=name)


@pytest.fixture(scope="module")
def model():
    """A freshly initialised model with prime-ish dims and strided sparse attention."""
    config = model_lib.ModelConfig(
        vocab_size=VOCAB.size, d_model=36, num_heads=3, head_dim=12, mlp_dim=60, num_layers=2, max_len=L,
        dtype="float32", attention_pattern="strided", attention_stride=8, attention_summary=0,
        attention_combination="interleaved", remat_policy="off", timing_buckets=64, timing_bucket_units=7,
        init_std=0.2)  # a large init so the logits (and the velocity marginalisation) are far from uniform
    return model_lib.MuseNet(config, rngs=nnx.Rngs(params=3))


@pytest.fixture(scope="module")
def scorer(model):
    return evaluation.Scorer(model, VOCAB, batch_size=5)


# -- windows ---------------------------------------------------------------------------------------
def _check_plan(n: int, p: int, seq_len: int, stride: int) -> None:
    plan = evaluation.plan_windows(n, p, seq_len, stride)
    capacity = seq_len + 1 - p
    seen = np.zeros(n, int)
    for w, (start, lo, hi) in enumerate(plan):
        assert 0 <= start <= lo < hi <= start + capacity  # scored tokens lie inside the window
        seen[lo:hi] += 1
        context = p + np.arange(lo, hi) - start  # tokens before each scored token in its window
        if w == 0:
            assert start == 0 and lo == 0
        else:
            assert hi - lo <= stride and context.min() >= seq_len - stride
    assert np.all(seen == 1)


@pytest.mark.parametrize("n,p,seq_len,stride", [(1, 3, 8, 4), (6, 3, 8, 6), (7, 3, 8, 6), (200, 12, 64, 32),
                                                (201, 5, 64, 1), (500, 2, 64, 63)])
def test_windows_score_every_body_token_once_with_context(n, p, seq_len, stride):
    _check_plan(n, p, seq_len, stride)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), p=st.integers(1, 20), seq_len=st.integers(2, 80), data=st.data())
def test_windows_property(n, p, seq_len, data):
    if p > seq_len:
        with pytest.raises(ValueError, match="no room"):
            evaluation.plan_windows(n, p, seq_len, 1)
        return
    stride = data.draw(st.integers(1, seq_len + 1 - p))
    _check_plan(n, p, seq_len, stride)


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match=r"stride must be in 1\.\.60"):
        evaluation.plan_windows(100, 5, 64, 61)
    with pytest.raises(ValueError, match="stride"):
        evaluation.plan_windows(100, 5, 64, 0)


def test_window_example_masks_only_the_scored_targets():
    piece = make_piece(40, seed=1)
    p = len(piece.prefix)
    example = evaluation.window_example(piece, (10, 30, 42), L)
    targets, mask = example["targets"], example["loss_mask"]
    scored = np.flatnonzero(mask)
    np.testing.assert_array_equal(targets[scored], piece.body[30:42])
    np.testing.assert_array_equal(example["inputs"][:p], piece.prefix)
    np.testing.assert_array_equal(example["timing"][p:p + 5], piece.features.timing[10:15])


# -- scoring ---------------------------------------------------------------------------------------
def test_short_piece_equals_a_plain_forward(model, scorer):
    """A piece that fits one window is scored as one forward over the whole piece (no windows, no padding)."""
    for num, label in ((12, "jazz"), (5, None)):
        piece = make_piece(num, seed=num, label=label)
        tokens = np.concatenate([piece.prefix, piece.body])
        assert len(tokens) - 1 <= L
        feats = features_lib.compute_features(tokens, VOCAB, piece.duration_units).as_dict()
        logits = nnx.jit(lambda m, t, f: m(t, f))(model, tokens[None, :-1], {k: v[None, :-1] for k, v in feats.items()})
        mask = (np.arange(len(tokens) - 1) >= len(piece.prefix) - 1).astype(np.float32)[None]
        nats, count = losses.masked_cross_entropy(logits, tokens[None, 1:], mask)
        (score,) = evaluation.score_pieces(scorer, [piece])
        assert score.tokens == int(count) == len(piece.body)
        assert score.total_bits == pytest.approx(float(nats) / math.log(2), rel=1e-5)


def test_long_pieces_invariants(model, scorer):
    pieces = [make_piece(70, seed=7, name="long"), make_piece(9, seed=8, label=None, name="short"),
              make_piece(45, seed=9, label="folk", name="mid")]
    assert len(pieces[0].body) > 3 * L
    stride = 20
    scores = evaluation.score_pieces(scorer, pieces, stride=stride)
    for piece, score in zip(pieces, scores):
        p, n = len(piece.prefix), len(piece.body)
        assert score.name == piece.name and score.tokens == n  # scored tokens == body tokens
        assert score.notes == int(np.isin(VOCAB.kind[piece.body], (TokenKind.NOTE_ON, TokenKind.DRUM)).sum()) > 0
        assert np.all(np.isfinite(score.bits)) and np.all(score.bits > 0)
        # Context: the first window's tokens see everything before them, later ones at least L - S tokens.
        first = min(n, L + 1 - p)
        np.testing.assert_array_equal(score.context[:first], p + np.arange(first))
        assert np.all(score.context[first:] >= L - stride)
        # Velocity marginalisation lowers exactly the attacks' bits and never raises any.
        attack = np.isin(VOCAB.kind[piece.body], (TokenKind.NOTE_ON, TokenKind.DRUM))
        assert np.all(score.bits_no_velocity[attack] < score.bits[attack])
        np.testing.assert_array_equal(score.bits_no_velocity[~attack], score.bits[~attack])
        m = score.metrics()
        assert m["bits_per_second"] * m["seconds"] == pytest.approx(m["total_bits"], rel=1e-12)
        assert m["bits_per_second_no_velocity"] < m["bits_per_second"]
        assert m["seconds"] == pytest.approx(piece.duration_units * VOCAB.config.time_unit_ms / 1000)
        assert m["bits_per_token"] * n == pytest.approx(m["total_bits"], rel=1e-12)
        assert m["bits_per_note"] * score.notes == pytest.approx(m["total_bits"], rel=1e-12)
    total = evaluation.total_metrics(scores)
    assert total["tokens"] == sum(len(p.body) for p in pieces)
    assert total["total_bits"] == pytest.approx(sum(s.total_bits for s in scores), rel=1e-12)
    assert total["bits_per_second"] == pytest.approx(total["total_bits"] / total["seconds"], rel=1e-12)
    assert total["bits_per_note"] == pytest.approx(total["total_bits"] / total["notes"], rel=1e-12)

    # Batching (and so padding rows) does not change any token's score; neither does the order of pieces.
    one = evaluation.score_pieces(evaluation.Scorer(model, VOCAB, batch_size=1), pieces[::-1], stride=stride)
    for a, b in zip(scores, one[::-1]):
        np.testing.assert_allclose(a.bits, b.bits, rtol=1e-5, atol=1e-5)


def test_later_windows_score_tokens_with_their_window_context(model, scorer):
    """A token scored by a later window gets the log-prob a direct forward over that window gives it."""
    piece = make_piece(40, seed=11)
    stride = 16
    (score,) = evaluation.score_pieces(scorer, [piece], stride=stride)
    start, lo, hi = evaluation.plan_windows(len(piece.body), len(piece.prefix), L, stride)[2]
    example = evaluation.window_example(piece, (start, lo, hi), L)
    logits = nnx.jit(lambda m, t, f: m(t, f))(
        model, example["inputs"][None], {k: example[k][None] for k in features_lib.FEATURE_NAMES})
    log_p = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
    pos = np.flatnonzero(example["loss_mask"])
    expected = -log_p[pos, example["targets"][pos]] / math.log(2)
    np.testing.assert_allclose(score.bits[lo:hi], expected, rtol=1e-4, atol=1e-5)


def test_record_and_encoded_piece_score_the_same(scorer):
    encoded = encoding.encode_notes(make_notes(30, seed=5), VOCAB, "folk")
    record = input_lib.record_from_piece(encoded, VOCAB, path="a.mid")
    from_record = windows.parse_record(record, VOCAB)
    from_encoded = evaluation.EvalPiece.from_encoded(encoded, VOCAB, name="a.mid")
    a, b = evaluation.score_pieces(scorer, [from_record, from_encoded])
    assert a.name == b.name == "a.mid"
    np.testing.assert_allclose(a.bits, b.bits, rtol=1e-6)
    assert a.metrics() == pytest.approx(b.metrics(), rel=1e-6)


def test_scorer_refuses_another_vocabulary(model):
    with pytest.raises(ValueError, match="token ids"):
        evaluation.Scorer(model, Vocab(), batch_size=2)


# -- velocity marginalisation ------------------------------------------------------------------------
def test_marginalisation_matches_brute_force():
    vocab = Vocab(VocabConfig(velocity_bins=3, pitch_min=60, pitch_max=62, max_wait=4))
    rng = np.random.default_rng(0)
    kinds = vocab.kind
    # Targets of every kind: note-ons, drums, note-offs, waits, specials, instrument tokens.
    pool = [np.flatnonzero(kinds == k) for k in TokenKind if k != TokenKind.LABEL]
    targets = np.concatenate([rng.choice(ids, 3) for ids in pool]).astype(np.int32)
    rng.shuffle(targets)
    logits = rng.normal(0, 3, (1, len(targets), vocab.size)).astype(np.float32)
    groups, is_attack = evaluation.velocity_groups(vocab)
    nll, nll_marginal = jax.jit(evaluation.token_nll)(logits, targets[None], groups, is_attack)

    probs = np.exp(logits[0].astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    for j, t in enumerate(targets):
        if kinds[t] == TokenKind.NOTE_ON:
            same_note = [vocab.note_on(vocab.instrument[t], v, vocab.pitch[t]) for v in range(3)]
        elif kinds[t] == TokenKind.DRUM:
            same_note = [vocab.drum(vocab.pitch[t], v) for v in range(3)]
        else:
            same_note = [t]
        assert t in same_note
        np.testing.assert_allclose(float(nll[0, j]), -np.log(probs[j, t]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(nll_marginal[0, j]), -np.log(probs[j, same_note].sum()), rtol=1e-4,
                                   atol=1e-5)
    assert np.all(np.asarray(nll_marginal) <= np.asarray(nll) + 1e-6)


def test_metrics_with_zero_denominators_are_none():
    m = evaluation.metrics(tokens=3, notes=0, seconds=0.0, total_bits=6.0, total_bits_no_velocity=6.0)
    assert m["bits_per_token"] == 2.0 and m["bits_per_note"] is None and m["bits_per_second"] is None
    assert tuple(m) == evaluation.METRIC_FIELDS


def test_unigram_baseline_from_records_and_from_histograms():
    # Tokens 5 and 6 only, V ids, add-0.5 smoothing: train counts 5 -> 3, 6 -> 1; eval tokens 5, 6, 7.
    train = [{"tokens": np.array([5, 5, 6])}, {"tokens": np.array([5])}]
    evals = [{"tokens": np.array([5, 6, 7])}]
    v, total = VOCAB.size, 4 + 0.5 * VOCAB.size
    expected = -(math.log2(3.5 / total) + math.log2(1.5 / total) + math.log2(0.5 / total)) / 3
    assert evaluation.unigram_bits_per_token(train, evals, VOCAB) == pytest.approx(expected, rel=1e-12)
    hist = lambda records: np.bincount(np.concatenate([r["tokens"] for r in records]), minlength=v)
    assert evaluation.unigram_bits_from_histograms(hist(train), hist(evals)) == pytest.approx(expected, rel=1e-12)
    # Capped at one record of each source: the first train record only.
    capped = -(math.log2(2.5 / (3 + 0.5 * v)) + math.log2(1.5 / (3 + 0.5 * v)) + math.log2(0.5 / (3 + 0.5 * v))) / 3
    assert evaluation.unigram_bits_per_token(train, evals, VOCAB, max_records=1) == pytest.approx(capped, rel=1e-12)
    with pytest.raises(ValueError, match="another vocabulary"):
        evaluation.unigram_bits_from_histograms(hist(train), hist(evals)[:-1])
    with pytest.raises(ValueError, match="no tokens"):
        evaluation.unigram_bits_from_histograms(hist(train), np.zeros(v, np.int64))
