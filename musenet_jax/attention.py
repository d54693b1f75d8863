"""Causal sparse attention for the model: one entry point, `attend(q, k, v, spec, impl)`.

Patterns are defined once in `pallas_kernels.patterns` (Child et al. 2019): 'dense' (causal), 'strided'
and 'fixed', each with `part` 'both' | 'local' | 'summary'. Implementations:

- 'reference': dense softmax under the [T, T] mask (`pallas_kernels.reference`); O(T^2), the ground truth.
- 'xla': block-sparse attention in plain JAX. The pattern is split into its disjoint components
  (`Pattern.components()`); each is computed on a few dense tiles laid out so that no fully-masked tile
  exists, and the components share ONE softmax: a common row max, summed denominators and summed
  numerators. With T padded to Tp = R * l (R = ceil(T / l) rows of the [R, l] grid view):
    strided local   (A1): query blocks of b attend a window of l + b keys ending at the block (a band).
    strided summary (A2): in the grid view, causal attention down each of the l columns: [l, R, R] logits.
    fixed local     (A1): block-diagonal causal with blocks of l: [R, l, l] logits.
    fixed summary   (A2): keys gathered at the c summary columns of every block: [R, l, R * c] logits.
  With l ~ sqrt(T) each costs O(T * sqrt(T)) (times c for fixed summary). In-tile masks are the pattern's
  own predicates evaluated on iota positions, so they fuse into the softmax and carry no constants.
- 'cpu': the same tiling fused into one C++ kernel per (batch, head) behind XLA FFI custom calls
  (`musenet_jax.cpu_attention`): no [T, T] or per-piece logit arrays in memory, flash-style backward. The
  fast path on the CPU backend; compiled for the host on first use (needs a C++ compiler).
- 'pallas': block-sparse flash attention in Pallas (`pallas_kernels.sparse_attention`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from musenet_jax import cpu_attention
from pallas_kernels import patterns as patterns_lib
from pallas_kernels import reference as reference_lib

IMPLS = ("reference", "xla", "cpu", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which positions a query may attend to.

    Attributes:
      pattern: 'dense' | 'strided' | 'fixed'.
      stride: l (strided and fixed), in tokens.
      summary: c (fixed only), in tokens: the last c positions of every block of l are summaries.
      part: 'both' = A1 ∪ A2 in one softmax (the paper's "merged"); 'local' = A1 only; 'summary' = A2
        only (alternate 'local' / 'summary' layers for the paper's "interleaved").
    """

    pattern: str
    stride: int | None = None
    summary: int | None = None
    part: str = "both"

    def __post_init__(self):
        self.to_pattern()  # Validates: raises ValueError with a one-line reason.

    def to_pattern(self) -> patterns_lib.Pattern:
        return patterns_lib.make_pattern(self.pattern, self.stride, self.summary, self.part)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, impl: str = "xla",
           lowering: str | None = None) -> jax.Array:
    """Causal sparse attention.

    Args:
      q, k, v: [B, T, N, H] (batch, time, heads, head_dim).
      spec: the pattern.
      impl: 'reference' (dense masked softmax, O(T^2)), 'xla' (block-sparse plain JAX), 'cpu' (fused C++
        kernel, CPU backend only) or 'pallas'.
      lowering: for 'pallas', which kernels ('tpu', 'gpu' (Triton), 'mosaic_gpu', 'mosaic_gpu_ws'); None picks
        per backend (`pallas_kernels.sparse_attention`). Ignored by the other impls.

    Returns:
      [B, T, N, H] in q.dtype. Causal (j <= i); logits scaled by 1/sqrt(H); matmuls in q.dtype with fp32
      accumulation and fp32 softmax statistics. A query with no allowed key (only possible for fixed
      'summary' at positions i < l - c) outputs 0.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one shape [B, T, N, H], got {q.shape}, {k.shape}, {v.shape}")
    if impl == "reference":
        return reference_lib.reference_attention(
            q, k, v, pattern=spec.pattern, stride=spec.stride, summary=spec.summary, part=spec.part
        )
    if impl == "xla":
        return xla_attention(q, k, v, spec.to_pattern())
    if impl == "cpu":
        return cpu_attention.sparse_attention_cpu(
            q, k, v, pattern=spec.pattern, stride=spec.stride, summary=spec.summary, part=spec.part
        )
    if impl == "pallas":
        # Block-sparse Pallas flash kernel: interpret mode on CPU, compiled on TPU / GPU (see pallas_kernels).
        return pallas_kernels.sparse_attention(
            q, k, v, pattern=spec.pattern, stride=spec.stride, summary=spec.summary, part=spec.part,
            lowering=lowering,
        )
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")


# --- 'xla': block-sparse attention in plain JAX. ---------------------------------------------------------
# Internally q, k, v are [B, N, Tp, H] so that every einsum has its batch dims (B, N, block) leading and
# the matmul dims minor, which is what XLA's batched dot wants (no per-dot transposes).


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One component laid out as dense tiles.

    logits: f32[B, N, X, Y, S]: X * Y query rows of S keys each; `rows` says how (X, Y) maps to positions:
      True = natural blocks (position x * Y + y), False = grid columns (position y * X + x).
    mask: bool, broadcastable to [X, Y, S]: allowed (and in range).
    pv: probabilities f32[B, N, X, Y, S] -> f32[B, N, X, Y, H], the value matmul over this piece's keys.
    """

    logits: jax.Array
    mask: jax.Array
    rows: bool
    pv: Callable[[jax.Array], jax.Array]

    def to_natural(self, x: jax.Array) -> jax.Array:
        """[B, N, X, Y, ...] -> [B, N, Tp, ...]."""
        if not self.rows:
            x = jnp.swapaxes(x, 2, 3)
        return x.reshape(*x.shape[:2], -1, *x.shape[4:])

    def from_natural(self, x: jax.Array) -> jax.Array:
        """[B, N, Tp] -> [B, N, X, Y]."""
        xdim, ydim = self.logits.shape[2:4]
        if self.rows:
            return x.reshape(*x.shape[:2], xdim, ydim)
        return jnp.swapaxes(x.reshape(*x.shape[:2], ydim, xdim), 2, 3)


