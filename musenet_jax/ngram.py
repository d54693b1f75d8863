r"""Interpolated modified Kneser-Ney n-gram model over token ids: the baseline a trained model must beat.

The model (Chen & Goodman 1998, "An empirical study of smoothing techniques for language modeling",
interpolated modified Kneser-Ney). For an order-n model and a history whose last n - 1 tokens are h:

    p_n(w | h) = max(c(h w) - D(c(h w)), 0) / c(h .)  +  gamma(h) p_{n-1}(w | h')
    gamma(h)   = (D_1 N_1(h .) + D_2 N_2(h .) + D_3+ N_3+(h .)) / c(h .)

where h' is h without its first token, c(h .) = sum_w c(h w) and N_r(h .) counts the words seen r times
after h (N_3+: three times or more). A context never seen with a successor (c(h .) = 0) passes the whole
mass down (gamma = 1). The highest order uses raw counts; every lower order uses continuation counts, the
number of distinct tokens seen before h w (N_1+(. h w)), except for the n-grams that begin at a sequence
start, which cannot be extended to the left and keep their raw counts (as KenLM and SRILM do). The lowest
order interpolates with the uniform distribution over the V ids of the vocabulary,

    p_1(w) = max(a(w) - D(a(w)), 0) / sum_v a(v)  +  gamma() / V,

so every id has non-zero probability and the probabilities of the V ids sum to 1 for every history.
Discounts D_1, D_2, D_3+ are set per order and per kind of count (raw or continuation) from that order's
count-of-counts n_1..n_4: Y = n_1 / (n_1 + 2 n_2), D_r = r - (r + 1) Y n_{r+1} / n_r (r = 1, 2, 3+);
see `modified_kn_discounts` for the degenerate cases.

Sequences. A training sequence is one record's tokens: the conditioning prefix `[label] instrument..
start`, the body and `end`. Every sequence starts with a beginning-of-sequence marker BOS (id V, outside
the vocabulary: never predicted, only a context). So a history shorter than n - 1 tokens uses the n-grams
anchored at the sequence start, e.g. p(w | BOS label piano): the start of a sequence has its own
statistics instead of backing off blindly, and n-grams never span two sequences.

Orders. `NgramModel.fit(sequences, V, order=N)` counts every order up to N once; `with_order(n)` for any
n <= N is the order-n model on those counts (raw counts at order n, continuation counts below), so
`select_order` compares orders 1..N in one pass over held-out data.

Units: log-probabilities in bits (log base 2); probabilities as float64.

Cost: fitting is a few sorts of the token stream per order (numpy); a probability is one binary search per
order in that order's sorted n-gram table.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_ORDERS = (1, 2, 3, 4, 5)
RAW, CONTINUATION = "raw", "continuation"


# -- smoothing -------------------------------------------------------------------------------------
def modified_kn_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """(D_1, D_2, D_3+) from the count-of-counts of `counts` (Chen & Goodman 1998, eq. 26).

    Args:
      counts: int[G] the counts of one order's n-grams (zeros are ignored).
    Returns:
      D_r for n-grams seen once, twice, three or more times, each clipped into [0.05, r] so that a seen
      context always leaves mass for unseen successors and no count goes negative. Where a count-of-counts
      that a formula divides by is 0 (tiny corpora), D_2 falls back to D_1 and D_3+ to D_2; with no
      singletons at all, Y = 0.5.
    """
    counts = np.asarray(counts)
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 else 0.5
    d1 = 1 - 2 * y * n2 / n1 if n1 else y
    d2 = 2 - 3 * y * n3 / n2 if n2 else d1
    d3 = 3 - 4 * y * n4 / n3 if n3 else d2
    return tuple(float(np.clip(d, 0.05, r)) for r, d in zip((1, 2, 3), (d1, d2, d3)))


def _interpolation(counts: np.ndarray, parent: np.ndarray, num_contexts: int,
                   discounts: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(alpha float64[G + 1], gamma float64[C + 1]) of one order (module docstring).

    alpha[g] = max(c_g - D(c_g), 0) / c(h .) of n-gram g with context h = parent[g]; gamma[h] the mass
    left for the next lower order (1 for a context with no successor). The extra last entries (alpha 0,
    gamma 1) are what index -1, "not seen", reads.
    """
    counts = counts.astype(np.float64)
    d = np.select([counts == 1, counts == 2, counts >= 3], discounts, 0.0)
    total = np.bincount(parent, counts, minlength=num_contexts)
    left = np.bincount(parent, d * (counts > 0), minlength=num_contexts)  # sum of D over h's successors
    safe = np.where(total > 0, total, 1.0)
    alpha = np.maximum(counts - d, 0.0) / safe[parent]
    gamma = np.where(total > 0, left / safe, 1.0)
    return np.append(alpha, 0.0), np.append(gamma, 1.0)


