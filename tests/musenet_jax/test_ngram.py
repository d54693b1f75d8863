"""The Kneser-Ney n-gram baseline: hand-computed probabilities, normalisation, order choice, and its scorer
on the model's windows (velocity marginalisation included)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import encoding
from data_pipeline import input_pipeline as input_lib
from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import evaluation, ngram

# A small vocabulary (2177 ids, 4 velocity bins) so full distributions stay cheap.
VOCAB = Vocab(VocabConfig(velocity_bins=4, pitch_min=48, pitch_max=83, max_wait=32, labels=("jazz", "folk")))
D = (0.5, 1.0, 1.5)  # fixed discounts D_1, D_2, D_3+ for the hand computations


def test_bigram_and_unigram_by_hand():
    # V = 4 ids {0, 1, 2, 3}; BOS = 4 starts each sequence. Training streams: BOS 0 1 2 and BOS 0 1 1.
    model = ngram.NgramModel.fit([[0, 1, 2], [0, 1, 1]], 4, 2, discounts=D)
    assert model.bos == 4 and model.train_tokens == 6

    # Order 1 alone (raw counts): c(0) = 2, c(1) = 3, c(2) = 1, c(3) = 0; total 6.
    #   gamma = (D1 * #{c=1} + D2 * #{c=2} + D3 * #{c>=3}) / 6 = (0.5 * 1 + 1.0 * 1 + 1.5 * 1) / 6 = 0.5
    #   p(0) = (2 - 1.0) / 6 + 0.5 / 4 = 1/6 + 1/8 = 7/24
    #   p(1) = (3 - 1.5) / 6 + 1/8 = 3/8
    #   p(2) = (1 - 0.5) / 6 + 1/8 = 5/24
    #   p(3) = 0 + 1/8
    unigram = model.with_order(1)
    np.testing.assert_allclose(unigram.distribution([]), [7 / 24, 3 / 8, 5 / 24, 1 / 8], rtol=1e-12)
    np.testing.assert_allclose(unigram.distribution([2, 2, 1]), unigram.distribution([]), rtol=1e-12)

    # Order 2. The lower order uses continuation counts: a(w) = distinct tokens seen before w among the
    # bigrams (BOS,0) x2, (0,1) x2, (1,2), (1,1): a(0) = 1 {BOS}, a(1) = 2 {0, 1}, a(2) = 1 {1}, a(3) = 0.
    #   sum a = 4; gamma = (0.5 * 2 + 1.0 * 1) / 4 = 0.5
    #   p1(0) = (1 - 0.5) / 4 + 0.5 / 4 = 0.25;  p1(1) = (2 - 1) / 4 + 0.125 = 0.375
    #   p1(2) = 0.25;  p1(3) = 0.125
    # Context 1 (raw bigram counts): (1,2) = 1, (1,1) = 1; c(1 .) = 2; gamma(1) = 0.5 * 2 / 2 = 0.5
    #   p(2 | 1) = (1 - 0.5) / 2 + 0.5 * 0.25  = 0.375
    #   p(1 | 1) = (1 - 0.5) / 2 + 0.5 * 0.375 = 0.4375
    #   p(0 | 1) = 0.5 * 0.25 = 0.125;  p(3 | 1) = 0.5 * 0.125 = 0.0625
    np.testing.assert_allclose(model.distribution([0, 1]), [0.125, 0.4375, 0.375, 0.0625], rtol=1e-12)
    # Context 0: (0,1) = 2; gamma(0) = 1.0 * 1 / 2 = 0.5; p(1 | 0) = (2 - 1) / 2 + 0.5 * 0.375 = 0.6875
    assert model.log2_prob([0], 1) == pytest.approx(np.log2(0.6875), rel=1e-12)
    # Context BOS (the first token): (BOS,0) = 2; gamma = 0.5; p(0 | BOS) = (2 - 1) / 2 + 0.5 * 0.25 = 0.625
    assert model.log2_prob([], 0) == pytest.approx(np.log2(0.625), rel=1e-12)
    # Context 2 ends every sequence it is in (no successor): its whole mass goes to p1.
    np.testing.assert_allclose(model.distribution([0, 1, 2]), [0.25, 0.375, 0.25, 0.125], rtol=1e-12)


def test_trigram_by_hand_continuation_and_sequence_start_counts():
    # The same data at order 3. Level 2 is now a lower order: continuation counts, except for bigrams that
    # begin at a sequence start, which cannot be extended to the left and keep their raw counts:
    #   a(BOS,0) = c(BOS,0) = 2;  a(0,1) = |{BOS}| = 1;  a(1,2) = |{0}| = 1;  a(1,1) = |{0}| = 1.
    # Level 1 is as in the bigram test: p1 = [0.25, 0.375, 0.25, 0.125].
    model = ngram.NgramModel.fit([[0, 1, 2], [0, 1, 1]], 4, 3, discounts=D)
    # p(2 | 0 1): trigrams (0,1,2) = 1, (0,1,1) = 1; gamma(0 1) = 0.5 * 2 / 2 = 0.5.
    #   Level 2, context 1: a(1,2) = a(1,1) = 1, gamma = 0.5: p2(2 | 1) = 0.5 / 2 + 0.5 * 0.25 = 0.375.
    #   p(2 | 0 1) = (1 - 0.5) / 2 + 0.5 * 0.375 = 0.4375
    assert 2 ** model.log2_prob([0, 1], 2) == pytest.approx(0.4375, rel=1e-12)
    # p(1 | BOS 0): trigram (BOS,0,1) = 2; gamma = 1.0 * 1 / 2 = 0.5.
    #   Level 2, context 0: a(0,1) = 1, gamma = 0.5 * 1 / 1 = 0.5: p2(1 | 0) = (1 - 0.5) / 1 + 0.5 * 0.375 = 0.6875
    #   p(1 | BOS 0) = (2 - 1) / 2 + 0.5 * 0.6875 = 0.84375
    assert 2 ** model.log2_prob([0], 1) == pytest.approx(0.84375, rel=1e-12)
    # p(0 | BOS): no 2-token context ends at BOS, so level 2 answers, with context BOS: a(BOS,0) = 2 (raw),
    #   gamma = 1.0 * 1 / 2 = 0.5: p = (2 - 1) / 2 + 0.5 * 0.25 = 0.625. (A continuation count there would be 0.)
    assert 2 ** model.log2_prob([], 0) == pytest.approx(0.625, rel=1e-12)


def test_discounts_from_count_of_counts():
    # n1 = 10, n2 = 4, n3 = 2, n4 = 1 (zeros and larger counts do not enter):
    #   Y = 10 / (10 + 2 * 4) = 5/9
    #   D1 = 1 - 2 Y n2 / n1 = 1 - 2 * 5/9 * 4/10 = 5/9
    #   D2 = 2 - 3 Y n3 / n2 = 2 - 3 * 5/9 * 2/4 = 7/6
    #   D3 = 3 - 4 Y n4 / n3 = 3 - 4 * 5/9 * 1/2 = 17/9
    counts = np.array([1] * 10 + [2] * 4 + [3] * 2 + [4] + [0] * 5 + [9] * 3)
    np.testing.assert_allclose(ngram.modified_kn_discounts(counts), [5 / 9, 7 / 6, 17 / 9], rtol=1e-12)
    # Degenerate count-of-counts still give discounts in (0, r]: the model stays normalised and positive.
    for counts in ([5, 7, 9], [1, 1, 1], [2, 2], [1, 2]):
        d = ngram.modified_kn_discounts(np.array(counts))
        assert all(0 < x <= r for x, r in zip(d, (1, 2, 3))), (counts, d)
    # Fitting estimates them per order and kind of count.
    model = ngram.NgramModel.fit(_random_corpus(0, 60, 8), 8, 3)
    assert set(model.discounts) == {(1, "raw"), (1, "continuation"), (2, "raw"), (2, "continuation"), (3, "raw")}
    assert model.discounts[3, "raw"] != model.discounts[2, "raw"]


def _random_corpus(seed: int, num: int, vocab_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Skewed ids, so counts of all sizes occur.
    return [np.minimum(rng.geometric(0.35, rng.integers(1, 40)) - 1, vocab_size - 1) for _ in range(num)]


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one_and_lower_orders_share_the_counts(order):
    train = _random_corpus(1, 80, 9)
    model = ngram.NgramModel.fit(train, 9, 5).with_order(order)
    direct = ngram.NgramModel.fit(train, 9, order)  # fitted at that order: the same model
    histories = ([], [0], [3, 1], list(train[0]), list(train[1][:4]) + [8, 8], [8] * 7, [0, 0, 0, 0, 0, 0])
    for history in histories:
        p = model.distribution(history)
        assert p.shape == (9,) and np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12), history
        np.testing.assert_allclose(direct.distribution(history), p, rtol=1e-12)
    # The batched form gives the same numbers as one history at a time (each row a sequence start).
    rows = np.concatenate(train)[:12].reshape(2, 6)
    targets = np.roll(rows, -1, axis=1)
    batched = model.probs(rows, targets)
    for b in range(2):
        for t in range(6):
            assert batched[b, t] == pytest.approx(2 ** model.log2_prob(rows[b, :t + 1], targets[b, t]), rel=1e-12)


def test_sequence_scoring_matches_histories_and_every_order_at_once():
    train, held = _random_corpus(2, 50, 7), _random_corpus(3, 6, 7)
    model = ngram.NgramModel.fit(train, 7, 4)
    all_orders = model.sequence_log2_probs(held, orders=(1, 2, 3, 4))
    assert all_orders.shape == (4, sum(len(s) for s in held))
    for n in (1, 2, 3, 4):
        expected = [model.with_order(n).log2_prob(s[:i], s[i]) for s in held for i in range(len(s))]
        np.testing.assert_allclose(all_orders[n - 1], expected, rtol=1e-12)
        np.testing.assert_allclose(model.with_order(n).sequence_log2_probs(held), expected, rtol=1e-12)


def test_bad_ids_and_orders_are_refused():
    model = ngram.NgramModel.fit([[0, 1, 2]], 3, 2)
    with pytest.raises(ValueError, match=r"token ids must be in 0\.\.2"):
        ngram.NgramModel.fit([[0, 3]], 3, 2)
    with pytest.raises(ValueError, match="ids must be in"):
        model.log2_prob([0], 3)
    with pytest.raises(ValueError, match=r"orders must be in 1\.\.2"):
        model.with_order(3)
    with pytest.raises(ValueError, match="no tokens"):
        ngram.NgramModel.fit([[], []], 3, 2)


def _markov_corpus(rng, table: np.ndarray, num: int, length: int, noise: float) -> list[np.ndarray]:
    """Each token a fixed function of the `table.ndim` tokens before it, except with probability `noise`."""
    depth, size = table.ndim, table.shape[0]
    out = []
    for _ in range(num):
        seq = list(rng.integers(0, size, depth))
        for _ in range(length - depth):
            seq.append(table[tuple(seq[-depth:])] if rng.random() > noise else rng.integers(0, size))
        out.append(np.array(seq))
    return out


@pytest.mark.parametrize("depth", [1, 2])
def test_select_order_picks_the_order_of_the_source(depth):
    # A token depends on the `depth` tokens before it: the true model has order depth + 1. Lower orders
    # cannot see the rule; higher ones split the same statistics over more contexts.
    rng = np.random.default_rng(depth)
    table = rng.integers(0, 6, (6,) * depth)
    train, held = _markov_corpus(rng, table, 40, 100, 0.3), _markov_corpus(rng, table, 10, 100, 0.3)
    model = ngram.NgramModel.fit(train, 6, 5)
    best, bits = ngram.select_order(model, held)
    assert best == depth + 1, bits
    assert bits[depth] > bits[depth + 1] + 0.3  # the rule is worth a lot
    # Tokens marked as context are not scored: the same choice, other numbers.
    best_skip, bits_skip = ngram.select_order(model, held, context_lengths=[50] * len(held))
    assert best_skip == best and bits_skip[1] != bits[1]


def test_spread_order_gather_and_hold_out():
    order = ngram.spread_order(10)
    assert sorted(order) == list(range(10)) and list(order[:4]) == [0, 8, 4, 2]
    items = {i: (np.arange(10) + i, 2) for i in range(30)}
    items[5] = None  # unusable: listed as skipped
    taken = ngram.gather(range(30), items.get, max_tokens=55)
    # 10 tokens each: 0..4 fit (5 is skipped), 6 would reach 60 > 55 and stops the reading.
    assert taken.indices == [0, 1, 2, 3, 4] and taken.skipped == [5] and taken.num_tokens == 50
    assert ngram.gather([7], items.get, max_tokens=4).tokens[0].tolist() == [7, 8, 9, 10]  # a first item is cut
    kept, held = ngram.hold_out(ngram.gather(range(45), lambda i: ([i], 0)))
    assert held.indices == [19, 39] and len(kept.indices) == 43
    kept, held = ngram.hold_out(ngram.gather([3, 1, 7], lambda i: ([i], 0)))  # fewer than 20: the last index
    assert held.indices == [7] and kept.indices == [3, 1]


# -- the scorer on the model's windows ------------------------------------------------------------
def _pieces(seeds, label="jazz"):
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        num = 60 + 20 * (seed % 3)
        drums = VOCAB.drums_index
        instrument = rng.choice([0, 1, drums], num).astype(np.int32)
        pitch = np.where(instrument == drums, rng.integers(35, 40, num), rng.integers(60, 66, num)).astype(np.int32)
        start = np.sort(rng.integers(0, num * 12, num)).astype(np.int64)
        notes = encoding.Notes(instrument, pitch, rng.integers(1, 128, num).astype(np.int32), start,
                               start + rng.integers(1, 40, num))
        out.append(evaluation.EvalPiece.from_encoded(encoding.encode_notes(notes, VOCAB, label), VOCAB,
                                                     name=f"p{seed}"))
    return out


@pytest.fixture(scope="module")
def fitted():
    """An order-3 model on 12 random pieces (prefix + body), and 3 other pieces to score."""
    train = _pieces(range(12))
    model = ngram.NgramModel.fit([np.concatenate([p.prefix, p.body]) for p in train], VOCAB.size, 3)
    return model, _pieces(range(100, 103))


def test_velocity_group_probability_is_the_sum_over_the_group(fitted):
    model, pieces = fitted
    groups, is_attack = evaluation.velocity_groups(VOCAB)
    body = pieces[0].body
    attacks = np.flatnonzero(is_attack[body])
    assert len(attacks) > 5
    history = np.concatenate([pieces[0].prefix, body[:attacks[5]]])
    group = groups[body[attacks[5]]]
    p = model.distribution(history)
    assert model.set_prob(history, group) == pytest.approx(p[group].sum(), rel=1e-12)
    assert p[group].sum() > p[body[attacks[5]]]  # the other bins add probability


def test_scorer_scores_exactly_the_masked_tokens(fitted):
    model, pieces = fitted
    seq_len = 48
    scorer = evaluation.NgramScorer(model, VOCAB, seq_len=seq_len, batch_size=4)
    # Windows as the evaluation lays them out (the second and later ones score only their last tokens).
    windows = [(p, w) for p in pieces[:2] for w in evaluation.plan_windows(len(p.body), len(p.prefix), seq_len, 16)]
    rows = [evaluation.window_example(p, w, seq_len) for p, w in windows[:3]] + [input_lib.empty_example(seq_len)]
    batch = {k: np.stack([r[k] for r in rows]) for k in input_lib.BATCH_KEYS}
    bits, bits_nv = scorer(batch)
    mask = batch["loss_mask"] > 0
    assert bits.shape == bits_nv.shape == (4, seq_len) and bits.dtype == np.float64
    assert np.all(bits[~mask] == 0) and np.all(bits_nv[~mask] == 0)
    assert np.all(bits[mask] > 0) and np.all(bits_nv[mask] <= bits[mask] + 1e-12)
    groups, is_attack = evaluation.velocity_groups(VOCAB)
    for b, t in zip(*np.nonzero(mask)):
        history, target = batch["inputs"][b, :t + 1], batch["targets"][b, t]
        assert bits[b, t] == pytest.approx(-model.log2_prob(history, target), rel=1e-12)
        expected_nv = -np.log2(model.set_prob(history, groups[target])) if is_attack[target] else bits[b, t]
        assert bits_nv[b, t] == pytest.approx(expected_nv, rel=1e-12)
    assert (bits_nv[mask] < bits[mask] - 1e-9).any()  # some attacks were marginalised


def test_score_pieces_with_the_ngram_equals_scoring_whole_sequences(fitted):
    # Windows overlap by at least order - 1 tokens, so every scored token has its full n-gram context, and
    # the windowed bits are those of the whole pieces scored as sequences (prefix tokens excluded).
    model, pieces = fitted
    scores = evaluation.score_pieces(evaluation.NgramScorer(model, VOCAB, seq_len=40, batch_size=3), pieces)
    for piece, score in zip(pieces, scores):
        log2p = model.sequence_log2_probs([np.concatenate([piece.prefix, piece.body])])[len(piece.prefix):]
        np.testing.assert_allclose(score.bits, -log2p, rtol=1e-12)
    assert evaluation.total_metrics(scores)["bits_per_token"] > 0
    with pytest.raises(ValueError, match="n-gram model has"):
        evaluation.NgramScorer(ngram.NgramModel.fit([[0, 1]], 5, 1), VOCAB, seq_len=40)
