"""Sampling pieces from a trained model: conditioning, constraints, length control, sliding-window decoding.

A piece is `prefix + primer + generated body (+ END)`: the prefix is `vocab.prefix(label, instruments)`,
the primer (optional) is the body of an encoded MIDI file kept verbatim, and the model writes the rest one
token at a time with its KV cache (`MuseNet.decode_step`, `musenet_jax.decoding`).

Windows. A piece may be much longer than the model's context L = max_len (tokens). It is written in windows
laid out as training windows are (`data_pipeline.windows`): window w feeds, at positions 0..L-1, the
conditioning prefix (P tokens) followed by the piece's body from token s_w on, and predicts one token past
position L-1, so a full window holds L + 1 tokens as a training sequence does. The first window starts at the
body's start (s_0 = P) when the prompt (prefix + primer) fits in it; otherwise, and whenever a window is full,
the next one carries the last K = (L - P) // 2 body tokens (half of the window's body room), its start moved
to a time-step start by `snap_to_step_start` (the rule training windows follow, so a window never opens in the
middle of a chord). The caches are emptied and re-filled with the carried tokens by the same compiled step,
then sampling continues. Snapping moves the start at most K tokens either way, so a window carries 1..2K <= L - P
tokens and writes at least one new one (about L - P - K on average): the piece grows until it ends or reaches
the cap.

Compilation. `_decode_window` (one `lax.while_loop` over the window's positions) is jitted once per
(batch, piece buffer, model) shape; a Python loop calls it per window with the window start, prompt length,
target length and sampling settings as traced values, one per row: `generate_batch` decodes requests with other
labels, instruments, lengths, primers, sampling settings and seeds as the rows of one batch (each row's windows
start where its own prefix and body put them), and pads the batch with stopped rows to a size of the caller's.
The piece buffer holds the longest prefix + the cap, rounded up to a power of two, so other lengths and nearby
caps reuse the same compiled loop. At position t the loop feeds window token t, then either copies window token
t + 1 from the piece (prefill, primer or carried tokens) or samples it and appends it to the piece. A window
stops when every row has ended or its L positions are fed.

Features. Every fed token gets the model's timing / chord / part / countdown / sounding inputs as training
gives them: body tokens carry the piece's absolute features, exactly `data_pipeline.features.compute_features(
piece, vocab, duration_units=D)` with D the target length in time units (timing accumulates wait units from the
piece start, chord counts attacks within the current time step, part and countdown come from timing and D,
sounding counts the keys the decoding state holds as sounding after the token); the primer's come from the whole
primer. Prefix tokens get timing 0, chord 0, sounding 0 and the part and countdown of the window's first body
token (`data_pipeline.windows.pack_example`; in the first window that is what `compute_features` of the whole
piece gives too). Positions restart at 0 in every window.
`decode_arrays` returns what each window fed, for checking.

Constraints, by masking logits before temperature / top-k / top-p (a masked token gets probability 0; the state
and masks live in `musenet_jax.decode_rules`). Each row carries the state of its piece so far: for every pitched
key (instrument class, pitch) whether it sounds and since which time unit, and in the current time step the key
of the last release and of the last attack. It starts as `decode_rules.sounding_state` of the prompt (prefix +
primer; the primer itself is kept verbatim, unchecked), follows every token appended, and carries across
windows. With `timing` the time of the next token, D the target length and key = instrument * 128 + pitch (drum
hits: the drums class, after every pitched instrument, and the drum note):
- tokens: the body may only hold waits, END, note-on / note-off of the chosen pitched instruments and drum hits
  if `drums` is chosen: never PAD, START, labels or instrument-presence tokens;
- order within a time step, as `data_pipeline.encoding.encode_notes` writes it (and the model was trained on):
  releases first, then attacks (note-ons and drum hits), each group in ascending key order. A note-off needs a
  key that sounds since before `timing` (a silent key has nothing to release; one attacked at `timing` would
  make a zero-length note), no attack yet in this step and a larger key than the step's last release. A
  note-on or drum hit needs a larger key than the step's last attack (one attack per key and time unit), and
  a note-on a key not released at `timing` (the encoding writes the release and re-attack of a key at one time
  as the note-on alone). A note-on of a key that sounds from an earlier time is a re-attack: the old note ends,
  a new one starts. Drums are onsets only: no state, only this order;
- rests: consecutive waits are written as the encoding writes a rest, `wait:W` tokens then at most one shorter
  wait, so no wait follows a wait shorter than `wait:W`. With the order above, the body is well-formed:
  `encode_notes(decode_tokens(body))` gives it back (from a well-formed primer), but for a closing rest, as
  the encoding ends a piece at its last event;
- target: `wait:w` is allowed only while timing + w <= D; in the ending window (below) the probability of the
  longer waits goes to `wait:(D - timing)`, a closing rest, where masking them would push it onto the note-ons
  and end the piece with a burst of notes (earlier the mask stands: the piece must go on);
- note length guard (`max_note_seconds`, M = its length in time units; 0 or None turns it off): with r = min
  over the sounding keys of (attack time + M - timing), `wait:w` is allowed only if w <= r, and when the guard
  binds (r <= D - timing) the probability of the longer waits goes to `wait:r`: the model wanted time to pass,
  it passes up to the guard. When r <= 0 (a note has sounded M units) only the releases of the notes that did
  are allowed, in key order (the lowest first), so each ends exactly at M. (A primer note already longer than
  M that the primer's last step can no longer release is released one unit later.) No note the sampler
  attacks sounds longer than M, not even one that the token cap leaves sounding;
- releases keep their mass: the probability the model gives to releasing keys that the rules forbid (mostly
  silent keys: a model unsure which note to end spreads its release over many) goes to the releases that are
  allowed, in proportion to theirs, instead of to every allowed token (the attacks and waits, which left
  notes sounding and thickened the texture);
- ending: END is allowed only from timing >= D - tolerance, with tolerance = min(`END_TOLERANCE_MS`, 10% of
  the target) so short pieces keep a window too, and only when no pitched key sounds (every note is released
  before END, as in the training data). Once timing reaches D, only the release of the lowest sounding key is
  allowed, then END. An ended piece therefore lasts between D - tolerance and D time units.
Length cap: at most `max_tokens` body tokens (primer and END included; default
`default_max_tokens(seconds)`). A piece that reaches the cap first stops without END (`ended=False`); its
notes are closed by `data_pipeline.encoding.decode_tokens`.

Infilling rows (`Request.infill`, built by `musenet_jax.infilling`): the prompt is an infilling sequence's body
(`data_pipeline.infill`: before, `hole`, context, `fill`) with its own features (each segment's; the window loop
stores part and countdown per token), and the row writes the middle in the same window: D is the span's length,
the state starts silent at time 0 after `fill`, the body may hold only the span's instruments, a key held by a
given note is not attacked before that note ends (`Limits.free_from`), and the middle ends exactly at D: END
tolerance 0, and waits cut by D land on it at any time (`Limits.exact_end`), as in a piece's ending window.

Randomness: row i draws the token at piece index j from `fold_in(fold_in(key(seed), i), j)` (i is
`Request.sample` in `generate_batch`), so the same seed and arguments give identical tokens, and a row does not
depend on how many rows, or which other requests, are decoded with it: each step reads only the logits of the
ids a row may hold, in id order (`decode_rules.Limits.columns`; the batch sets only how much padding follows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import features as features_lib
from data_pipeline import vocab as vocab_lib
from data_pipeline import windows as windows_lib
from data_pipeline.vocab import TokenKind, Vocab
from musenet_jax import decode_rules, window_loop
from musenet_jax.decode_rules import DEFAULT_MAX_NOTE_SECONDS, SoundingState, sounding_state
from musenet_jax.window_loop import DecodedWindow, next_window_start

END_TOLERANCE_MS = 1000  # END may be written in the last second (at most 10% of the target) of the piece.
# Default cap on body tokens per second of music. The encoding of real music needs far fewer: over 60 files of
# the development MIDI set the median is 31 tokens/s and the densest 86 tokens/s (MuseNet's 4096-token context
# holds about one to four minutes), so only a model that never lets time pass reaches this cap.
MAX_TOKENS_PER_SECOND = 128
MAX_TOKENS_LIMIT = 1 << 20  # a hard ceiling on max_tokens (hours of music) that bounds the piece buffer.
BODY_KINDS = (TokenKind.WAIT, TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM)


class GenerationError(ValueError):
    """Bad generation arguments; str() is a one-line user-facing message."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each token is drawn from the (masked) next-token distribution.

    Attributes:
      temperature: logits are divided by it; > 0 (lower: more conservative).
      top_k: keep only the k most likely tokens; 0 = off.
      top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability reaches p;
        1.0 = off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise GenerationError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