def _lookup(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """int64 index of each query in the sorted `keys`, -1 where absent (negative queries never match)."""
    if len(keys) == 0:
        return np.full(queries.shape, -1, np.int64)
    idx = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[idx] == queries, idx, -1)


# -- the model -------------------------------------------------------------------------------------
class NgramModel:
    """An interpolated modified Kneser-Ney model of order `order` over ids 0..V-1 (module docstring).

    Build with `NgramModel.fit`; `with_order(n)` gives the lower orders on the same counts.

    Attributes:
      vocab_size: V, the ids the model predicts.
      order: n, the order used by default.
      max_order: N, the highest order counted (`with_order` accepts 1..N).
      train_tokens: tokens predicted in training (every token of every sequence).
      num_ngrams: {k: distinct k-grams seen} for k = 1..N.
      discounts: {(k, "raw" | "continuation"): (D_1, D_2, D_3+)} per order and kind of count.
    """

    def __init__(self, *, vocab_size: int, max_order: int, keys: dict, alpha: dict, gamma: dict,
                 discounts: dict, train_tokens: int, num_ngrams: dict):
        self.vocab_size, self.max_order, self.order = vocab_size, max_order, max_order
        self._keys, self._alpha, self._gamma = keys, alpha, gamma
        self.discounts, self.train_tokens, self.num_ngrams = discounts, train_tokens, num_ngrams

    @property
    def bos(self) -> int:
        """The beginning-of-sequence id (V): a context only, never a prediction."""
        return self.vocab_size

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int] | np.ndarray], vocab_size: int, order: int, *,
            discounts: tuple[float, float, float] | None = None) -> NgramModel:
        """Counts every order 1..`order` of `sequences` and sets up the smoothing.

        Args:
          sequences: token-id sequences, each a whole record (ids in 0..V-1; empty ones are ignored).
          vocab_size: V.
          order: N >= 1, the highest order (the default order of the result).
          discounts: (D_1, D_2, D_3+) for every order and kind of count; None estimates them from the
            count-of-counts (`modified_kn_discounts`).
        Raises:
          ValueError: an id outside 0..V-1, order < 1, or no tokens at all.
        """
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        bos, width = vocab_size, vocab_size + 1
        # One stream: BOS s_1 BOS s_2 ...; an n-gram may hold BOS only as its first token.
        stream = _stream(sequences, vocab_size)
        if len(stream) == 0:
            raise ValueError("no tokens to fit an n-gram model on")
        is_target = stream != bos
        # ids[k][j]: the id of the k-gram ending at stream[j] (its index in level k's table), -1 if none;
        # level 1 is dense (id = token id, BOS included as a context).
        ids = {1: stream}
        raw = {1: np.bincount(stream[is_target], minlength=width)}
        parent = {1: np.zeros(width, np.int64)}
        first_seen = {}
        keys = {}
        for k in range(2, order + 1):
            context = ids[k - 1][:-1]
            valid = np.zeros(len(stream), bool)
            valid[1:] = (context >= 0) & is_target[1:]
            where = np.flatnonzero(valid)
            uniq, first, inverse, counts = np.unique(context[where - 1] * width + stream[where], return_index=True,
                                                     return_inverse=True, return_counts=True)
            ids[k] = np.full(len(stream), -1, np.int64)
            ids[k][where] = inverse.reshape(-1)
            keys[k], parent[k], raw[k], first_seen[k] = uniq, uniq // width, counts, where[first]
        # n-grams that begin at a sequence start cannot be extended to the left: they keep raw counts.
        bos_initial = {1: np.arange(width) == bos}
        for k in range(2, order + 1):
            bos_initial[k] = bos_initial[k - 1][parent[k]]
        cont = {}
        for k in range(1, order):
            suffix = ids[k][first_seen[k + 1]]  # the k-gram ending where each distinct (k+1)-gram ends
            cont[k] = np.bincount(suffix, minlength=len(raw[k]))
            cont[k][bos_initial[k]] = raw[k][bos_initial[k]]

        alpha, gamma, used = {}, {}, {}
        for k in range(1, order + 1):
            num_contexts = 1 if k == 1 else len(raw[k - 1])
            for kind, counts in ((RAW, raw.get(k)), (CONTINUATION, cont.get(k))):
                if counts is None:
                    continue
                d = discounts or modified_kn_discounts(counts)
                used[k, kind] = tuple(float(x) for x in d)
                alpha[k, kind], gamma[k, kind] = _interpolation(counts, parent[k], num_contexts, used[k, kind])
        return cls(vocab_size=vocab_size, max_order=order, keys=keys, alpha=alpha, gamma=gamma, discounts=used,
                   train_tokens=int(is_target.sum()),
                   num_ngrams={k: int(np.count_nonzero(raw[k])) for k in range(1, order + 1)})

    def with_order(self, order: int) -> NgramModel:
        """The order-`order` model on the same counts (shares the tables; 1 <= order <= max_order)."""
        self._check_orders((order,))
        other = copy.copy(self)
        other.order = order
        return other

    def _check_orders(self, orders: Sequence[int]) -> None:
        bad = [n for n in orders if not 1 <= n <= self.max_order]
        if bad or not orders:
            raise ValueError(f"orders must be in 1..{self.max_order} (the fitted max_order), got {list(orders)}")

    # -- contexts ----------------------------------------------------------------------------------
    def _gram_ids(self, z: np.ndarray, levels: int) -> np.ndarray:
        """int64[levels, ..., n]: entry j is the id of the j-gram ending at each position of z (int64[..., n],
        BOS included), -1 where that j-gram was never seen or would hold a BOS after its first token; the
        empty gram (j = 0) is 0, a 1-gram's id is its token."""
        out = [np.zeros(z.shape, np.int64)]
        ids = z
        for j in range(1, levels):
            out.append(ids)
            if j + 1 < levels:  # the (j+1)-gram ending at t: the j-gram ending at t - 1, then z[t]
                queries = np.where(ids[..., :-1] >= 0, ids[..., :-1] * (self.bos + 1) + z[..., 1:], -1)
                ids = np.concatenate([np.full((*z.shape[:-1], 1), -1, np.int64),
                                      _lookup(self._keys[j + 1], queries)], axis=-1)
        return np.stack(out)

    def contexts(self, inputs: np.ndarray, where: np.ndarray | None = None, *, levels: int | None = None) -> np.ndarray:
        """The context ids each position's next token is predicted from.

        Args:
          inputs: int[..., T] rows of ids in 0..V-1, each the start of a sequence: position t's history is
            BOS, inputs[..., :t + 1].
          where: bool[..., T], the positions wanted; default all.
          levels: contexts of 0..levels-1 tokens (default max_order, all the model reads).
        Returns:
          int64[levels, ...]: entry j is the id of the j-token context ending at each position (-1 where
          that j-gram was never seen or runs past the sequence start; level 0, the empty context, is 0);
          the trailing shape is inputs' ([..., T]) or, with `where`, [M] for its M True positions in
          row-major order.
        """
        inputs = np.asarray(inputs, np.int64)
        _check_ids(inputs, self.vocab_size)
        z = np.concatenate([np.full((*inputs.shape[:-1], 1), self.bos, np.int64), inputs], axis=-1)
        ids = self._gram_ids(z, self.max_order if levels is None else levels)[..., 1:]
        return ids if where is None else ids[:, np.asarray(where, bool)]

    # -- probabilities -----------------------------------------------------------------------------
    def probs_given(self, contexts: np.ndarray, targets: np.ndarray,
                    orders: Sequence[int] | None = None) -> np.ndarray:
        """Probabilities of `targets` in `contexts` (from `contexts`).

        Args:
          contexts: int64[levels, *S] with levels >= max(orders).
          targets: int[*S] ids, or int[*S, G] G candidate ids per position (all in 0..V-1).
          orders: the model orders to evaluate (each in 1..max_order); default (self.order,).
        Returns:
          float64 probabilities, targets' shape, with a leading [len(orders)] axis when `orders` is given.
        """
        wanted = (self.order,) if orders is None else tuple(orders)
        self._check_orders(wanted)
        top = max(wanted)
        targets = np.asarray(targets, np.int64)
        _check_ids(targets, self.vocab_size)
        if contexts.shape[0] < top:
            raise ValueError(f"contexts of {contexts.shape[0]} levels for order {top}")
        extra = targets.ndim - (contexts.ndim - 1)
        if extra not in (0, 1) or targets.shape[:contexts.ndim - 1] != contexts.shape[1:]:
            raise ValueError(f"targets of shape {targets.shape} for contexts of shape {contexts.shape[1:]}")
        # p_k = alpha_k(h w) + gamma_k(h) p_{k-1}, from the uniform distribution up: raw counts at each order
        # asked for, continuation counts for the lower orders it interpolates with.
        lower = np.full(targets.shape, 1.0 / self.vocab_size)
        out = {}
        for k in range(1, top + 1):
            context = contexts[k - 1][..., None] if extra else contexts[k - 1]
            if k == 1:
                gram = targets
            else:
                gram = _lookup(self._keys[k], np.where(context >= 0, context * (self.bos + 1) + targets, -1))
            # Index -1 (unseen) reads the tables' last entries: alpha 0, gamma 1.
            if k in wanted:
                out[k] = self._alpha[k, RAW][gram] + self._gamma[k, RAW][context] * lower
            if k < top:
                lower = self._alpha[k, CONTINUATION][gram] + self._gamma[k, CONTINUATION][context] * lower
        result = np.stack([out[n] for n in wanted])
        return result[0] if orders is None else result

    def probs(self, inputs: np.ndarray, targets: np.ndarray, *, where: np.ndarray | None = None,
              orders: Sequence[int] | None = None) -> np.ndarray:
        """p(targets[..., t] | BOS, inputs[..., :t + 1]) for batched rows.

        Args:
          inputs: int[..., T] rows, each the start of a sequence.
          targets: int[..., T] the id after each position, or int[..., T, G] G candidates per position.
          where: bool[..., T], the positions to compute; default all.
          orders: as in `probs_given`.
        Returns:
          float64, shaped like `targets` (or `targets[where]` with `where`), with a leading [len(orders)]
          axis when `orders` is given.
        """
        levels = max((self.order,) if orders is None else orders)
        targets = np.asarray(targets)
        return self.probs_given(self.contexts(inputs, where, levels=levels),
                                targets if where is None else targets[np.asarray(where, bool)], orders)

    def _history(self, history: Sequence[int]) -> np.ndarray:
        """int64[max_order]: the contexts after `history` (a sequence from its start, possibly empty)."""
        history = np.asarray(history, np.int64).reshape(-1)
        _check_ids(history, self.vocab_size)
        kept = history[-self.max_order:]  # more than the model reads; a cut row has no BOS before it
        z = kept if len(history) > self.max_order else np.concatenate([[self.bos], kept])
        return self._gram_ids(z, self.max_order)[:, -1]

    def log2_prob(self, history: Sequence[int], target: int) -> float:
        """log2 p(target | BOS, history), in bits (<= 0); `history` starts at the sequence start."""
        return float(np.log2(self.probs_given(self._history(history), np.int64(target))))

    def set_prob(self, history: Sequence[int], candidates: Sequence[int] | np.ndarray) -> float:
        """p(one of `candidates` | BOS, history): the sum of their probabilities (distinct ids)."""
        return float(self.probs_given(self._history(history), np.asarray(candidates, np.int64)).sum())

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """float64[V]: p(w | BOS, history) for every id w; sums to 1."""
        return self.probs_given(self._history(history), np.arange(self.vocab_size))

    def sequence_log2_probs(self, sequences: Iterable[Sequence[int] | np.ndarray],
                            orders: Sequence[int] | None = None) -> np.ndarray:
        """log2 p of every token of every sequence given the tokens before it (from BOS), in bits.

        Returns:
          float64[total tokens] (the sequences concatenated), with a leading [len(orders)] axis when
          `orders` is given.
        """
        # One row BOS s_1 BOS s_2 ...: the contexts stop at each BOS as they do in training.
        z = _stream(sequences, self.vocab_size)
        ids = self._gram_ids(z, max((self.order,) if orders is None else orders))
        targets = np.flatnonzero(z != self.bos)  # each predicted from the contexts ending just before it
        return np.log2(self.probs_given(ids[:, targets - 1], z[targets], orders))


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in 0..{vocab_size - 1}, got {ids.min()}..{ids.max()}")


