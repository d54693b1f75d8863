"""Sparse attention patterns of the Sparse Transformer (Child et al. 2019), defined once, host-side.

Position i (query) may attend to position j (key) when j is in the pattern's set S_i. With stride l and
summary width c:

| pattern   | A1 ("local")                       | A2 ("summary")                            |
|-----------|------------------------------------|-------------------------------------------|
| `dense`   | {j : j <= i}  (plain causal)       | -                                         |
| `strided` | {j : i - l <= j <= i}              | {j : j <= i and (i - j) mod l = 0}        |
| `fixed`   | {j : floor(j/l) = floor(i/l), j<=i}| {j : j <= i and j mod l >= l - c}         |

`part` picks the set: 'both' = A1 ∪ A2 in one softmax (the paper's "merged" head), 'local' = A1,
'summary' = A2 (alternating 'local' and 'summary' layers gives the paper's "interleaved" variant).

Each pattern is a small frozen object whose predicate `allows(i, j)` is THE definition; everything else
(`mask(n)`, the disjoint `components()`, `block_layout(...)`) is derived from it. The predicate is built
from `<=`, `//`, `%`, `&` only, so it runs on numpy arrays (host, here) and on jax arrays (inside a jitted
kernel) alike.

Why components and orderings. A kernel skips work per (q-block, k-block) tile, so a set is cheap only if
its tiles are few. In natural order some sets are not tile-sparse:

- strided A2: query i wants every l-th key, which touches every earlier key block. View positions as an
  [ceil(n/l), l] grid (p = row * l + col). A2 is then "same column, row <= own row": causal attention down
  each column. Listing positions column by column (`column_major_order`, for queries AND keys) makes each
  column a contiguous run, so A2 becomes block-diagonal-causal with blocks of about n/l: O(n * n/l) work.
  The local part A1 stays in natural order (a band of width l). The two parts use different query orders,
  so a kernel runs them as two passes and merges them with their log-sum-exp (one softmax overall).
- fixed A2: every earlier block has c summary columns, so in natural order every earlier tile is partly
  live. Gathering the keys at the summary positions (`summary_key_order`: keys with j mod l >= l - c, in
  increasing j; queries stay natural) gives a compact key axis of about n*c/l on which A2 is a staircase
  causal mask: O(n * n*c/l) work. Queries keep natural order, so both parts can share one softmax pass
  over the concatenated key axes.

With 'both' the parts overlap (e.g. j = i), so components are made disjoint: the summary component keeps
only A2 minus A1. Their union is exactly the pattern and no (i, j) is counted twice.

`block_layout(n, block_q, block_k)` therefore returns one `BlockLayout` per component, each computed on
that component's mask in its own orderings (`ComponentLayout.q_positions` / `k_positions` say which
natural positions the tile rows / columns are): a kernel permutes (or gathers) q, k, v accordingly, runs
the listed tiles, and scatters rows back. `SparseLayout.num_blocks` is the total tile count over all
components; with l ~ sqrt(n) and a fixed tile size it grows like n * sqrt(n) (dense causal: n^2 / 2).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

PARTS = ("both", "local", "summary")

# Tile kinds in `BlockLayout.tiles`.
EMPTY, PARTIAL, FULL = 0, 1, 2

# Layout/mask building on the host is chunked so that no [n, n] temporary exceeds this many entries.
_MAX_CHUNK_ENTRIES = 1 << 24

Predicate = Callable[[Any, Any], Any]


# --- Orderings: which natural positions the rows / columns of a component are, in order. --------------


def natural_order(n: int) -> np.ndarray:
    """int32[n]: positions 0..n-1."""
    return np.arange(n, dtype=np.int32)


def column_major_order(n: int, stride: int) -> np.ndarray:
    """int32[n]: positions of the [ceil(n/l), l] grid listed column by column (col 0 rows 0.., col 1 ..).

    Column c holds positions c, c + l, c + 2l, ... < n; when l does not divide n the last
    n mod l columns are one row longer than the others. No padding positions are listed.
    """
    return np.concatenate([np.arange(c, n, stride, dtype=np.int32) for c in range(min(stride, n))]).astype(
        np.int32
    )


def summary_key_order(n: int, stride: int, summary: int) -> np.ndarray:
    """int32[n_summary]: the summary positions (j mod l >= l - c), increasing; n_summary ~ n * c / l."""
    j = np.arange(n, dtype=np.int32)
    return j[j % stride >= stride - summary]


# --- Block layouts. -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Tile map of one [Tq, Tk] mask cut into [block_q, block_k] tiles (the last tiles may be ragged).

    Attributes:
      block_q, block_k: tile size in rows (queries) and columns (keys).
      tiles: int8[nq, nk], EMPTY / PARTIAL / FULL. FULL means every entry of the tile is in range and
        allowed (no mask needed); a tile with padding rows/columns past Tq/Tk is at most PARTIAL.
      kv_blocks: int32[nq, max(1, max(kv_counts))], per q-block the non-empty k-block indices in increasing
        order, padded with the row's last valid index (0 for a row with none) so that a pipelined kernel
        that runs a fixed trip count re-uses the tile already resident instead of fetching a new one.
      kv_counts: int32[nq], number of valid entries per row of `kv_blocks`.
      kv_full: bool[nq, max_count], whether each listed tile is FULL (padding entries are False).
    """

    block_q: int
    block_k: int
    tiles: np.ndarray
    kv_blocks: np.ndarray
    kv_counts: np.ndarray
    kv_full: np.ndarray

    @property
    def num_blocks(self) -> int:
        """Number of non-empty tiles (PARTIAL + FULL)."""
        return int(self.kv_counts.sum())

    @property
    def num_full(self) -> int:
        return int((self.tiles == FULL).sum())

    @property
    def num_partial(self) -> int:
        return int((self.tiles == PARTIAL).sum())