@dataclasses.dataclass
class GeneratedPiece:
    """One sampled piece.

    Attributes:
      tokens: int32[T], conditioning prefix + primer body + generated body (+ END if ended).
      prefix_len: conditioning prefix length (tokens).
      primer_len: primer body tokens kept verbatim after the prefix.
      ended: True if the piece ends with END; False if it reached the `max_tokens` cap (the decoder closes
        notes).
      seconds: music length of the body (sum of its waits), in seconds.
      windows: context windows the piece was written in (1 if it fits in the model's max_len).
    """

    tokens: np.ndarray
    prefix_len: int
    primer_len: int
    ended: bool
    seconds: float
    windows: int = 1


def max_seconds(model_config, vocab: Vocab) -> float:
    """The longest `seconds` this model supports (math.inf if neither horizon below applies).

    The smallest of the horizons of the feature tables (each only where its embedding is on):
    - countdown: `countdown_max * countdown_unit_ms`; past it the countdown feature saturates, so the model
      could no longer tell how far away the end is and the length would be held only by the END mask;
    - timing table: `timing_buckets * timing_bucket_units` time units; later tokens share its last row.
    The context length does not bound it: longer pieces are written in sliding windows (module doc).
    """
    cfg = vocab.config
    unit_s = cfg.time_unit_ms / 1000.0
    limits = [math.inf]
    if model_config.use_countdown:
        limits.append(cfg.countdown_max * cfg.countdown_unit_ms / 1000.0)
    if model_config.use_timing:
        limits.append(model_config.timing_buckets * model_config.timing_bucket_units * unit_s)
    return float(min(limits))


