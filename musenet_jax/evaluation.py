"""Reference numbers a trained model is judged against, and held-out scoring of whole pieces.

Held-out scoring (`score_pieces`). Every body token of a piece (the tokens after `start`, `end`
included) is scored exactly once, with as much context as a window of L (= the model's `max_len`)
tokens allows. A piece with P prefix tokens (`[label] instrument.. start`) fits C = L + 1 - P body
tokens in one window, laid out exactly like a training window (`data_pipeline.windows.pack_example`):

    seq = prefix (P) + body[s : s + C] + pad;  inputs = seq[:L], targets = seq[1 : L + 1]

with the features of the whole piece (`compute_features` of the body and its duration) sliced to the
window, and prefix positions given the part and countdown of the window's first body token. Windows
slide by a stride S (default L // 2): the first (s = 0) scores all its body tokens; each later window
ends S body tokens further (the last one at the end of the piece) and scores only the body tokens not
scored before, i.e. at most its last S. So a token scored in a later window sees at least
L + 1 - S >= L - S tokens before it (prefix included); prefix tokens are never scored. A piece no
longer than one window is scored by one forward pass, exactly as a plain forward over the whole
piece would score it.

Velocity marginalised ("no velocity") bits ask how well the model predicts the notes whatever their
loudness: for a target that is an attack (a pitched note-on, or a drum onset) the log-probability is
replaced by log sum_v p(v) over the velocity bins v of the same (instrument, pitch) note-on [same drum
note], computed from the same softmax; every other target (waits, note-offs, which carry no velocity,
`end`) keeps its plain log-probability. So per token, no-velocity bits <= bits.

Baselines: `unigram_bits_per_token` (train-split token frequencies), and `NgramScorer`, which puts an
`ngram.NgramModel` (interpolated Kneser-Ney) through `score_pieces` on exactly the model's windows and
tokens, velocity marginalisation included.

Windows of all pieces are batched B at a time into fixed [B, L] arrays (the last batch padded with
unscored rows), so one jitted forward is compiled once.

Units: bits (log base 2); seconds of music = duration_units * time_unit_ms / 1000.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import features as features_lib
from data_pipeline import windows as windows_lib
from data_pipeline.vocab import TokenKind, Vocab
from musenet_jax import ngram

LN2 = math.log(2.0)
# Per-piece and total metrics, in this order (the JSON fields and the table columns).
METRIC_FIELDS = ("tokens", "notes", "seconds", "total_bits", "total_bits_no_velocity", "bits_per_token",
                 "bits_per_note", "bits_per_second", "bits_per_second_no_velocity")


# -- unigram baseline ------------------------------------------------------------------------------
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
    return unigram_bits_from_histograms(_token_counts(train_source, vocab, max_records),
                                        _token_counts(eval_source, vocab, max_records), smoothing=smoothing)


def unigram_bits_from_histograms(train_histogram: np.ndarray, eval_histogram: np.ndarray, *,
                                 smoothing: float = 0.5) -> float:
    """`unigram_bits_per_token` from int[V] body-token histograms (`datasets.token_histogram`)."""
    train = np.asarray(train_histogram, np.float64) + smoothing
    evals = np.asarray(eval_histogram, np.float64)
    if train.shape != evals.shape:
        raise ValueError(f"token histograms of {train.shape[0]} and {evals.shape[0]} ids (another vocabulary?)")
    if evals.sum() == 0:
        raise ValueError("the evaluation split has no tokens")
    log_p = np.log2(train / train.sum())
    return float(-(evals * log_p).sum() / evals.sum())


# -- pieces ----------------------------------------------------------------------------------------
# The piece type and the window planner are the data pipeline's (one of each, shared with the trainer's
# validation); their names stay importable from here.
EvalPiece = windows_lib.Piece
default_stride = windows_lib.default_stride
plan_windows = windows_lib.plan_windows
window_example = windows_lib.window_example


def num_notes(body: np.ndarray, vocab: Vocab) -> int:
    """Attacks among the tokens: pitched note-ons plus drum onsets."""
    kind = vocab.kind[np.asarray(body)]
    return int(np.count_nonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.DRUM)))


# -- per-token log-probabilities ------------------------------------------------------------------
def velocity_groups(vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """(groups int32[V, Vb], is_attack bool[V]) for velocity marginalisation.

    Row t of `groups` lists the ids of token t's velocity bins 0..Vb-1: for a pitched note-on, the
    note-ons of the same (instrument, pitch); for a drum onset, the onsets of the same drum note. Other
    rows (is_attack False) repeat t and are never summed.
    """
    vb = vocab.config.velocity_bins
    ids = np.arange(vocab.size)
    groups = np.repeat(ids[:, None], vb, axis=1).astype(np.int32)
    bins = np.arange(vb)[None, :]
    on = np.flatnonzero(vocab.kind == TokenKind.NOTE_ON)
    groups[on] = vocab.note_on(vocab.instrument[on][:, None].astype(np.int64), bins,
                               vocab.pitch[on][:, None].astype(np.int64))
    drums = np.flatnonzero(vocab.kind == TokenKind.DRUM)
    groups[drums] = vocab.drum(vocab.pitch[drums][:, None].astype(np.int64), bins)
    is_attack = (vocab.kind == TokenKind.NOTE_ON) | (vocab.kind == TokenKind.DRUM)
    return groups, is_attack


def token_nll(logits: jax.Array, targets: jax.Array, groups: jax.Array,
              is_attack: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihoods in nats, plain and with velocity marginalised.

    Args:
      logits: float[B, T, V] next-token logits (the softmax runs in float32).
      targets: int32[B, T] target ids.
      groups, is_attack: `velocity_groups(vocab)` as arrays.
    Returns:
      (nll, nll_no_velocity), float32[B, T]. nll = -log p(target). For a target that is an attack (a
      pitched note-on or a drum onset) nll_no_velocity = -log sum_v p(same instrument and pitch [drum
      note], velocity bin v), the probability of the note whatever its loudness; for every other
      target (waits, note-offs, `end`, ...) it equals nll. So nll_no_velocity <= nll everywhere.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    group_logits = jnp.take_along_axis(logits, groups[targets], axis=-1)  # [B, T, Vb]
    nll_marginal = log_z - jax.nn.logsumexp(group_logits, axis=-1)
    return nll, jnp.where(is_attack[targets], nll_marginal, nll)


def _score_batch(state, batch, groups, is_attack, *, graphdef):
    """Masked per-position bits float32[B, L], plain and velocity-marginalised."""
    model = nnx.merge(graphdef, state)
    logits = model(batch["inputs"], {name: batch[name] for name in features_lib.FEATURE_NAMES})
    nll, nll_marginal = token_nll(logits, batch["targets"], groups, is_attack)
    mask = batch["loss_mask"]
    return nll * mask / LN2, nll_marginal * mask / LN2


# -- scores ----------------------------------------------------------------------------------------
def metrics(tokens: int, notes: int, seconds: float, total_bits: float,
            total_bits_no_velocity: float) -> dict[str, Any]:
    """The `METRIC_FIELDS` dict from sums; a ratio with a zero denominator is None."""

    def ratio(a, b):
        return float(a / b) if b else None

    return {"tokens": int(tokens), "notes": int(notes), "seconds": float(seconds), "total_bits": float(total_bits),
            "total_bits_no_velocity": float(total_bits_no_velocity),
            "bits_per_token": ratio(total_bits, tokens), "bits_per_note": ratio(total_bits, notes),
            "bits_per_second": ratio(total_bits, seconds),
            "bits_per_second_no_velocity": ratio(total_bits_no_velocity, seconds)}


@dataclasses.dataclass(frozen=True)
class PieceScore:
    """How well a model predicts one piece.

    Attributes:
      name: the piece's name.
      bits: float64[n] -log2 p of each body token given its context.
      bits_no_velocity: float64[n] the same with attack velocities marginalised (`token_nll`).
      context: int64[n] tokens the model saw before each body token (prefix included).
      notes: attacks in the body (pitched note-ons and drum onsets).
      seconds: the piece's length in seconds of music.
    """

    name: str
    bits: np.ndarray
    bits_no_velocity: np.ndarray
    context: np.ndarray
    notes: int
    seconds: float

    @property
    def tokens(self) -> int:
        return len(self.bits)

    @property
    def total_bits(self) -> float:
        return float(self.bits.sum())

    def metrics(self) -> dict[str, Any]:
        return metrics(self.tokens, self.notes, self.seconds, self.total_bits, float(self.bits_no_velocity.sum()))


def total_metrics(scores: Iterable[PieceScore]) -> dict[str, Any]:
    """Metrics of all pieces together: sums of bits over sums of tokens / notes / seconds."""
    rows = [s.metrics() for s in scores]
    return metrics(*(sum(r[k] for r in rows) for k in ("tokens", "notes", "seconds", "total_bits",
                                                        "total_bits_no_velocity")))


class Scorer:
    """A model's jitted window scorer: [B, L] batches -> per-position bits (compiled once).

    Args:
      model: a `MuseNet` (e.g. from `export.load_export` or `export.load_checkpoint`).
      vocab: its vocabulary (same number of ids).
      batch_size: B, windows per forward.
      seq_len: L, window length in tokens; default (and at most) the model's `max_len`.
    """

    def __init__(self, model, vocab: Vocab, *, batch_size: int = 8, seq_len: int | None = None):
        config = model.config
        if config.vocab_size != vocab.size:
            raise ValueError(f"the model has {config.vocab_size} token ids, the vocabulary {vocab.size}")
        self.vocab, self.batch_size = vocab, batch_size
        self.seq_len = config.max_len if seq_len is None else seq_len
        if not 2 <= self.seq_len <= config.max_len:
            raise ValueError(f"seq_len must be in 2..{config.max_len} (model.max_len), got {self.seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        graphdef, self._state = nnx.split(model)
        groups, is_attack = velocity_groups(vocab)
        self._groups, self._is_attack = jnp.asarray(groups), jnp.asarray(is_attack)
        self._fn = jax.jit(functools.partial(_score_batch, graphdef=graphdef))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """batch: `BATCH_KEYS` arrays [B, L] -> (bits, bits_no_velocity) float64[B, L], 0 where unscored."""
        bits, bits_nv = self._fn(self._state, dict(batch), self._groups, self._is_attack)
        return np.asarray(bits, np.float64), np.asarray(bits_nv, np.float64)


class NgramScorer:
    """`Scorer`'s interface for an n-gram baseline, so that `score_pieces` scores it on exactly the windows
    and tokens the model is scored on.

    The target at window position t, batch["targets"][b, t], is predicted from batch["inputs"][b, :t + 1],
    the row read as the start of a sequence (a window row starts with the conditioning prefix; the n-gram
    reads at most its last order - 1 tokens). Velocity-free bits of an attack target are -log2 of the summed
    probabilities of its velocity group (`velocity_groups`), as `token_nll` computes them for the model;
    other targets keep their plain bits.

    Args:
      model: an `ngram.NgramModel` over the vocabulary's ids (scored at its `order`).
      vocab: the vocabulary.
      seq_len: L, window length in tokens (the model's context, to score the same windows).
      batch_size: B, windows per call.
    """

    def __init__(self, model: ngram.NgramModel, vocab: Vocab, *, seq_len: int, batch_size: int = 8):
        if model.vocab_size != vocab.size:
            raise ValueError(f"the n-gram model has {model.vocab_size} token ids, the vocabulary {vocab.size}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        self.model, self.vocab, self.seq_len, self.batch_size = model, vocab, seq_len, batch_size
        self._groups, self._is_attack = velocity_groups(vocab)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """batch: `BATCH_KEYS` arrays [B, L] -> (bits, bits_no_velocity) float64[B, L], 0 where unscored."""
        scored = np.asarray(batch["loss_mask"]) > 0
        targets = np.asarray(batch["targets"], np.int64)[scored]
        contexts = self.model.contexts(batch["inputs"], scored, levels=self.model.order)
        p = self.model.probs_given(contexts, targets)
        p_no_velocity = p.copy()
        attack = self._is_attack[targets]
        if attack.any():  # the same contexts, each attack's whole velocity group
            p_no_velocity[attack] = self.model.probs_given(contexts[:, attack],
                                                           self._groups[targets[attack]]).sum(axis=-1)
        bits, bits_no_velocity = np.zeros(scored.shape), np.zeros(scored.shape)
        bits[scored], bits_no_velocity[scored] = -np.log2(p), -np.log2(p_no_velocity)
        return bits, bits_no_velocity


def score_pieces(scorer: Scorer | NgramScorer, pieces: Sequence[EvalPiece], *,
                 stride: int | None = None) -> list[PieceScore]:
    """Scores every body token of every piece once (module docstring), B windows per forward.

    Args:
      scorer: a `Scorer` (model, vocabulary, B and L), or an `NgramScorer`.
      pieces: the pieces; their windows are batched together in order.
      stride: S in body tokens, default L // 2 (capped to what the longest prefix leaves).
    Returns:
      One `PieceScore` per piece, in order.
    """
    vocab, seq_len, batch_size = scorer.vocab, scorer.seq_len, scorer.batch_size
    if stride is None:
        longest = max((len(p.prefix) for p in pieces), default=1)
        stride = max(1, min(default_stride(seq_len), seq_len + 1 - longest))
    plans = [plan_windows(len(p.body), len(p.prefix), seq_len, stride) for p in pieces]
    bits = [np.zeros(len(p.body)) for p in pieces]
    bits_nv = [np.zeros(len(p.body)) for p in pieces]
    context = [np.zeros(len(p.body), np.int64) for p in pieces]
    seen = [np.zeros(len(p.body), np.int64) for p in pieces]

    def windows() -> Iterator[tuple[int, np.ndarray]]:
        for i, plan in enumerate(plans):
            for w in plan:
                yield i, w

    def batches() -> Iterator[list[tuple[int, np.ndarray]]]:
        chunk = []
        for item in windows():
            chunk.append(item)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    for chunk in batches():
        rows = [window_example(pieces[i], w, seq_len) for i, w in chunk]
        rows += [windows_lib.empty_example(seq_len)] * (batch_size - len(rows))
        out, out_nv = scorer({k: np.stack([r[k] for r in rows]) for k in windows_lib.BATCH_KEYS})
        for row, (i, (start, lo, hi)) in enumerate(chunk):
            p = len(pieces[i].prefix)
            sl = slice(p - 1 + lo - start, p - 1 + hi - start)
            bits[i][lo:hi] = out[row, sl]
            bits_nv[i][lo:hi] = out_nv[row, sl]
            context[i][lo:hi] = p + np.arange(lo, hi) - start
            seen[i][lo:hi] += 1
    if not all(np.all(s == 1) for s in seen):  # plan_windows' contract; cheap to keep checked
        raise AssertionError("windows did not score every body token exactly once")
    unit_s = vocab.config.time_unit_ms / 1000.0
    return [PieceScore(p.name, bits[i], bits_nv[i], context[i], num_notes(p.body, vocab), p.duration_units * unit_s)
            for i, p in enumerate(pieces)]