def tile_map(
    allows: Predicate, q_pos: np.ndarray, k_pos: np.ndarray, block_q: int, block_k: int
) -> np.ndarray:
    """int8[nq, nk] tile kinds of the mask allows(q_pos[:, None], k_pos[None, :]), built in row chunks."""
    tq, tk = len(q_pos), len(k_pos)
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    # Pad both axes to whole tiles; padded rows/columns are "not allowed", and a ragged tile is never FULL.
    qp = np.zeros(nq * block_q, np.int32)
    qp[:tq] = q_pos
    kp = np.zeros(nk * block_k, np.int32)
    kp[:tk] = k_pos
    tiles = np.zeros((nq, nk), np.int8)
    if nq == 0 or nk == 0:  # a component with no queries or no keys (e.g. fixed summary, T <= l - c)
        return tiles
    rows_per_chunk = max(1, _MAX_CHUNK_ENTRIES // (len(kp) * block_q))
    for r0 in range(0, nq, rows_per_chunk):
        r1 = min(nq, r0 + rows_per_chunk)
        m = np.asarray(allows(qp[r0 * block_q : r1 * block_q, None], kp[None, :]))
        m[max(0, tq - r0 * block_q) :] = False
        m[:, tk:] = False
        m = m.reshape(r1 - r0, block_q, nk, block_k)
        tiles[r0:r1] = np.where(m.all(axis=(1, 3)), FULL, np.where(m.any(axis=(1, 3)), PARTIAL, EMPTY))
    return tiles


def layout_from_tiles(tiles: np.ndarray, block_q: int, block_k: int) -> BlockLayout:
    """Compiles a tile map into padded per-q-block lists of non-empty k-blocks (scalar-prefetch ready)."""
    live = tiles != EMPTY
    counts = live.sum(axis=1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    kv_blocks = np.zeros((tiles.shape[0], width), np.int32)
    kv_full = np.zeros((tiles.shape[0], width), bool)
    for r in range(tiles.shape[0]):
        idx = np.flatnonzero(live[r]).astype(np.int32)
        if len(idx):
            kv_blocks[r, : len(idx)] = idx
            kv_blocks[r, len(idx) :] = idx[-1]
            kv_full[r, : len(idx)] = tiles[r, idx] == FULL
    return BlockLayout(block_q, block_k, tiles, kv_blocks, counts, kv_full)


# --- Components and patterns. ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Component:
    """One disjoint piece of a pattern, with the orderings in which it is tile-sparse.

    Attributes:
      name: 'causal' (dense), 'local' (A1) or 'summary' (A2, minus A1 when the pattern has both parts).
      allows: predicate (i, j) -> bool on natural positions (numpy or jax int arrays, broadcasting).
      q_order: n -> int32[Tq], the natural positions of the component's query rows, in order.
      k_order: n -> int32[Tk], the natural positions of the component's key columns, in order.
    """

    name: str
    allows: Predicate
    q_order: Callable[[int], np.ndarray]
    k_order: Callable[[int], np.ndarray]

    def mask(self, n: int) -> np.ndarray:
        """bool[Tq, Tk], the component's mask in its own (permuted) coordinates."""
        return np.asarray(self.allows(self.q_order(n)[:, None], self.k_order(n)[None, :]))

    def block_layout(self, n: int, block_q: int, block_k: int) -> BlockLayout:
        tiles = tile_map(self.allows, self.q_order(n), self.k_order(n), block_q, block_k)
        return layout_from_tiles(tiles, block_q, block_k)


@dataclasses.dataclass(frozen=True)
class ComponentLayout:
    """A component compiled for a sequence length n: its orderings and its tile layout."""

    name: str
    q_positions: np.ndarray  # int32[Tq]
    k_positions: np.ndarray  # int32[Tk]
    layout: BlockLayout


@dataclasses.dataclass(frozen=True)
class SparseLayout:
    """All components of a pattern compiled for length n. `num_blocks` is the total non-empty tile count."""

    n: int
    components: tuple[ComponentLayout, ...]

    @property
    def num_blocks(self) -> int:
        return sum(c.layout.num_blocks for c in self.components)


class Pattern(abc.ABC):
    """A causal attention pattern: the predicate `allows(i, j)` and everything derived from it."""

    @abc.abstractmethod
    def allows(self, i: Any, j: Any) -> Any:
        """bool array: may query position i attend to key position j (broadcasting int arrays)."""

    @abc.abstractmethod
    def components(self) -> tuple[Component, ...]:
        """Disjoint pieces whose union is `allows`, each with the orderings that make it tile-sparse."""

    def mask(self, n: int) -> np.ndarray:
        """bool[n, n] in natural order: mask[i, j] = allows(i, j)."""
        pos = natural_order(n)
        return np.asarray(self.allows(pos[:, None], pos[None, :]))

    def block_layout(self, n: int, block_q: int, block_k: int) -> SparseLayout:
        """Tile layouts of every component for length n (see the module docstring for the orderings)."""
        if n < 1 or block_q < 1 or block_k < 1:
            raise ValueError(f"need n, block_q, block_k >= 1, got {n}, {block_q}, {block_k}")
        return SparseLayout(
            n,
            tuple(
                ComponentLayout(c.name, c.q_order(n), c.k_order(n), c.block_layout(n, block_q, block_k))
                for c in self.components()
            ),
        )


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")


@dataclasses.dataclass(frozen=True)
class DenseCausal(Pattern):
    """Plain causal attention: j <= i."""

    def allows(self, i, j):
        return j <= i

    def components(self) -> tuple[Component, ...]:
        return (Component("causal", self.allows, natural_order, natural_order),)


@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """Strided pattern: A1 = the previous l positions and itself, A2 = every l-th earlier position."""

    stride: int
    part: str = "both"

    def __post_init__(self):
        if not _is_int(self.stride) or self.stride < 1:
            raise ValueError(f"strided pattern needs an integer stride >= 1, got {self.stride!r}")
        _check_part(self.part)

    def local(self, i, j):
        """A1 = {j : i - l <= j <= i}."""
        return (j <= i) & (j >= i - self.stride)

    def summary(self, i, j):
        """A2 = {j : j <= i and (i - j) mod l = 0}."""
        return (j <= i) & ((i - j) % self.stride == 0)

    def summary_only(self, i, j):
        """A2 minus A1 = {j : j < i - l and (i - j) mod l = 0} (same column of the grid, 2+ rows up)."""
        return (j < i - self.stride) & ((i - j) % self.stride == 0)

    def allows(self, i, j):
        if self.part == "local":
            return self.local(i, j)
        if self.part == "summary":
            return self.summary(i, j)
        return self.local(i, j) | self.summary(i, j)

    def components(self) -> tuple[Component, ...]:
        grid = lambda n: column_major_order(n, self.stride)
        local = Component("local", self.local, natural_order, natural_order)
        if self.part == "local":
            return (local,)
        if self.part == "summary":
            return (Component("summary", self.summary, grid, grid),)
        return (local, Component("summary", self.summary_only, grid, grid))


@dataclasses.dataclass(frozen=True)
class Fixed(Pattern):
    """Fixed pattern: A1 = own block of l (causal), A2 = the last c positions of every block (causal)."""

    stride: int
    summary_width: int
    part: str = "both"

    def __post_init__(self):
        if not _is_int(self.stride) or self.stride < 1:
            raise ValueError(f"fixed pattern needs an integer stride >= 1, got {self.stride!r}")
        if not _is_int(self.summary_width) or not 1 <= self.summary_width <= self.stride:
            raise ValueError(f"fixed pattern needs 1 <= summary <= stride, got {self.summary_width!r}")
        _check_part(self.part)

    def local(self, i, j):
        """A1 = {j : floor(j/l) = floor(i/l), j <= i}."""
        return (j // self.stride == i // self.stride) & (j <= i)

    def summary(self, i, j):
        """A2 = {j : j <= i and j mod l >= l - c}."""
        return (j <= i) & (j % self.stride >= self.stride - self.summary_width)

    def summary_only(self, i, j):
        """A2 minus A1 = summary positions of strictly earlier blocks."""
        return (j // self.stride < i // self.stride) & (j % self.stride >= self.stride - self.summary_width)

    def allows(self, i, j):
        if self.part == "local":
            return self.local(i, j)
        if self.part == "summary":
            return self.summary(i, j)
        return self.local(i, j) | self.summary(i, j)

    def components(self) -> tuple[Component, ...]:
        keys = lambda n: summary_key_order(n, self.stride, self.summary_width)
        local = Component("local", self.local, natural_order, natural_order)
        if self.part == "local":
            return (local,)
        if self.part == "summary":
            return (Component("summary", self.summary, natural_order, keys),)
        return (local, Component("summary", self.summary_only, natural_order, keys))


PATTERNS = ("dense", "strided", "fixed")


def make_pattern(pattern: str, stride: int | None = None, summary: int | None = None, part: str = "both"):
    """Builds a Pattern from its name and parameters; raises ValueError with a one-line reason."""
    if pattern == "dense":
        if stride is not None or summary is not None:
            raise ValueError("dense pattern takes no stride or summary")
        if part != "both":
            raise ValueError(f"dense pattern has no parts, got part={part!r}")
        return DenseCausal()
    if pattern == "strided":
        if stride is None:
            raise ValueError("strided pattern needs stride")
        if summary is not None:
            raise ValueError("strided pattern takes no summary (that is the fixed pattern's c)")
        return Strided(stride, part)
    if pattern == "fixed":
        if stride is None or summary is None:
            raise ValueError("fixed pattern needs stride and summary")
        return Fixed(stride, summary, part)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