def default_max_tokens(seconds: float, model_config) -> int:
    """Default body-token cap for a piece of `seconds`: `MAX_TOKENS_PER_SECOND` per second, and never less
    than one context (max_len tokens)."""
    return int(min(max(math.ceil(seconds * MAX_TOKENS_PER_SECOND), model_config.max_len), MAX_TOKENS_LIMIT))


def end_tolerance_units(duration_units: int, vocab: Vocab) -> int:
    """Time units before the target in which END is allowed (see module doc)."""
    return int(min(END_TOLERANCE_MS // vocab.config.time_unit_ms, duration_units // 10))


def carried_tokens(max_len: int, prefix_len: int) -> int:
    """K: body tokens a new window carries over from the piece so far (before snapping to a step start)."""
    return (max_len - prefix_len) // 2


# --- Argument checking. -----------------------------------------------------------------------------------


def _instrument_indices(vocab: Vocab, instruments: Sequence[str]) -> list[int]:
    names = vocab.instruments.names
    if isinstance(instruments, str):
        instruments = [instruments]
    if not instruments:
        raise GenerationError(f"choose at least one instrument; valid: {', '.join(names)}")
    unknown = [name for name in instruments if name not in names]
    if unknown:
        raise GenerationError(f"unknown instrument(s) {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    return sorted({names.index(name) for name in instruments})


def _label(vocab: Vocab, label: str | None) -> str | None:
    if label is None:
        return None
    valid = ", ".join(vocab.config.labels) or "(none: this model has no labels)"
    try:
        name = vocab_lib.normalize_label(label)
    except ValueError:
        raise GenerationError(f"bad label {label!r}; valid: {valid}") from None
    if name not in vocab.config.labels:
        raise GenerationError(f"unknown label {label!r}; valid: {valid}")
    return name


def _check_primer(primer, vocab: Vocab, chosen: list[int] | None) -> np.ndarray:
    """The primer's ids as int32, checked: in the vocabulary, and (unless `chosen` is None) body tokens of the
    chosen instruments."""
    primer = np.asarray(primer if primer is not None else [], np.int64).reshape(-1)
    if len(primer) and (primer.min() < 0 or primer.max() >= vocab.size):
        raise GenerationError(f"primer has token ids outside the vocabulary (size {vocab.size})")
    kinds = vocab.kind[primer]
    body_kinds = BODY_KINDS + ((TokenKind.TASK,) if chosen is None else ())
    if not np.isin(kinds, body_kinds).all():
        bad = vocab.id_to_text(int(primer[~np.isin(kinds, body_kinds)][0]))
        raise GenerationError(f"primer must be body tokens only (no prefix or end), found {bad!r}")
    if chosen is None:
        return primer.astype(np.int32)
    used = set(vocab.instrument[primer[kinds != TokenKind.WAIT]].tolist())
    missing = sorted(used - set(chosen))
    if missing:
        names = ", ".join(vocab.instruments.names[i] for i in missing)
        raise GenerationError(f"the primer plays {names}, which is not among the chosen instruments")
    return primer.astype(np.int32)


@dataclasses.dataclass
class DecodeArrays:
    """Raw output of the window loop (for tests and tools): tokens int32[B, C] (PAD after each row's
    length), lengths int32[B], ended bool[B], the windows in order, the target length and the note-length
    guard M in time units (0: off), the prefix and primer lengths and the body-token cap."""

    tokens: np.ndarray
    lengths: np.ndarray
    ended: np.ndarray
    windows: list[DecodedWindow]
    duration_units: int
    max_note_units: int
    prefix_len: int
    primer_len: int
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Request:
    """One piece to sample: a row of a decode batch (`generate_batch`). The fields are `generate`'s arguments;
    `sample` is the row index its randomness is drawn with (`generate`'s row i is `sample=i`), so the same
    request gives the same tokens in any batch."""

    label: str | None
    instruments: Sequence[str]
    seconds: float
    primer: np.ndarray | None = None
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    sample: int = 0
    max_tokens: int | None = None
    max_note_seconds: float | None = DEFAULT_MAX_NOTE_SECONDS
    infill: InfillPrompt | None = None


@dataclasses.dataclass(frozen=True)
class InfillPrompt:
    """A span to write after an infilling prompt instead of a continuation (`musenet_jax.infilling` makes it with
    `data_pipeline.infill.infill_sequence`). The request's `seconds` is the span's length and its instruments those
    of the prefix (the whole piece's); its `max_tokens` must keep the prompt and the middle in one window.

    Attributes:
      body: int32[T] the prompt's body, before + hole + context + fill.
      features: the `data_pipeline.features.Features` of those tokens (each segment's, `data_pipeline.infill`).
      write: the instrument classes the middle may play.
      free_from: int32[K] per key (`decode_rules.num_keys`), the time in the span (units) from which it may be
        attacked: when a given note held across the span's start ends (0: free).
    """

    body: np.ndarray
    features: features_lib.Features
    write: tuple[int, ...]
    free_from: np.ndarray


@dataclasses.dataclass
class _Row:
    """A checked `Request`, ready for the window loop."""

    request: Request
    prefix_len: int
    primer_len: int
    prompt: np.ndarray  # int32[P + primer]
    duration: int  # D, time units
    cap: int  # body tokens
    keep: int  # K, tokens a new window carries
    first: int  # piece index of the first window's body start
    columns: np.ndarray  # int32[A] the ids the body may hold, ascending (`decode_rules.allowed_body_tokens`)
    max_note: int  # M, time units (0: off)
    feats: dict  # {name: int32[P + primer]} the prompt's features
    state: SoundingState  # the rules' state after the prompt
    tolerance: int  # END is allowed from D - tolerance on
    free_from: np.ndarray  # int32[K] `decode_rules.Limits.free_from`


def _prepare(model_config, vocab: Vocab, request: Request) -> _Row:
    """Checks one request (`generate`'s Raises) and computes what its row needs."""
    cfg, seconds, sampling = model_config, request.seconds, request.sampling
    if cfg.vocab_size != vocab.size:
        raise GenerationError(f"the model has {cfg.vocab_size} token ids but the vocabulary has {vocab.size}")
    if not isinstance(sampling, SamplingConfig):
        raise GenerationError("sampling must be a SamplingConfig")
    chosen = _instrument_indices(vocab, request.instruments)
    label = _label(vocab, request.label)
    # An infilling middle is a span of a piece: its features count from the span's start, so the piece's own length
    # is not bounded by the model's horizons (the prompt's far past saturates them, as in training on long pieces).
    limit = max_seconds(cfg, vocab) if request.infill is None else math.inf
    if not (math.isfinite(seconds) and 0 < seconds <= limit):
        raise GenerationError(f"seconds must be in (0, {limit:g}] for this model, got {seconds:g}")
    max_tokens, max_note_seconds = request.max_tokens, request.max_note_seconds
    cap = default_max_tokens(seconds, cfg) if max_tokens is None else int(max_tokens)
    if not 1 <= cap <= MAX_TOKENS_LIMIT:
        raise GenerationError(f"max_tokens (body tokens per piece, primer included) must be in "
                              f"1..{MAX_TOKENS_LIMIT}, got {max_tokens}")
    if max_note_seconds is not None and not (math.isfinite(max_note_seconds) and max_note_seconds >= 0):
        raise GenerationError(f"max_note_seconds must be >= 0 (0 or None: no limit), got {max_note_seconds:g}")
    infill = request.infill
    if infill is not None:
        if request.primer is not None:
            raise GenerationError("an infilling request has its prompt, not a primer")
        if not vocab.config.infill:
            raise GenerationError("this model's vocabulary has no infilling tokens (format v1, from before "
                                  "infilling): it can only continue a piece")
    primer = _check_primer(request.primer if infill is None else infill.body, vocab,
                           chosen if infill is None else None)
    prefix = vocab.prefix(label, chosen)
    window, p = cfg.max_len, len(prefix)
    keep = carried_tokens(window, p)
    if keep < 1:
        raise GenerationError(f"the conditioning prefix takes {p} tokens, too many for this model's {window}-token "
                              f"context; choose fewer instruments")
    if len(primer) >= cap:
        raise GenerationError(f"the primer takes {len(primer)} tokens, leaving none of the {cap}-token cap "
                              f"(max_tokens) to generate; raise max_tokens or use a shorter primer")
    duration = max(1, round(seconds * 1000.0 / vocab.config.time_unit_ms))
    primer_units = int(vocab.wait_units[primer].sum())
    if infill is None and primer_units >= duration:
        raise GenerationError(f"the primer lasts {primer_units * vocab.config.time_unit_ms / 1000:g} s, "
                              f"not less than the requested {seconds:g} s")
    prompt = np.concatenate([prefix, primer]).astype(np.int32)
    # The first window opens the body if the prompt fits (its last token is fed at position <= L - 1);
    # otherwise it carries the primer's last tokens, like any later window.
    first = p if len(prompt) <= window else next_window_start(prompt, p, keep, vocab)
    columns = np.flatnonzero(decode_rules.allowed_body_tokens(vocab, chosen if infill is None else infill.write))
    max_note = decode_rules.max_note_units(max_note_seconds, vocab)
    if infill is None:
        feats = features_lib.compute_features(prompt, vocab, duration_units=duration).as_dict()
        return _Row(request, p, len(primer), prompt, duration, cap, keep, first, columns.astype(np.int32), max_note,
                    feats, sounding_state(prompt, vocab), end_tolerance_units(duration, vocab),
                    np.zeros(decode_rules.num_keys(vocab), np.int32))
    # An infilling prompt: its features are its segments' (the prefix's are zeros: it reads the body's first part
    # and countdown), the middle starts from silence at time 0 and ends exactly at D, in this one window.
    if cap + p > window + 1:
        raise GenerationError(f"an infilling prompt and its middle must fit one {window}-token window")
    feats = {k: np.concatenate([np.zeros(p, np.int32), np.asarray(v, np.int32)])
             for k, v in infill.features.as_dict().items()}
    return _Row(request, p, len(primer), prompt, duration, cap, keep, first, columns.astype(np.int32), max_note,
                feats, sounding_state(np.zeros(0, np.int32), vocab), 0, np.asarray(infill.free_from, np.int32))


def piece_buffer(vocab: Vocab, max_tokens: int) -> int:
    """C: the piece buffer's size (tokens) for body caps up to `max_tokens`: the longest prefix + the cap, rounded
    up to a power of two, so that one compiled loop serves every label, instrument choice, length and nearby cap."""
    return 1 << (windows_lib.max_prefix_len(vocab) + max_tokens - 1).bit_length()


@dataclasses.dataclass
class Slot:
    """One row of a `Decoder` between windows: its request (checked), its piece so far and its state, on the host.

    Attributes:
      row: the checked request.
      tokens: int32[C] the piece (prefix, body; PAD after `length`); feats: {name: int32[C]} its tokens' features.
      length: tokens so far; start: piece index of the next window's first body token.
      sounding: `decode_rules.SoundingState` ([K], [], []) of the piece so far.
      done: the row has stopped (END, the cap, or stopped by its caller); ended: it wrote END.
      windows: windows in which the row was fed.
    """

    row: _Row
    tokens: np.ndarray
    feats: dict
    length: int
    start: int
    sounding: SoundingState
    done: bool = False
    ended: bool = False
    windows: int = 0


class Decoder:
    """The window loop of rows that may join and leave between windows (a server's continuous batching).

    `add` checks a request and returns its `Slot`; `window(slots, batch_size)` decodes one context window of the
    slots, padded to `batch_size` rows with stopped copies of the first (so that callers keep to a few compiled
    shapes), and moves each running slot to its next window. Rows do not depend on each other (module doc), so a
    row gives the same tokens whichever slots share its windows, and a slot may leave (`done = True`) or a new
    one join at any window boundary.

    Args:
      capacity: C, the piece buffer's size (`piece_buffer`); a request whose cap needs more is refused.
    """

    def __init__(self, model, vocab: Vocab, capacity: int):
        self.config, self.vocab, self.capacity = model.config, vocab, int(capacity)
        self.graphdef, self.state = nnx.split(model)
        vc = vocab.config
        attack = np.isin(vocab.kind, (TokenKind.NOTE_ON, TokenKind.DRUM))
        self.tables = (jnp.asarray(vocab.wait_units, jnp.int32), jnp.asarray(attack), jnp.int32(vc.num_parts),
                       jnp.int32(vc.countdown_max), jnp.asarray([vc.time_unit_ms, vc.countdown_unit_ms], jnp.int32),
                       jnp.int32(vc.max_chord))
        self.rules = decode_rules.rule_tables(vocab)

    def add(self, request: Request) -> Slot:
        """A new slot for `request` (raises `GenerationError` as `generate`)."""
        return self._slot(_prepare(self.config, self.vocab, request))

    def _slot(self, row: _Row) -> Slot:
        need = piece_buffer(self.vocab, row.cap)
        if need > self.capacity:
            raise GenerationError(f"the piece needs a buffer of {need} tokens, this decoder holds {self.capacity}")
        n = len(row.prompt)
        tokens = np.zeros(self.capacity, np.int32)
        tokens[:n] = row.prompt
        feats = {k: np.zeros(self.capacity, np.int32) for k in features_lib.FEATURE_NAMES}
        for k, values in feats.items():
            values[:n] = row.feats[k]
        if n < self.capacity:  # a window opening at the next token gives its prefix that token's part and countdown
            nxt = int(row.feats["timing"][-1]) + int(self.vocab.wait_units[row.prompt[-1]])
            part, countdown = features_lib.part_and_countdown([nxt], row.duration, self.vocab)
            feats["part"][n], feats["countdown"][n] = part[0], countdown[0]
        # Every row starts from its prompt's state; it then follows the row's piece across the windows.
        return Slot(row, tokens, feats, n, row.first, row.state)

    def seconds(self, slot: Slot) -> float:
        """Music in the slot's piece so far (primer included), in seconds."""
        units = int(self.vocab.wait_units[slot.tokens[: slot.length]].sum())
        return units * self.vocab.config.time_unit_ms / 1000.0

    def piece(self, slot: Slot) -> GeneratedPiece:
        """The slot's piece so far (its result once it has stopped)."""
        row = slot.row
        return GeneratedPiece(slot.tokens[: slot.length].copy(), row.prefix_len, row.primer_len, slot.ended,
                              self.seconds(slot), slot.windows)

    def window(self, slots: Sequence[Slot], batch_size: int) -> DecodedWindow:
        """Decodes one window of `slots` (stopped ones ride along unchanged) and returns what it fed them."""
        n = len(slots)
        if not 1 <= n <= batch_size:
            raise GenerationError(f"a window decodes 1..{batch_size} slots, got {n}")
        padded = list(slots) + [slots[0]] * (batch_size - n)
        rows = [slot.row for slot in padded]
        done = np.array([slot.done for slot in slots] + [True] * (batch_size - n))  # padding rides along stopped

        start = np.array([slot.start for slot in padded], np.int32)
        # Each row reads the logits of its own allowed ids, in id order, then PAD: its columns do not depend on
        # the other rows (only the PAD tail's length does), so neither do its tokens.
        count = decode_rules.column_count(self.vocab, max(len(r.columns) for r in rows))
        columns = np.full((batch_size, count), vocab_lib.PAD, np.int32)
        for b, r in enumerate(rows):
            columns[b, : len(r.columns)] = r.columns
        limits = decode_rules.Limits(
            jnp.asarray(columns), jnp.asarray([r.duration for r in rows], jnp.int32),
            jnp.asarray([r.tolerance for r in rows], jnp.int32), jnp.asarray([r.max_note for r in rows], jnp.int32),
            jnp.asarray(np.stack([r.free_from for r in rows])),
            jnp.asarray([r.request.infill is not None for r in rows]))
        samplings = [r.request.sampling for r in rows]
        row_keys = jnp.stack([jax.random.fold_in(jax.random.key(r.request.seed), r.request.sample) for r in rows])
        sounding = SoundingState(*(jnp.asarray(np.stack(x).astype(np.int32))
                                   for x in zip(*(slot.sounding for slot in padded), strict=True)))
        out = window_loop.decode_window(
            self.graphdef, self.state, jnp.asarray(np.stack([slot.tokens for slot in padded])),
            {k: jnp.asarray(np.stack([slot.feats[k] for slot in padded])) for k in features_lib.FEATURE_NAMES},
            jnp.asarray([slot.length for slot in padded], jnp.int32), jnp.asarray(done),
            jnp.asarray([slot.ended for slot in padded]), sounding, jnp.asarray(start),
            jnp.asarray([r.prefix_len for r in rows], jnp.int32),
            jnp.asarray([r.prefix_len + r.cap for r in rows], jnp.int32), limits, self.rules, self.tables,
            jnp.asarray([x.temperature for x in samplings], jnp.float32),
            jnp.asarray([x.top_k for x in samplings], jnp.int32),
            jnp.asarray([x.top_p for x in samplings], jnp.float32), row_keys)
        tokens, feats, length, done_out, ended, sounding, fed_tokens, fed_feats, fed = jax.device_get(out)
        for b, slot in enumerate(slots):
            if slot.done:
                continue
            slot.tokens, slot.feats = tokens[b], {k: v[b] for k, v in feats.items()}
            slot.length, slot.done, slot.ended = int(length[b]), bool(done_out[b]), bool(ended[b])
            slot.sounding = SoundingState(*(np.asarray(x[b]) for x in sounding))
            slot.windows += int(fed[b] > 0)
            if not slot.done:
                # Every window writes at least one token per running row (it carries at most 2K <= L - P of
                # them), so the cap ends a row's windows.
                slot.start = next_window_start(slot.tokens[: slot.length], slot.row.prefix_len, slot.row.keep,
                                               self.vocab)
        return DecodedWindow(start[:n], np.asarray(fed_tokens)[:n],
                             {k: np.asarray(v)[:n] for k, v in fed_feats.items()}, np.asarray(fed)[:n],
                             SoundingState(*(np.asarray(x)[:n] for x in sounding)))


def _decode_rows(model, vocab: Vocab, rows: Sequence[_Row], batch_size: int, on_window=None,
                 capacity: int | None = None) -> tuple[Decoder, list[Slot], list[DecodedWindow]]:
    """Every window of `rows`, decoded together in `batch_size` rows until all have stopped; `on_window`
    (`generate_batch`) may stop rows between windows. Returns the decoder, the slots and the windows (N rows)."""
    decoder = Decoder(model, vocab, max(capacity or 0, piece_buffer(vocab, max(r.cap for r in rows))))
    slots = [decoder._slot(row) for row in rows]
    windows = []
    while True:
        windows.append(decoder.window(slots, batch_size))
        if all(slot.done for slot in slots):
            break
        if on_window is not None:
            stop = on_window(np.array([decoder.seconds(slot) for slot in slots]),
                             np.array([slot.done for slot in slots]))
            for slot, stopped in zip(slots, np.zeros(len(slots), bool) if stop is None else stop, strict=True):
                slot.done = slot.done or bool(stopped)
            if all(slot.done for slot in slots):
                break
    return decoder, slots, windows


def decode_arrays(model, vocab: Vocab, *, label: str | None, instruments: Sequence[str], seconds: float,
                  primer: np.ndarray | None = None, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                  num_samples: int = 1, max_tokens: int | None = None,
                  max_note_seconds: float | None = DEFAULT_MAX_NOTE_SECONDS) -> DecodeArrays:
    """`generate`'s checks and window loop, returning the loop's arrays (see `generate` for the arguments)."""
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    request = Request(label, instruments, seconds, primer, sampling, seed, 0, max_tokens, max_note_seconds)
    row = _prepare(model.config, vocab, request)
    rows = [dataclasses.replace(row, request=dataclasses.replace(request, sample=i)) for i in range(num_samples)]
    _, slots, windows = _decode_rows(model, vocab, rows, num_samples)
    return DecodeArrays(np.stack([slot.tokens for slot in slots]), np.array([slot.length for slot in slots]),
                        np.array([slot.ended for slot in slots]), windows, row.duration, row.max_note,
                        row.prefix_len, row.primer_len, row.cap)


def check_request(model_config, vocab: Vocab, request: Request) -> None:
    """Raises `GenerationError` (one line) for a request `generate_batch` would refuse (for a model of this
    `ModelConfig`), decoding nothing."""
    _prepare(model_config, vocab, request)


def generate_batch(model, vocab: Vocab, requests: Sequence[Request], batch_size: int | None = None,
                   on_window=None, capacity: int | None = None) -> list[GeneratedPiece]:
    """Samples one piece per request, all decoded as one batch (each with its own label, instruments, length,
    primer, sampling and seed); each gives the tokens it gives alone (`Request.sample`).

    Args:
      requests: the pieces; checked first, so a bad one fails the call before anything is decoded.
      batch_size: rows of the compiled loop, >= len(requests) (default len(requests)); the extra rows are
        stopped padding, so that callers with varying numbers of requests can keep to a few compiled shapes.
      on_window: called between windows as on_window(seconds float64[N], done bool[N]) with each piece's music
        so far (seconds) and the rows that have stopped; it may return bool[N], rows to stop now (a cancelled
        or timed-out request: the row keeps what it wrote, `ended` False).
      capacity: the piece buffer's size at least (`piece_buffer`); a server that passes the size for its longest
        piece compiles one loop per batch size, whatever the lengths asked.
    Raises:
      GenerationError: as `generate`, for the first bad request; an empty list or a batch_size too small.
    """
    if not requests:
        raise GenerationError("no requests to decode")
    batch_size = len(requests) if batch_size is None else int(batch_size)
    if batch_size < len(requests):
        raise GenerationError(f"batch_size {batch_size} is smaller than the {len(requests)} requests")
    rows = [_prepare(model.config, vocab, r) for r in requests]
    decoder, slots, _ = _decode_rows(model, vocab, rows, batch_size, on_window, capacity)
    return [decoder.piece(slot) for slot in slots]


def generate(model, vocab: Vocab, *, label: str | None, instruments: Sequence[str], seconds: float,
             primer: np.ndarray | None = None, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             num_samples: int = 1, max_tokens: int | None = None,
             max_note_seconds: float | None = DEFAULT_MAX_NOTE_SECONDS) -> list[GeneratedPiece]:
    """Samples `num_samples` pieces, decoded as one batch, in as many context windows as they need.

    Args:
      model: a `MuseNet` (its config's max_len is the context of one window, not a bound on the piece).
      vocab: the model's vocabulary.
      label: a label of the vocabulary (normalised with `normalize_label`), or None for no label.
      instruments: instrument-class names (`vocab.instruments.names`) the piece may use.
      seconds: target music length (primer included), in (0, max_seconds(model.config, vocab)].
      primer: int32 body tokens of an encoded primer (no prefix, no END), kept verbatim after the prefix; it may
        be longer than one window.
      sampling: temperature / top-k / top-p.
      seed: the same seed and arguments give identical tokens.
      num_samples: pieces to sample.
      max_tokens: cap on each piece's body tokens, primer and END included (default:
        `default_max_tokens(seconds, model.config)`, `MAX_TOKENS_PER_SECOND` per second).
      max_note_seconds: the longest a pitched note may sound, in seconds of music (module doc: note length
        guard; rounded to time units, at least one); 0 or None: no limit.
    Returns:
      num_samples `GeneratedPiece`s.
    Raises:
      GenerationError: unknown label / instrument (listing the valid ones), seconds out of range, a negative or
        NaN max_note_seconds, a primer that fills the cap or lasts the requested length, a primer with
        instruments not chosen, a prefix that leaves no room in the model's context.
    """
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    request = Request(label, instruments, seconds, primer, sampling, seed, 0, max_tokens, max_note_seconds)
    return generate_batch(model, vocab, [dataclasses.replace(request, sample=i) for i in range(num_samples)])