def _stream(sequences: Iterable[Sequence[int] | np.ndarray], vocab_size: int) -> np.ndarray:
    """int64[n]: BOS (= vocab_size) s_1 BOS s_2 ... over the non-empty sequences."""
    parts = []
    for s in sequences:
        s = np.asarray(s, np.int64).reshape(-1)
        if len(s):
            _check_ids(s, vocab_size)
            parts += [np.array([vocab_size], np.int64), s]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# -- choosing the order ----------------------------------------------------------------------------
def select_order(model: NgramModel, sequences: Sequence[Sequence[int] | np.ndarray],
                 orders: Sequence[int] = DEFAULT_ORDERS, *,
                 context_lengths: Sequence[int] | None = None) -> tuple[int, dict[int, float]]:
    """The order with the lowest held-out bits/token, from one fit of max(orders) (lower orders share it).

    Args:
      model: fitted with max_order >= max(orders).
      sequences: held-out sequences (whole records).
      orders: candidate orders.
      context_lengths: per sequence, how many leading tokens are context only (e.g. the conditioning
        prefix); default 0: every token is scored.
    Returns:
      (best order, {order: bits/token}); ties go to the lower order.
    Raises:
      ValueError: nothing to score.
    """
    orders = tuple(sorted(set(orders)))
    logp = model.sequence_log2_probs(sequences, orders)
    scored = np.ones(logp.shape[1], bool)
    if context_lengths is not None:
        offset = 0
        for seq, skip in zip(sequences, context_lengths, strict=True):
            scored[offset:offset + min(int(skip), len(seq))] = False
            offset += len(seq)
    if not scored.any():
        raise ValueError("no held-out tokens to choose the n-gram order on")
    bits = {n: float(-logp[i, scored].mean()) for i, n in enumerate(orders)}
    return min(orders, key=lambda n: (bits[n], n)), bits


