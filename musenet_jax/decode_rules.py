"""Structured decoding: the sounding-notes state of a piece and the logit masks that keep its body well-formed.

The constraint logic of `musenet_jax.sampling`, kept in its own module so that the window loop stays readable:
the sampler calls `constrain` on every step's logits and `advance` on every token it appends; its module doc
states the rules. The state of a piece so far (`SoundingState`) is:

- `key_time` int32[..., K], one entry per key (instrument class, pitch), K = `num_keys(vocab)` and key
  `instrument * 128 + pitch` (drum notes included, as their ordering key): t >= 0 while the key sounds,
  attacked at time unit t; -1 - t once it was released at time unit t (so a release in the current time step
  can be told from an older one); `NEVER` if it has not been played. Drum keys stay `NEVER`: drums are onsets.
- `last_release`, `last_attack` int32[...]: the key of the last release / attack (note-on or drum) written in
  the current time step, -1 if none (a wait starts a new step).

`sounding_state` replays tokens into this state with numpy (the sampler starts each piece from its prompt's);
`advance` is the same transition in JAX, one token per row. `constrain` decides per key ([B, K] operations),
then reads its decision per column with one gather through the columns' keys (`ColumnTables.key`) and a few
elementwise [B, U] operations; the waits' probability moves on their own [B, W] block. It reads only each
row's columns (`Limits.columns`: the ids its body may hold, a few thousand of the 21.8k for a few
instruments), so its cost, and the draw's after it, grows with what a row may play rather than with V.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.vocab import END, TokenKind, Vocab

# Default longest note, in seconds of music (`max_note_seconds` of `sampling.generate`).
DEFAULT_MAX_NOTE_SECONDS = 4.0
NEVER = -(1 << 30)  # key_time of a key that has not been played
_FAR = 1 << 30  # a room (time units) that never binds: no note sounds, or the guard is off


class SoundingState(NamedTuple):
    """Which keys sound and the order state of the current time step (module doc); numpy or JAX arrays.

    Attributes:
      key_time: int32[..., K] per key: attack time (units) if it sounds, -1 - release time if released,
        `NEVER` if never played.
      last_release: int32[...] key of the current step's last release, -1 if none.
      last_attack: int32[...] key of the current step's last attack (note-on or drum), -1 if none.
    """

    key_time: np.ndarray | jax.Array
    last_release: np.ndarray | jax.Array
    last_attack: np.ndarray | jax.Array


class RuleTables(NamedTuple):
    """Per-vocabulary lookup tables, as device arrays (`rule_tables`).

    Attributes:
      kind: int32[V] `TokenKind` of each id.
      key: int32[V] key (instrument * 128 + pitch) of each note-on, note-off and drum id; -1 for other ids.
      wait_units: int32[V] time units each wait id advances; 0 for other ids.
      wait_ids: int32[W] the ids of `wait:1` .. `wait:W`.
    """

    kind: jax.Array
    key: jax.Array
    wait_units: jax.Array
    wait_ids: jax.Array


class Limits(NamedTuple):
    """Each row's settings of the rules: traced, so other values reuse the compiled loop; one per row.

    Attributes:
      columns: int32[B, U] the ids each row's body may hold at all (`allowed_body_tokens`), ascending,
        then PAD up to U: the logits the rules and the draw read. END and every wait are always allowed, so
        END is column 0 and `wait:w` column w in every row.
      duration: int32[B] D, the target length (time units).
      tolerance: int32[B] END is allowed from D - tolerance on.
      max_note_units: int32[B] M, the longest a pitched note may sound (time units); 0 = no limit.
      free_from: int32[B, K] per key, the time (units) from which it may be attacked: 0, or when a given note
        that holds it ends (an infilling span's notes held across its start, `musenet_jax.infilling`).
      exact_end: bool[B] the row ends exactly at D (an infilling middle): from its start, a wait cut by the target
        moves its probability to the wait that lands on D, as in the ending window of a piece.
    """

    columns: jax.Array
    duration: jax.Array
    tolerance: jax.Array
    max_note_units: jax.Array
    free_from: jax.Array
    exact_end: jax.Array


class ColumnTables(NamedTuple):
    """`RuleTables` read at each row's columns ([B, U] each; `column_tables`), once per window."""

    kind: jax.Array
    key: jax.Array
    wait_units: jax.Array


def num_keys(vocab: Vocab) -> int:
    """K: keys (instrument class, pitch) of the state, drums' included."""
    return vocab.instruments.num_classes * 128


@functools.lru_cache(maxsize=8)
def key_table(vocab: Vocab) -> np.ndarray:
    """int32[V] (read-only): the key (instrument * 128 + pitch) of every note-on, note-off and drum id, -1 for
    others."""
    event = np.isin(vocab.kind, (TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM))
    table = np.where(event, vocab.instrument.astype(np.int32) * 128 + vocab.pitch, -1).astype(np.int32)
    table.setflags(write=False)
    return table


def rule_tables(vocab: Vocab) -> RuleTables:
    """The `RuleTables` of a vocabulary."""
    return RuleTables(jnp.asarray(vocab.kind, jnp.int32), jnp.asarray(key_table(vocab)),
                      jnp.asarray(vocab.wait_units, jnp.int32),
                      jnp.asarray(vocab.wait(np.arange(1, vocab.config.max_wait + 1)), jnp.int32))


def column_tables(columns: jax.Array, tables: RuleTables) -> ColumnTables:
    """The tables at int32[B, U] `Limits.columns` (PAD columns read PAD's entries: no key, no wait)."""
    return ColumnTables(*(jnp.take(table, columns) for table in (tables.kind, tables.key, tables.wait_units)))


def allowed_body_tokens(vocab: Vocab, instruments: Sequence[int]) -> np.ndarray:
    """bool[V]: tokens the generated body may hold (`musenet_jax.sampling` module doc), for instrument class
    indices: END and every wait whatever the instruments (so END and `wait:w` are the first allowed ids,
    `Limits`)."""
    chosen = np.zeros(vocab.instruments.num_classes + 1, bool)  # index -1 (no instrument) stays False
    chosen[list(instruments)] = True
    kind = vocab.kind
    notes = np.isin(kind, (TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM)) & chosen[vocab.instrument]
    allowed = notes | (kind == TokenKind.WAIT)
    allowed[END] = True
    return allowed


def column_count(vocab: Vocab, allowed: int) -> int:
    """U: the logit columns of a window whose rows may hold at most `allowed` ids each: a power of two above it
    (at least 256, the nucleus candidates of `draws`; a PAD column always remains), at most V + 1 rounded up to 256,
    so that the compiled loops stay few (4096 for one pitched instrument, 8192 for two, ...)."""
    return min(max(256, 1 << int(allowed).bit_length()), -(-(vocab.size + 1) // 256) * 256)


def max_note_units(max_note_seconds: float | None, vocab: Vocab) -> int:
    """M in time units for a `max_note_seconds` (at least 1 unit); 0 (no limit) for None or 0."""
    if not max_note_seconds:
        return 0
    return max(1, round(max_note_seconds * 1000.0 / vocab.config.time_unit_ms))


def sounding_state(tokens, vocab: Vocab) -> SoundingState:
    """The state after tokens int[T] (a body, or prefix + body; specials and conditioning tokens are skipped).

    Returns:
      `SoundingState` of numpy arrays: key_time int32[K], last_release and last_attack int32 scalars.
    """
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    kind = vocab.kind[tokens]
    waits = vocab.wait_units[tokens].astype(np.int64)
    timing = np.cumsum(waits) - waits  # the time each token sits at
    keys = key_table(vocab)[tokens]
    key_time = np.full(num_keys(vocab), NEVER, np.int32)
    pitched = np.flatnonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.NOTE_OFF))
    if len(pitched):
        # Each key's last event decides: np.unique over the events in reverse finds it (its first index there).
        backwards = pitched[::-1]
        key, first = np.unique(keys[backwards], return_index=True)
        last = backwards[first]
        key_time[key] = np.where(kind[last] == TokenKind.NOTE_ON, timing[last], -1 - timing[last])
    waited = np.flatnonzero(waits > 0)
    step = slice(int(waited[-1]) + 1 if len(waited) else 0, None)  # the tokens of the current time step
    releases = keys[step][kind[step] == TokenKind.NOTE_OFF]
    attacks = keys[step][(kind[step] == TokenKind.NOTE_ON) | (kind[step] == TokenKind.DRUM)]
    return SoundingState(key_time, np.int32(releases[-1] if len(releases) else -1),
                         np.int32(attacks[-1] if len(attacks) else -1))


def advance(state: SoundingState, token: jax.Array, timing: jax.Array, active: jax.Array,
            tables: RuleTables) -> SoundingState:
    """`sounding_state`'s transition in JAX: the state after appending int32[B] `token`, which sits at time
    int32[B] `timing` (units), in the rows where bool[B] `active`; the other rows keep theirs."""
    kind, key = tables.kind[token], tables.key[token]
    on, off = kind == TokenKind.NOTE_ON, kind == TokenKind.NOTE_OFF
    k = state.key_time.shape[-1]
    rows = jnp.arange(token.shape[0])
    at = jnp.where(active & (on | off), key, k)  # other rows and tokens write nothing (out of bounds: dropped)
    key_time = state.key_time.at[rows, at].set(jnp.where(on, timing, -1 - timing), mode="drop")
    new_step = tables.wait_units[token] > 0
    last_release = jnp.where(new_step, -1, jnp.where(off, key, state.last_release))
    last_attack = jnp.where(new_step, -1, jnp.where(on | (kind == TokenKind.DRUM), key, state.last_attack))
    return SoundingState(key_time, jnp.where(active, last_release, state.last_release),
                         jnp.where(active, last_attack, state.last_attack))


def constrain(logits: jax.Array, state: SoundingState, last_token: jax.Array, timing: jax.Array, limits: Limits,
              tables: RuleTables, columns: ColumnTables) -> jax.Array:
    """Masks (-inf) the tokens the rules forbid next, and moves the mass of cut waits (`sampling` module doc).

    Args:
      logits: float32[B, U] the model's next-token logits at each row's `limits.columns`.
      state: each row's `SoundingState` ([B, K], [B], [B]) after its piece so far.
      last_token: int32[B] the last token of each piece so far.
      timing: int32[B] the time (units) the next token sits at.
      limits: each row's `Limits`; columns: `column_tables(limits.columns, tables)`.
    Returns:
      float32[B, U] logits, -inf where masked (PAD columns always); every row keeps at least one column.
    """
    key_time = state.key_time
    k = key_time.shape[-1]
    t = timing[:, None]
    keys = jnp.arange(k, dtype=jnp.int32)[None, :]

    # Per key [B, K]. A release needs a key sounding since an earlier time (no zero-length note; also implied by
    # the order) and the step's order: no attack yet, a larger key than the last release. An attack needs a
    # larger key than the step's last attack and a key not attacked or released at this time (the encoding
    # writes a re-attack in a step as the note-on alone, so a release followed by an attack of one key is never
    # written), nor held by a given note (`Limits.free_from`).
    sounding = key_time >= 0
    releasable = (sounding & (key_time < t) & (state.last_attack < 0)[:, None]
                  & (keys > state.last_release[:, None]))
    attackable = ((keys > state.last_attack[:, None]) & (key_time != t) & (key_time != -1 - t)
                  & (t >= limits.free_from))

    # The note-length guard. `due`: notes that have sounded M units; `guard_room`: how long time may pass
    # before the next one does. Due notes are released first, in key order, so each ends exactly at M. (A
    # prompt can hold a due note that this step's order no longer lets go; that one is released after a
    # wait of one unit.)
    m = limits.max_note_units
    due = (m > 0)[:, None] & sounding & (key_time + m[:, None] <= t)
    room = jnp.min(jnp.where(sounding, key_time + m[:, None] - t, _FAR), axis=-1)
    guard_room = jnp.where(m > 0, jnp.maximum(room, 1), _FAR)
    # Forced steps: once time is up, the sounding notes are released in key order, then END; due notes are
    # released in key order before anything else. `first`: the key released now (K if none).
    ending = timing >= limits.duration
    release_due = jnp.any(due & releasable, axis=-1)
    first = jnp.min(jnp.where(releasable & (ending[:, None] | due), keys, k), axis=-1)
    forced = (ending | release_due) & (first < k)
    stop = (forced | ending)[:, None]  # no free choice
    releasable = jnp.where(forced[:, None], keys == first[:, None], releasable & ~stop)
    attackable = attackable & ~stop

    # Waits (columns 1..W, `Limits`). A run of waits is written as the encoding writes a rest: `wait:W` tokens,
    # then at most one shorter one, so no wait follows a shorter wait. A wait must fit before the target and the
    # guard (w <= room). Where the guard cuts the waits, or the target does in the ending window, the cut waits'
    # probability moves to the longest wait that fits: the model wanted time to pass, and it passes up to the
    # limit. (Masked and renormalised instead, that mass would go to the note-ons, which do not advance time: a
    # burst of notes. Before the ending window the target's cut is a plain mask: the piece must go on.)
    last_wait = tables.wait_units[last_token]
    wait = columns.wait_units
    num_waits = tables.wait_ids.shape[0]
    waits_open = ((last_wait == 0) | (last_wait == num_waits)) & ~stop[:, 0]
    target_room = limits.duration - timing
    wait_room = jnp.minimum(target_room, guard_room)[:, None]
    closing = timing >= limits.duration - limits.tolerance
    redirect = (waits_open & ((guard_room <= target_room) | closing | limits.exact_end))[:, None]
    lengths = jnp.arange(1, num_waits + 1, dtype=jnp.int32)[None, :]  # [1, W]: wait:w sits in column w
    wait_logits = logits[:, 1:num_waits + 1]
    cut = jnp.where((redirect & (lengths == wait_room)) | (lengths > wait_room), wait_logits, -jnp.inf)
    rest = jax.nn.logsumexp(cut, axis=-1, keepdims=True)  # [B, 1]: the mass of the cut waits and the longest one

    # END: in the ending window once no pitched key sounds (every note is released before END); at the target,
    # as soon as no release is left.
    end_ok = (~forced & (ending | (closing & ~jnp.any(sounding, axis=-1))))[:, None]

    # Per column [B, U]: one gather of a 2-bit code per key (bit 0: may be released, bit 1: may be attacked),
    # then elementwise. Every row keeps a column: a free step can always attack or wait one unit, a forced one
    # releases `first` or ends.
    kind = columns.kind
    code = releasable.astype(jnp.int8) | (attackable.astype(jnp.int8) << 1)
    code = jnp.take_along_axis(code, jnp.maximum(columns.key, 0), axis=1)
    attack = (kind == TokenKind.NOTE_ON) | (kind == TokenKind.DRUM)
    release = kind == TokenKind.NOTE_OFF
    need = jnp.where(release, 1, jnp.where(attack, 2, 0)).astype(jnp.int8)
    is_wait = wait > 0
    mask = ((code & need) != 0) | (is_wait & (wait <= wait_room) & waits_open[:, None])
    mask = jnp.where(jnp.arange(wait.shape[1])[None, :] == 0, end_ok, mask)  # column 0: END
    logits = jnp.where(redirect & is_wait & (wait == wait_room), rest, logits)

    # Releases keep their mass. A model that wants to release a note but cannot tell which (its note-on may be
    # long ago or outside its window) spreads that probability over many keys, most of them silent. Masked and
    # renormalised, it went to the attacks and waits, so notes were left sounding and the texture thickened
    # (the bundled quartets: polyphony at onsets 12-20 where the music has 4); it goes to the releases the
    # rules allow, in proportion to their own probability.
    may_release = mask & release & ~stop
    wanted = jax.nn.logsumexp(jnp.where(release, logits, -jnp.inf), axis=-1, keepdims=True)
    allowed = jax.nn.logsumexp(jnp.where(may_release, logits, -jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(may_release, logits + jnp.where(jnp.isfinite(allowed), wanted - allowed, 0.0), logits)
    return jnp.where(mask, logits, -jnp.inf)
