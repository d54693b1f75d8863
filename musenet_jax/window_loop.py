"""The jitted loop that writes one context window of a batch of pieces (`musenet_jax.sampling` states the rules,
the windows and the features; `Decoder` calls this once per window).

Each row's piece lives in a buffer of C tokens with the five model features of every token it holds
(`data_pipeline.features.FEATURE_NAMES`, int32[B, C] each). The sampler fills them for the prompt on the host;
the loop writes those of every token it samples. A sampled token's part and countdown come from its timing and
the row's target length D (`Limits.duration`); a prompt's may come from other lengths (an infilling prompt's
segments, `data_pipeline.infill`), so they are stored per token rather than recomputed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import features as features_lib
from data_pipeline import windows as windows_lib
from data_pipeline.vocab import END, Vocab
from musenet_jax import decode_rules, draws
from musenet_jax.decode_rules import SoundingState

# Traces of `decode_window` (counted in its Python body, run only when JAX traces it): compiles are few.
TRACE_COUNTS: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def decode_window(graphdef, state, piece, feats, length, done, ended, sounding, start, prefix_len, cap_len, limits,
                  rules, tables, temperature, top_k, top_p, row_keys):
    """Writes one context window of every row (`musenet_jax.sampling` module doc). Everything but the shapes and
    the graph is traced.

    Args:
      piece: int32[B, C] each row's tokens so far (prefix, body), PAD after `length`; C = the buffer size.
      feats: {name: int32[B, C]} the features of those tokens (`features.FEATURE_NAMES`; chord clipped).
      length: int32[B] tokens of each row so far.
      done, ended: bool[B] rows that have stopped (END or the cap), and those that wrote END; stopped rows ride
        along unchanged.
      sounding: `decode_rules.SoundingState` ([B, K], [B], [B]) of each row's piece so far (all `length` tokens).
      start: int32[B] piece index of the window's first body token (P for a window that opens the body).
      prefix_len: int32[B] P, tokens of each row's conditioning prefix (piece[b, :P]).
      cap_len: int32[B] P + max_tokens, the longest each row may grow (tokens).
      limits, rules: `decode_rules.Limits` of each row ([B, U], [B]...) and `RuleTables` of the vocabulary.
      tables: (wait units int32[V], is-attack bool[V], num_parts, countdown_max, [time unit ms, countdown unit
        ms], max_chord) of the vocabulary.
      temperature, top_k, top_p, row_keys: float32[B], int32[B], float32[B] and keys[B], each row's sampling.
    Returns:
      (piece, feats, length, done, ended, sounding) updated, and what the window fed the model: tokens
      int32[B, L], features {name: int32[B, L]} and fed int32[B], the positions fed while the row was active.
    """
    TRACE_COUNTS["decode_window"] += 1
    bsz, capacity = piece.shape
    window = nnx.merge(graphdef, state).config.max_len  # L, static
    wait_units, is_attack, num_parts, countdown_max, unit_ratio, max_chord = tables
    rows = jnp.arange(bsz)
    duration = limits.duration

    def part_and_countdown(timing):
        # data_pipeline.features.part_and_countdown, in int32 JAX.
        d = jnp.maximum(duration, 1)
        part = jnp.clip(num_parts * jnp.minimum(timing, d) // d, 0, num_parts - 1)
        countdown = jnp.minimum(jnp.maximum(duration - timing, 0) * unit_ratio[0] // unit_ratio[1], countdown_max)
        return part, countdown

    def piece_index(t):
        """int32[B]: the piece index of window token t (the prefix, then the body from `start`)."""
        return jnp.where(t < prefix_len, t, start + t - prefix_len)

    def body(carry):
        t, piece, feats, length, done, ended, sounding, fed_tokens, fed_feats, fed, cache = carry
        g = jnp.minimum(piece_index(t), capacity - 1)  # a stopped row may run past its buffer: read, ignored
        tok = piece[rows, g]
        step_feats = {k: v[rows, g] for k, v in feats.items()}
        # Prefix tokens get the part and countdown of the window's first body token, as training windows do.
        for k in ("part", "countdown"):
            step_feats[k] = jnp.where(t < prefix_len, feats[k][rows, start], step_feats[k])
        fed_tokens = fed_tokens.at[:, t].set(tok)
        fed_feats = {k: v.at[:, t].set(step_feats[k]) for k, v in fed_feats.items()}
        fed = jnp.where(done, fed, t + 1)
        # Merged inside the loop body so its Variables belong to this trace level (NNX checks that).
        logits, cache = nnx.merge(graphdef, state).decode_step(tok, step_feats, t, cache, columns=limits.columns)

        # The next window token is new (sampled) when the piece does not hold it yet; its features follow
        # from this token's (what `data_pipeline.features.compute_features` gives the finished piece).
        nxt = piece_index(t + 1)
        sample = ~done & (nxt >= length)
        wait = wait_units[tok]
        nxt_timing = step_feats["timing"] + wait
        nxt_chord = jnp.where(wait > 0, 0, jnp.minimum(step_feats["chord"] + is_attack[tok].astype(jnp.int32),
                                                       max_chord - 1))

        # Constraints for the new token (see module doc). When a row samples, `tok` is its piece's last token and
        # `sounding` the state after it.
        logits = decode_rules.constrain(logits, sounding, tok, nxt_timing, limits, rules, columns)
        keys = jax.vmap(jax.random.fold_in)(row_keys, nxt)
        drawn = draws.draw(keys, logits / temperature[:, None], top_k, top_p)  # a column
        sampled = jnp.take_along_axis(limits.columns, drawn[:, None], axis=1)[:, 0]

        at = jnp.where(sample, nxt, capacity)  # rows that copy write nothing (out of bounds: dropped)
        piece = piece.at[rows, at].set(sampled, mode="drop")
        sounding = decode_rules.advance(sounding, sampled, nxt_timing, sample, rules)
        part, countdown = part_and_countdown(nxt_timing)
        new = {"timing": nxt_timing, "chord": nxt_chord, "part": part, "countdown": countdown,
               "sounding": jnp.sum(sounding.key_time >= 0, axis=-1, dtype=jnp.int32)}
        feats = {k: v.at[rows, at].set(new[k], mode="drop") for k, v in feats.items()}
        length = jnp.where(sample, length + 1, length)
        ends_now = sample & (sampled == END)
        ended = ended | ends_now
        done = done | ends_now | (length >= cap_len)
        return t + 1, piece, feats, length, done, ended, sounding, fed_tokens, fed_feats, fed, cache

    def cond(carry):
        t, done = carry[0], carry[4]
        return (t < window) & ~jnp.all(done)

    columns = decode_rules.column_tables(limits.columns, rules)  # read once per window
    fed_tokens = jnp.zeros((bsz, window), jnp.int32)
    fed_feats = {k: jnp.zeros((bsz, window), jnp.int32) for k in features_lib.FEATURE_NAMES}
    cache = nnx.merge(graphdef, state).init_cache(bsz)  # empty: positions restart at 0 in every window
    carry = (jnp.int32(0), piece, feats, length, done, ended, sounding, fed_tokens, fed_feats,
             jnp.zeros((bsz,), jnp.int32), cache)
    carry = jax.lax.while_loop(cond, body, carry)
    _, piece, feats, length, done, ended, sounding, fed_tokens, fed_feats, fed, _ = carry
    return piece, feats, length, done, ended, sounding, fed_tokens, fed_feats, fed


def next_window_start(tokens: np.ndarray, prefix_len: int, keep: int, vocab: Vocab) -> int:
    """Piece index where the next window's body starts, for a row's tokens int[T] so far: about `keep` body
    tokens before the end, moved to a time-step start as training windows are (`snap_to_step_start`, which
    looks `keep` tokens either way, so the window carries between 1 and 2 * keep tokens)."""
    body = tokens[prefix_len:]
    return prefix_len + windows_lib.snap_to_step_start(body, max(len(body) - keep, 0), keep, vocab)


@dataclasses.dataclass
class DecodedWindow:
    """What one window fed the model: its body start (piece index) int32[B], tokens int32[B, L], features
    {name: int32[B, L]} at positions 0..L-1, and fed int32[B], the positions fed while the row was active
    (the rest is meaningless); and the rows' `decode_rules.SoundingState` ([B, K], [B], [B]) after it."""

    start: np.ndarray
    tokens: np.ndarray
    features: dict
    fed: np.ndarray
    sounding: SoundingState