# -- training data ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sequences:
    """Records as n-gram sequences.

    Attributes:
      tokens: int32[n_i] per record: prefix `[label] instrument.. start`, then the body (ending with `end`).
      prefix_lengths: the prefix length of each.
      indices: the source index of each record read.
      skipped: records that could not be used (invalid), by index.
    """

    tokens: list[np.ndarray]
    prefix_lengths: list[int]
    indices: list[int]
    skipped: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def spread_order(n: int) -> np.ndarray:
    """int64[n], a permutation of 0..n-1 whose every prefix is spread evenly over the range (bit reversal)."""
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    bits = (n - 1).bit_length()
    ranks = np.arange(1 << bits, dtype=np.int64)
    reversed_ranks = np.zeros_like(ranks)
    for b in range(bits):
        reversed_ranks |= ((ranks >> b) & 1) << (bits - 1 - b)
    return reversed_ranks[reversed_ranks < n]


def gather(indices: Iterable[int], get, *, max_tokens: int | None = None) -> Sequences:
    """Sequences from `get(i)` -> (int tokens[n], prefix length) or None (unusable: listed as skipped).

    Items are taken in `indices` order; with `max_tokens`, taking stops before the first item that would bring
    the total (prefixes included) past it, and a first item longer than it is cut to it. With
    `indices=spread_order(n)` the items taken are spread over the whole range.
    """
    out = Sequences([], [], [], [])
    total = 0
    for i in indices:
        item = get(int(i))
        if item is None:
            out.skipped.append(int(i))
            continue
        tokens, prefix_len = np.asarray(item[0], np.int32), int(item[1])
        if max_tokens is not None and total + len(tokens) > max_tokens:
            if out.tokens:
                break
            tokens = tokens[:max_tokens]
        out.tokens.append(tokens)
        out.prefix_lengths.append(min(prefix_len, len(tokens)))
        out.indices.append(int(i))
        total += len(tokens)
    return out


