"""Reference numbers that a trained model is judged against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.vocab import Vocab


def _token_counts(source: Sequence, vocab: Vocab, max_records: int | None) -> np.ndarray:
    n = len(source) if max_records is None else min(len(source), max_records)
    # Evenly spaced records when capped, so a sorted source is still sampled across its range.
    indices = np.unique(np.linspace(0, len(source) - 1, n).astype(np.int64)) if n else []
    counts = np.zeros(vocab.size, np.int64)
    for i in indices:
        counts += np.bincount(np.asarray(source[int(i)]["tokens"], np.int64), minlength=vocab.size)[: vocab.size]
    return counts


def unigram_bits_per_token(train_source: Sequence, eval_source: Sequence, vocab: Vocab, *,
                           max_records: int | None = 5000, smoothing: float = 0.5) -> float:
    """Cross-entropy (bits per token) of the eval body tokens under the train body-token frequencies.

    The tokens scored are exactly those the model's validation loss scores (every body token, `end`
    included). Frequencies get add-`smoothing` counts so unseen tokens have finite cost; at most
    `max_records` records of each source are read.
    """
    train = _token_counts(train_source, vocab, max_records).astype(np.float64) + smoothing
    evals = _token_counts(eval_source, vocab, max_records)
    if evals.sum() == 0:
        raise ValueError("the evaluation split has no tokens")
    log_p = np.log2(train / train.sum())
    return float(-(evals * log_p).sum() / evals.sum())
