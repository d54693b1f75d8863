"""Scoring spans by infilling beside continuation (`musenet_jax.infill_scoring`): both rows score the same tokens,
the infilling row only inside its middle, and the totals are the rows' sums."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flax import nnx

from data_pipeline import encoding
from data_pipeline import windows as windows_lib
from data_pipeline.vocab import Vocab, VocabConfig
from musenet_jax import evaluation, infill_scoring
from musenet_jax import model as model_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "midi"
NAMES = ["bach_bwv1.6.mid", "freedoom1_D_E1M1.mid", "mozart_k525short_pedal.mid"]
SEQ_LEN = 192


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(VocabConfig(labels=("classical", "doom"), velocity_bins=4))


@pytest.fixture(scope="module")
def pieces(vocab):
    return [windows_lib.Piece.from_encoded(encoding.encode_midi(FIXTURES / n, vocab, label="classical"), vocab, n)
            for n in NAMES]


@pytest.mark.parametrize("task", infill_scoring.TASKS)
def test_both_rows_score_the_same_event_tokens(pieces, vocab, task):
    examples, skipped = infill_scoring.span_examples(pieces, task, vocab, SEQ_LEN, spans_per_piece=5, seed=3)
    assert len(examples) >= 5 and len(examples) + skipped == 5 * len(pieces)
    for e in examples:
        fill = np.flatnonzero(e.infill["inputs"] == vocab.fill)[0]
        scored_infill = e.infill["targets"][e.infill["loss_mask"] > 0]
        scored_plain = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in e.continuation])
        assert len(scored_infill) == len(scored_plain) == e.events > 0
        assert sorted(scored_infill.tolist()) == sorted(scored_plain.tolist())  # the same ids (matched by time too)
        assert np.all(np.flatnonzero(e.infill["loss_mask"]) >= fill)  # only inside the middle
        assert e.middle.sum() >= e.events and np.all(np.flatnonzero(e.middle) >= fill)
        assert all(vocab.hole not in r["inputs"] for r in e.continuation)
    again, _ = infill_scoring.span_examples(pieces, task, vocab, SEQ_LEN, spans_per_piece=5, seed=3)
    assert all(np.array_equal(a.infill["inputs"], b.infill["inputs"]) for a, b in zip(examples, again, strict=True))
    if task == "accompany":  # the Bach chorale is one part: nothing to accompany
        assert skipped >= 5


def test_totals_are_the_rows_sums(pieces, vocab):
    config = model_lib.ModelConfig(vocab_size=vocab.size, d_model=16, num_heads=2, head_dim=8, mlp_dim=32,
                                   num_layers=1, max_len=SEQ_LEN, dtype="float32", remat_policy="off")
    scorer = evaluation.Scorer(model_lib.MuseNet(config, rngs=nnx.Rngs(params=0)), vocab, batch_size=4)
    examples, _ = infill_scoring.span_examples(pieces, "infill", vocab, SEQ_LEN, spans_per_piece=3)
    total = infill_scoring.score_spans(scorer, examples)
    assert total["spans"] == len(examples) and total["event_tokens"] == sum(e.events for e in examples)
    bits = sum(scorer({k: e.infill[k][None].repeat(4, 0) for k in windows_lib.BATCH_KEYS})[0][0].sum()
               for e in examples)
    assert total["infill_bits_per_event"] == pytest.approx(bits / total["event_tokens"], rel=1e-5)
    assert total["infill_bits_per_event_no_velocity"] <= total["infill_bits_per_event"]
    assert total["infill_gain"] == pytest.approx(1 - total["infill_bits_per_event"]
                                                 / total["continuation_bits_per_event"])
    # An untrained model is near uniform over the ids: about log2(V) bits either way.
    assert 0.8 * np.log2(vocab.size) < total["continuation_bits_per_event"] < 1.2 * np.log2(vocab.size)