def read_sequences(source: Sequence[Mapping], vocab, *, indices: Iterable[int] | None = None,
                   max_tokens: int | None = None) -> Sequences:
    """Records of a dataset source (`data_pipeline.windows` layout) as sequences for `NgramModel.fit` (`gather`).

    Args:
      source: records (`datasets.data_source`); invalid ones are skipped.
      vocab: their vocabulary (`data_pipeline.vocab.Vocab`).
      indices: the records to read, in this order; default all, in order.
      max_tokens: the bound on the tokens read (`gather`).
    """
    from data_pipeline import windows as windows_lib  # data only; keeps this module's import light

    def get(i: int):
        try:
            piece = windows_lib.parse_record(source[i], vocab)
        except ValueError:
            return None
        prefix = vocab.prefix(piece.label, piece.instruments)
        return np.concatenate([prefix, piece.tokens]), len(prefix)

    return gather(range(len(source)) if indices is None else indices, get, max_tokens=max_tokens)


def hold_out(sequences: Sequences, every: int = 20) -> tuple[Sequences, Sequences]:
    """(kept, held out): the items whose index is every - 1 mod `every` (the 20th, 40th, ... for 20) are held
    out; when none is but there are at least two items, the one of the largest index. For choosing an order
    where there is no validation data."""
    index = np.asarray(sequences.indices, np.int64)
    held = index % every == every - 1
    if not held.any() and len(index) >= 2:
        held[np.argmax(index)] = True

    def part(mask):
        keep = np.flatnonzero(mask)
        return Sequences([sequences.tokens[i] for i in keep], [sequences.prefix_lengths[i] for i in keep],
                         [sequences.indices[i] for i in keep], [])

    return part(~held), part(held)