def _iota(shape: tuple[int, ...], dim: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum in the operands' dtype with fp32 accumulation and result."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _band_block(stride: int) -> int:
    """Query block b of the strided local band: the largest divisor of l in [l/4, l/2], else l.

    Each block of b queries reads l + b keys for about l + 1 useful ones, so smaller b wastes less, but
    small matmuls run far below peak on CPU; l / 2 measured best at l = 128 (benchmarks/attention.py).
    """
    for b in range(stride // 2, -(-stride // 4) - 1, -1):
        if b > 0 and stride % b == 0:
            return b
    return stride


def _strided_pieces(q, k, v, pattern: patterns_lib.Strided, t: int) -> list[_Piece]:
    """q, k, v: [B, N, Tp, H] zero-padded to Tp = R * stride."""
    bsz, n, tp, h = q.shape
    stride = pattern.stride
    r = tp // stride
    pieces = []
    for comp in pattern.components():
        if comp.name == "local":
            # Band: query block x (positions x*b .. x*b+b-1) reads keys x*b - stride .. x*b+b-1, that is
            # stride/b + 1 consecutive key blocks of b, taken from k padded in front by stride.
            b = _band_block(stride)
            nb, w = tp // b, stride // b + 1
            front = ((0, 0), (0, 0), (stride, 0), (0, 0))
            kb = jnp.pad(k, front).reshape(bsz, n, nb + w - 1, b, h)
            vb = jnp.pad(v, front).reshape(bsz, n, nb + w - 1, b, h)
            kw = jnp.concatenate([kb[:, :, i : i + nb] for i in range(w)], axis=3)  # [B, N, Tp/b, w*b, H]
            vw = jnp.concatenate([vb[:, :, i : i + nb] for i in range(w)], axis=3)
            shape = (nb, b, w * b)
            i = _iota(shape, 0) * b + _iota(shape, 1)
            j = _iota(shape, 0) * b - stride + _iota(shape, 2)
            pieces.append(
                _Piece(
                    logits=_dot("BNXYH,BNXSH->BNXYS", q.reshape(bsz, n, nb, b, h), kw),
                    mask=comp.allows(i, j) & (j >= 0) & (j < t),
                    rows=True,
                    pv=lambda p, vw=vw: _dot("BNXYS,BNXSH->BNXYH", p.astype(vw.dtype), vw),
                )
            )
        else:
            # Grid view [R, stride], position = row * stride + col: A2 is causal attention down each
            # column, so the column is the batch dim: [B, N, col, row, H].
            qg, kg, vg = (jnp.swapaxes(x.reshape(bsz, n, r, stride, h), 2, 3) for x in (q, k, v))
            shape = (stride, r, r)  # (col, query row, key row)
            i = _iota(shape, 1) * stride + _iota(shape, 0)
            j = _iota(shape, 2) * stride + _iota(shape, 0)
            pieces.append(
                _Piece(
                    logits=_dot("BNXYH,BNXSH->BNXYS", qg, kg),
                    mask=comp.allows(i, j) & (j < t),
                    rows=False,
                    pv=lambda p, vg=vg: _dot("BNXYS,BNXSH->BNXYH", p.astype(vg.dtype), vg),
                )
            )
    return pieces


def _fixed_pieces(q, k, v, pattern: patterns_lib.Fixed, t: int) -> list[_Piece]:
    """q, k, v: [B, N, Tp, H] zero-padded to Tp = R * stride."""
    bsz, n, tp, h = q.shape
    stride, c = pattern.stride, pattern.summary_width
    r = tp // stride
    qg, kg, vg = (x.reshape(bsz, n, r, stride, h) for x in (q, k, v))
    pieces = []
    for comp in pattern.components():
        if comp.name == "local":
            shape = (r, stride, stride)  # (block, query in block, key in block)
            i = _iota(shape, 0) * stride + _iota(shape, 1)
            j = _iota(shape, 0) * stride + _iota(shape, 2)
            pieces.append(
                _Piece(
                    logits=_dot("BNXYH,BNXSH->BNXYS", qg, kg),
                    mask=comp.allows(i, j) & (j < t),
                    rows=True,
                    pv=lambda p: _dot("BNXYS,BNXSH->BNXYH", p.astype(vg.dtype), vg),
                )
            )
        else:
            # The last c positions of every block, gathered by a static slice: [B, N, R * c, H].
            ks = kg[:, :, :, stride - c :].reshape(bsz, n, r * c, h)
            vs = vg[:, :, :, stride - c :].reshape(bsz, n, r * c, h)
            shape = (r, stride, r * c)
            i = _iota(shape, 0) * stride + _iota(shape, 1)
            s = _iota(shape, 2)
            j = (s // c) * stride + (stride - c) + s % c
            pieces.append(
                _Piece(
                    logits=_dot("BNXYH,BNSH->BNXYS", qg, ks),
                    mask=comp.allows(i, j) & (j < t),
                    rows=True,
                    pv=lambda p, vs=vs: _dot("BNXYS,BNSH->BNXYH", p.astype(vs.dtype), vs),
                )
            )
    return pieces


def _combine(pieces: list[_Piece], scale: float) -> jax.Array:
    """One softmax over all pieces: shared row max, summed denominators and numerators. -> f32[B, N, Tp, H]."""
    # Masked once: exp(-inf - m) = 0 then needs no second select, and its gradient is 0, not NaN.
    logits = [jnp.where(piece.mask, piece.logits, -jnp.inf) for piece in pieces]
    row_max = None
    for piece, s in zip(pieces, logits):
        m = piece.to_natural(jnp.max(s, axis=-1))
        row_max = m if row_max is None else jnp.maximum(row_max, m)
    # The max only keeps exp() in range; softmax does not depend on it, so no gradient flows through it.
    # Rows with no allowed key get 0 (their probabilities are all 0 below, and so is their output).
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom, numer = 0.0, 0.0
    for piece, s in zip(pieces, logits):
        m = piece.from_natural(row_max)[..., None]
        # Scaling by 1/sqrt(H) here fuses into the exp; the max commutes with it (scale > 0).
        p = jnp.exp((s - m) * scale)
        denom = denom + piece.to_natural(jnp.sum(p, axis=-1))
        numer = numer + piece.to_natural(piece.pv(p))
    return numer / jnp.where(denom == 0, 1.0, denom)[..., None]


def xla_logits_per_head(spec: AttentionSpec, t: int) -> int:
    """Number of (query, key) logits the 'xla' impl computes per batch row and head for length t.

    Counts every entry of every tile it evaluates (masked ones included); the matmul FLOPs are
    4 * H per logit forward and 8 * H more backward. Dense goes through XLA's dot_product_attention,
    which computes the full t * t square.
    """
    pattern = spec.to_pattern()
    if isinstance(pattern, patterns_lib.DenseCausal):
        return t * t
    stride = pattern.stride
    r = -(-t // stride)
    tp = r * stride
    total = 0
    for comp in pattern.components():
        if isinstance(pattern, patterns_lib.Strided):
            total += tp * (stride + _band_block(stride)) if comp.name == "local" else stride * r * r
        else:
            total += tp * stride if comp.name == "local" else tp * r * pattern.summary_width
    return total


def xla_tile_matmuls(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    """The 'xla' impl's tile matmuls alone: QK^T, then the same tiles times V, with no mask and no softmax.

    [B, T, N, H] -> f32[B, T, N, H] (meaningless values). benchmarks/attention.py times its forward and
    backward as the floor of the 'xla' layout: how fast XLA runs these batched dots before any softmax work.
    """
    pattern = spec.to_pattern()
    if isinstance(pattern, patterns_lib.DenseCausal):
        raise ValueError("the dense pattern has no tiles (it calls jax.nn.dot_product_attention)")
    pieces = _pieces(*_to_bnth(q, k, v, pattern.stride), pattern, q.shape[1])
    out = sum(piece.to_natural(piece.pv(piece.logits)) for piece in pieces)
    return jnp.swapaxes(out, 1, 2)[:, : q.shape[1]]


def _to_bnth(q, k, v, stride: int):
    """[B, T, N, H] -> [B, N, Tp, H], zero-padded to Tp = ceil(T / stride) * stride."""
    tp = -(-q.shape[1] // stride) * stride
    pad = ((0, 0), (0, tp - q.shape[1]), (0, 0), (0, 0))
    return tuple(jnp.swapaxes(jnp.pad(x, pad), 1, 2) for x in (q, k, v))


def _pieces(q, k, v, pattern: patterns_lib.Pattern, t: int) -> list[_Piece]:
    if isinstance(pattern, patterns_lib.Strided):
        return _strided_pieces(q, k, v, pattern, t)
    if isinstance(pattern, patterns_lib.Fixed):
        return _fixed_pieces(q, k, v, pattern, t)
    raise ValueError(f"no xla attention for pattern {pattern!r}")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, pattern: patterns_lib.Pattern) -> jax.Array:
    """Block-sparse causal attention in plain JAX (see the module docstring). [B, T, N, H] -> same."""
    t, h = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(h)
    if isinstance(pattern, patterns_lib.DenseCausal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale).astype(q.dtype)
    pieces = _pieces(*_to_bnth(q, k, v, pattern.stride), pattern, t)
    return jnp.swapaxes(_combine(pieces, scale), 1, 2)[:, :t].astype(q.dtype)
