"""KV caches for one-token-at-a-time decoding, laid out per attention pattern so a step's cost is flat in position.

Shapes: B batch, N heads (of one head group), H head_dim, L max_len (tokens), l stride, c summary width,
R = ceil(L / l), S entries a step reads from one cache piece.

Each head group of a layer (`ModelConfig.attention_groups(kind)`) has its own cache: one *piece* per
disjoint component of its pattern (`pallas_kernels.patterns.Pattern.components()`), each piece a dict
{'k', 'v'} of [B, N, S_store, H] arrays in the compute dtype (heads before entries, so each head's keys are
contiguous and the step's matmuls need no transposed copy of the cache). A piece is defined by where position p is
written, which contiguous run of S entries a query at position i reads, and which positions those entries
hold; the component's own predicate `allows(i, j)` then masks them, so the decoded attention is the very
set the training forward uses (merged 'both' groups read their local and summary pieces under one softmax,
with the summary piece restricted to A2 minus A1 exactly as in the forward).

Memory (stored) and read (per step) per head group, in tokens:

| component              | layout                                      | stored         | read per step |
|------------------------|---------------------------------------------|----------------|---------------|
| dense (causal)         | all positions, slot = p                     | L              | L             |
| strided local (A1)     | ring of the last l + 1 positions (i-l..i)   | l + 1          | l + 1         |
| strided summary (A2)   | by residue: slot = (p mod l) * R + p // l   | l * R (~ L)    | R             |
| fixed local (A1)       | the current block, slot = p mod l           | l              | l             |
| fixed summary (A2)     | the c summary slots of each block (+1 spare)| R * c + 1      | R * c         |

Strided A2 must keep every position (each is some later query's summary key), but a query reads only its
own residue's row of R entries. All reads are fixed-size slices with a mask, so a step costs the same at
every position: O(l + L / l) for strided, O(l + c L / l) for fixed, O(L) for dense. Non-summary positions of
a fixed summary piece are written to the spare slot (index R * c) instead of branching.

Scanned layers keep their caches stacked ([R_layers, ...] leaves) and a step addresses layer row r with
dynamic slices (`index`), so writes stay in place. XLA:CPU materialises each read slice before its matmul:
negligible for the sparse pieces (l + 1 or R entries), but for a dense piece it copies the layer's whole
[B, N, L, H] keys and values every step, about doubling the dense cache's memory traffic (benchmarks/
generate.py's dense rows include it; an unscanned model avoids it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from musenet_jax import attention as attention_lib
from pallas_kernels import patterns as patterns_lib

Cache = dict  # {component name: {'k': [B, N, S_store, H], 'v': [B, N, S_store, H]}}


@dataclasses.dataclass(frozen=True)
class _PieceLayout:
    """Where one component's keys live in its cache piece (all ints in tokens; see module doc)."""

    name: str
    allows: object  # predicate (i, j) -> bool, on jax int arrays
    kind: str  # 'causal' | 'ring' | 'residue' | 'block' | 'summary_slots'
    max_len: int
    stride: int = 1
    summary: int = 0

    @property
    def rows(self) -> int:
        return -(-self.max_len // self.stride)

    @property
    def stored(self) -> int:
        return {
            "causal": self.max_len,
            "ring": self.stride + 1,
            "residue": self.stride * self.rows,
            "block": self.stride,
            "summary_slots": self.rows * self.summary + 1,
        }[self.kind]

    @property
    def read(self) -> int:
        return {
            "causal": self.max_len,
            "ring": self.stride + 1,
            "residue": self.rows,
            "block": self.stride,
            "summary_slots": self.rows * self.summary,
        }[self.kind]

    def write_index(self, p: jax.Array) -> jax.Array:
        stride, c = self.stride, self.summary
        if self.kind == "causal":
            return p
        if self.kind == "ring":
            return p % (stride + 1)
        if self.kind == "residue":
            return (p % stride) * self.rows + p // stride
        if self.kind == "block":
            return p % stride
        in_summary = p % stride >= stride - c
        return jnp.where(in_summary, (p // stride) * c + p % stride - (stride - c), self.rows * c)

    def read_start(self, i: jax.Array) -> jax.Array:
        return (i % self.stride) * self.rows if self.kind == "residue" else jnp.zeros_like(i)

    def read_positions(self, i: jax.Array) -> jax.Array:
        """int32[S]: the position held by each read entry at query position i (may be < 0: empty)."""
        s = jnp.arange(self.read, dtype=jnp.int32)
        stride, c = self.stride, self.summary
        if self.kind == "causal":
            return s
        if self.kind == "ring":
            return i - (i - s) % (stride + 1)
        if self.kind == "residue":
            return i % stride + s * stride
        if self.kind == "block":
            return (i // stride) * stride + s
        return (s // c) * stride + (stride - c) + s % c


def _layouts(spec: attention_lib.AttentionSpec, max_len: int) -> tuple[_PieceLayout, ...]:
    pattern = spec.to_pattern()
    out = []
    for comp in pattern.components():
        if isinstance(pattern, patterns_lib.DenseCausal):
            kind, kw = "causal", {}
        elif isinstance(pattern, patterns_lib.Strided):
            kind = "ring" if comp.name == "local" else "residue"
            kw = dict(stride=pattern.stride)
        elif isinstance(pattern, patterns_lib.Fixed):
            kind = "block" if comp.name == "local" else "summary_slots"
            kw = dict(stride=pattern.stride, summary=pattern.summary_width)
        else:
            raise ValueError(f"no decoding cache for pattern {pattern!r}")
        out.append(_PieceLayout(comp.name, comp.allows, kind, max_len, **kw))
    return tuple(out)


def cache_tokens(spec: attention_lib.AttentionSpec, max_len: int) -> tuple[int, int]:
    """(stored, read per step) cache entries in tokens for one head group with this spec (see module doc)."""
    layouts = _layouts(spec, max_len)
    return sum(p.stored for p in layouts), sum(p.read for p in layouts)


def init_cache(spec: attention_lib.AttentionSpec, max_len: int, batch: int, heads: int, head_dim: int,
               dtype) -> Cache:
    """Empty (zero) cache of one head group: {component: {'k', 'v': [B, N, S_store, H]}}."""
    return {
        p.name: {name: jnp.zeros((batch, heads, p.stored, head_dim), dtype) for name in ("k", "v")}
        for p in _layouts(spec, max_len)
    }


def _write(buf: jax.Array, value: jax.Array, slot: jax.Array, index: jax.Array | None) -> jax.Array:
    """buf [(R,) B, N, S_store, H] <- value [B, N, H] at slot (of layer row `index` when given), in place."""
    value = value[:, :, None].astype(buf.dtype)
    if index is None:
        return jax.lax.dynamic_update_slice_in_dim(buf, value, slot, axis=2)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(buf, value[None], (index, zero, zero, slot, zero))


def _read(buf: jax.Array, start: jax.Array, size: int, index: jax.Array | None) -> jax.Array:
    """[B, N, size, H]: entries start..start+size-1 of buf (of layer row `index` when given)."""
    if index is None:
        return jax.lax.dynamic_slice_in_dim(buf, start, size, axis=2)
    zero = jnp.zeros((), jnp.int32)
    sizes = (1, *buf.shape[1:3], size, buf.shape[4])
    return jax.lax.dynamic_slice(buf, (index, zero, zero, start, zero), sizes)[0]


def attend_step(q: jax.Array, k: jax.Array, v: jax.Array, cache: Cache, spec: attention_lib.AttentionSpec,
                position: jax.Array, max_len: int, index: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Writes this position's key / value into the cache, then attends from it.

    Args:
      q, k, v: [B, N, H], the projections of the token at `position`.
      cache: this head group's cache (from `init_cache` or the previous step).
      position: int32 scalar, the token's position i (all rows of the batch share it).
      max_len: L, the model's max_len the cache was made for.
      index: for caches stacked over scanned layers ([R_layers, B, N, S_store, H] leaves), the layer row
        to use. Rows are read and written in place by dynamic slices, never copied out whole: a copy of a
        row per step would cost as much as the whole step.
    Returns:
      ([B, N, H] in q.dtype, the new cache). Same math as `attention.attend`: logits scaled by 1/sqrt(H),
      one fp32 softmax over all components' allowed keys, 0 for a query with no allowed key.
    """
    position = jnp.asarray(position, jnp.int32)
    new_cache, logits, values, masks = {}, [], [], []
    for piece in _layouts(spec, max_len):
        slot = piece.write_index(position)
        kc = _write(cache[piece.name]["k"], k, slot, index)
        vc = _write(cache[piece.name]["v"], v, slot, index)
        new_cache[piece.name] = {"k": kc, "v": vc}
        start = piece.read_start(position)
        kr, vr = _read(kc, start, piece.read, index), _read(vc, start, piece.read, index)  # [B, N, S, H]
        j = piece.read_positions(position)
        masks.append(piece.allows(position, j) & (j >= 0) & (j <= position))
        logits.append(jnp.einsum("bnh,bnsh->bns", q, kr, preferred_element_type=jnp.float32))
        values.append(vr)
    logits = jnp.concatenate(logits, axis=-1)  # [B, N, S_total]
    mask = jnp.concatenate(masks)  # [S_total]
    values = jnp.concatenate(values, axis=2)  # [B, N, S_total, H]
    scale = 1.0 / math.sqrt(q.shape[-1])
    row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp((logits - row_max) * scale), 0.0)
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bns,bnsh->bnh", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = out / jnp.where(denom == 0, 1.0, denom)[..., None]
    return out.astype(q.dtype), new_cache
