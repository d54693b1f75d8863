"""MIDI <-> notes <-> tokens: the MuseNet encoding, vectorised with numpy.

Encoding a file runs these steps, all deterministic:

1. Read (`midi_io.read_midi`): notes in ticks, the tempo map, sustain-pedal events. Then note-offs
   (`_release_at_note_offs`, before the pedal of step 3, whose holds are not note-offs): within one voice
   (the readers' note group: one track's channel; symusic also splits a channel at program changes) a
   note-off releases its key, as a synthesizer and pretty_midi play it: a note sounds from its attack
   until the next attack of the same key or the first note-off of that key after its attack, whichever
   comes first. So an unmatched note-on holds its key only until the key is next attacked or released,
   not for the rest of the piece, and nested notes on one key (on A, on B, off, off) end at the first
   note-off. A note-off at a note's own attack time makes it a zero-length note, unless it releases a
   note that was sounding before (the usual off-then-on of repeated notes). The rule reads only the
   attack and note-off times of each key, not which note-off a reader paired with which note-on. A voice
   whose notes on each key do not overlap (a well-formed file) keeps its notes as they are. (Both
   readers pair first in, first out and drop a note-on still open at the end of its track: a key's last
   attack, when the key had an unmatched note-on.)
2. Time: ticks -> seconds through every tempo change -> time units (`time_unit_ms`, rounded to the
   nearest unit, halves up).
3. Sustain (`sustain='extend'`, the default): while a track's pedal (CC64) is >= 64, a note that is
   released is held until the pedal is lifted. `sustain='ignore'` drops pedal information.
4. Instruments: each note's GM program maps to its class (`instruments.py`); channel 10 is drums.
   Pitched notes outside `pitch_min..pitch_max` are dropped and counted.
5. One voice per key: for each (instrument class, pitch) the key sounds while any note on it sounds.
   After step 1 a key's notes overlap only across voices (tracks or channels of one class, e.g. two
   violins in unison), under the pedal, or within a unit. Every note-on (re-)attacks the key; the sounding
   note then lasts until the next attack of the same key or until the key falls silent. So overlapping
   same-pitch notes become consecutive notes (as a piano re-strikes a key), and several attacks within
   one unit keep the loudest. Notes shorter than one unit (zero-length notes included) last one unit.
   This canonical form does not depend on how a parser pairs note-offs with overlapping note-ons, so
   both readers agree.
6. Tokens: at each time, releases first, then attacks (pitched and drums), each group sorted by
   (instrument, pitch); `wait:N` tokens advance time between event times (several for long rests).
   A release is written only when the key is not re-attacked at that same time, because a note-on on
   a sounding key ends the sounding note. Drums are onsets only. The body is preceded by the
   conditioning prefix and followed by `end`.

Decoding inverts step 6 exactly (`encode_notes(decode_tokens(t)) == t` for any encoded `t`); drum hits
get `drum_duration_units` (shortened if the same drum is hit again sooner).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from data_pipeline import midi_io
from data_pipeline.vocab import END, TokenKind, Vocab

# Sort and grouping keys pack (instrument, pitch) into one int; times get the bits above.
_KEY_SHIFT = 40


@dataclasses.dataclass
class Notes:
    """Notes in time units, one row each (N). For drums `end` is only the written length.

    Attributes:
      instrument: int32[N] class index (the drums index for drum hits).
      pitch: int32[N] MIDI pitch (drum note for drums).
      velocity: int32[N] 1..127.
      start, end: int64[N] time units; end > start.
    """

    instrument: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def sorted(self) -> Notes:
        return self.take(np.lexsort((self.velocity, self.end, self.pitch, self.instrument, self.start)))

    def take(self, rows: np.ndarray) -> Notes:
        """The notes at `rows`: an index array or a bool[N] mask."""
        return Notes(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def concat(self, other: Notes) -> Notes:
        return Notes(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                       for f in dataclasses.fields(self)))

    @classmethod
    def empty(cls) -> Notes:
        i32, i64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
        return cls(i32, i32.copy(), i32.copy(), i64, i64.copy())


@dataclasses.dataclass
class Stats:
    """What encoding kept and dropped, per piece."""

    notes_in: int = 0
    notes_out: int = 0
    dropped_pitch_range: int = 0
    merged_attacks: int = 0  # several attacks of one key within one time unit
    released_early: int = 0  # pitched notes ended before their own note-off by another attack or note-off (step 1)


@dataclasses.dataclass
class EncodedPiece:
    """A tokenised piece.

    Attributes:
      tokens: int32[T] `[label] instruments.. start body.. end`.
      prefix_len: tokens before the body (label, instruments and `start`).
      duration_units: length of the piece in time units (time of the last event).
      instruments: instrument class indices that play, ascending.
      num_notes: notes (attacks) in the body.
      stats: what was dropped on the way.
    """

    tokens: np.ndarray
    prefix_len: int
    duration_units: int
    instruments: tuple[int, ...]
    num_notes: int
    stats: Stats

    @property
    def body(self) -> np.ndarray:
        """Tokens after `start`, up to and including `end`."""
        return self.tokens[self.prefix_len:]


# -- MIDI -> notes ---------------------------------------------------------------------------------
def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)


def _release_at_note_offs(voice: np.ndarray, pitch: np.ndarray, start: np.ndarray,
                          end: np.ndarray) -> np.ndarray:
    """Step 1's note-off rule: int64[N] note ends (ticks) where a note-off releases its key.

    Args:
      voice: int[N] the note's voice (`RawScore.track`: the reader's note group, one track's channel;
        symusic also splits a channel at program changes); the rule applies within a (voice, pitch) key.
      pitch: int[N] MIDI pitch 0..127.
      start, end: int64[N] attack and note-off ticks, end >= start, however the reader paired them.

    Returns:
      int64[N], in the input's order: each note ends at the earlier of the key's next attack (after its
      own) and the key's first note-off after its attack; or at its attack (zero length) when more
      note-offs fall at its attack time than notes were sounding just before it. Only the multisets of
      attack and note-off times of a key enter, so any pairing of note-offs with note-ons gives the same
      ends (for notes attacked at one time, the same end each).
    """
    n = len(start)
    if n < 2:
        return end
    # (key, tick) packed into one int64 code per attack and per note-off: keys in the high bits, ticks
    # below `shift`. Voices are int32, so keys < 2^38; readers give ticks < 2^32, mostly < 2^24.
    shift = (int(end.max()) + 1).bit_length()
    key = voice.astype(np.int64) * 128 + pitch
    if shift > 24 and int(key.max()).bit_length() + shift > 62:
        # Only the order of ticks matters: rank them (ranks < 2N fit) and map the ends back.
        ticks, rank = np.unique(np.concatenate([start, end]), return_inverse=True)
        return ticks[_release_at_note_offs(voice, pitch, rank[:n], rank[n:])]
    key <<= shift
    attack = key | start
    # Well-formed voices (nearly every file) have no overlapping notes on a key: then every note ends
    # where it says. A zero-length note reaches one tick, so that two attacks at one tick count as
    # overlapping (the rule decides which note-off ends them). Sorted attack codes and sorted reach codes
    # interleave (a1 < r1 <= a2 < r2 ...; codes of different keys never mix) exactly when each key's
    # notes lie end to end, and then they pair in that one way only: the reader's pairing. Two plain
    # sorts, no argsort: this is the hot path.
    reach = np.sort(key | np.maximum(end, start + 1))
    if (np.sort(attack)[1:] >= reach[:-1]).all():
        return end
    # The attacks in code order, with the notes they belong to. Ties are notes of one key attacked at
    # one tick, which get one end.
    index_bits = (n - 1).bit_length()
    if int(attack.max()).bit_length() + index_bits <= 63:
        # A sort of the codes with each note's index in the low bits: several times faster than argsort.
        packed = np.sort((attack << index_bits) | np.arange(n))
        order, attack = packed & ((1 << index_bits) - 1), packed >> index_bits
    else:
        order = np.argsort(attack)
        attack = attack[order]
    releases = np.sort(key | end)
    # Counted over all codes up to a note's attack: note-offs at or before it, and attacks before it.
    # Earlier keys add one of each per note, so the difference is the key's note-offs at the attack time
    # minus its notes sounding just before: more note-offs than that release a note attacked here, here.
    first_after = np.searchsorted(releases, attack, side="right")
    tie = attack[1:] == attack[:-1]
    if tie.any():
        # Runs of equal codes: the attacks before a run (its first index) and the index after it, by
        # running extrema over the sorted codes (linear, where binary searches would be n log n).
        index = np.arange(n)
        attacks_before = np.maximum.accumulate(np.where(np.concatenate([[True], ~tie]), index, 0))
        run_end = np.minimum.accumulate(np.where(np.concatenate([~tie, [True]]), index, n)[::-1])[::-1]
        next_attack_code = np.append(attack, np.iinfo(np.int64).max)[run_end + 1]
    else:
        attacks_before = np.arange(n)
        next_attack_code = np.append(attack[1:], np.iinfo(np.int64).max)
    zero_length = first_after > attacks_before
    # Not zero length: a note-off after the attack exists in the same key (its own), and the key's codes
    # are below every later key's, so plain minima of codes stay within the key.
    release_code = releases[np.minimum(first_after, n - 1)]
    new_end = np.where(zero_length, attack, np.minimum(next_attack_code, release_code))
    out = np.empty_like(end)
    out[order] = new_end & ((1 << shift) - 1)
    return out


def _apply_sustain(score: midi_io.RawScore, end_ticks: np.ndarray) -> np.ndarray:
    """Holds each note released while its track's pedal is down until the pedal lifts (ticks)."""
    if len(score.pedal_tick) == 0:
        return end_ticks
    end_ticks = end_ticks.copy()
    for track in np.unique(score.pedal_track):
        sel = score.pedal_track == track
        order = np.argsort(score.pedal_tick[sel], kind="stable")
        ticks, down = score.pedal_tick[sel][order], score.pedal_value[sel][order] >= 64
        # Collapse repeated values: keep only changes of state (the first event at each state).
        change = np.concatenate([[down[0]], down[1:] != down[:-1]])
        ticks, down = ticks[change], down[change]
        if not down.any():
            continue
        presses = ticks[down]
        # A release follows each press; a press never released holds until the end of the file.
        releases = np.append(ticks[~down], np.iinfo(np.int64).max)
        releases = releases[np.searchsorted(ticks[~down], presses, side="right")]
        notes = np.nonzero(score.track == track)[0]
        if len(notes) == 0:
            continue
        # The press in effect at each note-off (the last press at or before it).
        k = np.searchsorted(presses, end_ticks[notes], side="right") - 1
        held = (k >= 0) & (end_ticks[notes] < releases[np.maximum(k, 0)])
        release = releases[np.maximum(k, 0)]
        last_tick = max(int(score.end.max()), int(ticks.max()))
        release = np.minimum(release, last_tick)
        end_ticks[notes[held]] = np.maximum(end_ticks[notes[held]], release[held])
    return end_ticks


def score_to_notes(score: midi_io.RawScore, vocab: Vocab) -> tuple[Notes, Stats]:
    """Steps 1 (note-offs) to 5 of the module docstring: a `RawScore` -> canonical `Notes` (sorted by start)."""
    cfg = vocab.config
    stats = Stats(notes_in=score.num_notes)
    # Note-offs before the pedal: a pedal-held release is not a note-off, and a key re-struck under the
    # pedal is held by its new note-on until that note's own note-off. Drum hits keep their ends (step 5
    # gives them a fixed length), and skipping them keeps drum tracks off the rule's slow path.
    drum = score.is_drum
    if not drum.any():
        end_ticks = _release_at_note_offs(score.track, score.pitch, score.start, score.end)
    else:
        pitched = ~drum
        end_ticks = score.end.copy()
        end_ticks[pitched] = _release_at_note_offs(score.track[pitched], score.pitch[pitched],
                                                   score.start[pitched], score.end[pitched])
    if end_ticks is not score.end:
        stats.released_early = int(np.count_nonzero(end_ticks < score.end))
    if cfg.sustain != "ignore":
        end_ticks = _apply_sustain(score, end_ticks)
    units_per_second = 1000.0 / cfg.time_unit_ms
    n = score.num_notes
    both = _round_half_up(midi_io.ticks_to_seconds(np.concatenate([score.start, end_ticks]), score)
                          * units_per_second)
    start, end = both[:n], both[n:]

    # take(mode="clip") clips out-of-range programs to 0..127 as np.clip would, in one call.
    instrument = np.where(score.is_drum, vocab.drums_index,
                          vocab.instruments.program_class.take(score.program, mode="clip"))
    pitch, velocity = score.pitch, score.velocity
    keep = (velocity > 0) & (pitch >= 0) & (pitch <= 127)
    if cfg.pitch_min > 0 or cfg.pitch_max < 127:  # drums keep their whole 0..127 range
        keep &= (pitch >= cfg.pitch_min) & (pitch <= cfg.pitch_max) | score.is_drum
    kept = int(np.count_nonzero(keep))
    stats.dropped_pitch_range = n - kept
    columns = (instrument, pitch, velocity, start, end)
    if kept < n:  # most files drop nothing: skip five gathers
        columns = tuple(c[keep] for c in columns)
    instrument, pitch, velocity, start, end = columns
    notes = canonical_notes(Notes(instrument.astype(np.int32, copy=False), pitch.astype(np.int32, copy=False),
                                  velocity.astype(np.int32, copy=False), start, end), vocab)
    stats.merged_attacks = kept - len(notes)
    stats.notes_out = len(notes)
    return notes, stats


def canonical_notes(notes: Notes, vocab: Vocab) -> Notes:
    """Step 5: one voice per key (see module docstring). Input times in units; output sorted by
    (start, instrument, pitch)."""
    if len(notes) == 0:
        return Notes.empty()
    key = notes.instrument.astype(np.int64) * 128 + notes.pitch
    start = notes.start
    end = np.maximum(notes.end, start + 1)
    # Sort by key, then start, then loudest first, so that the first attack of a run is the loudest;
    # all three packed into one int64 (key < 2^15, start < 2^40 units, 7 bits of velocity).
    order = np.argsort((key << 47) | (start << 7) | (127 - notes.velocity), kind="stable")
    key, start, end, velocity = key[order], start[order], end[order], notes.velocity[order]
    same_key_prev = key[1:] == key[:-1]

    # A key sounds while any of its notes sounds: running max of `end` within each key, reset per
    # key by offsetting with the key (keys ascend, so the offset running max never crosses keys).
    offset = key << _KEY_SHIFT
    reach = np.maximum.accumulate(end + offset) - offset
    new_component = np.empty(len(key), bool)
    new_component[0] = True
    new_component[1:] = ~same_key_prev | (start[1:] >= reach[:-1])
    comp_id = new_component.cumsum() - 1
    # `reach` only grows along a run, so its maximum is the run's end.
    comp_end = np.maximum.reduceat(reach, new_component.nonzero()[0])

    # Several attacks of one key in one unit: keep the first (loudest).
    attack = np.empty(len(key), bool)
    attack[0] = True
    attack[1:] = ~same_key_prev | (start[1:] != start[:-1])
    if not attack.all():
        key, start, velocity, comp_id = key[attack], start[attack], velocity[attack], comp_id[attack]
    next_start = np.empty_like(start)
    next_start[:-1], next_start[-1] = start[1:], 0
    same_comp_next = np.zeros(len(key), bool)
    same_comp_next[:-1] = comp_id[1:] == comp_id[:-1]
    end = np.where(same_comp_next, next_start, comp_end[comp_id])
    drums = key >= vocab.drums_index * 128
    if drums.any():
        # Drum hits sound for a fixed length, cut short by the next hit of the same drum.
        same_key_next = np.zeros(len(key), bool)
        same_key_next[:-1] = key[1:] == key[:-1]
        drum_end = start + vocab.config.drum_duration_units
        drum_end = np.where(same_key_next, np.minimum(drum_end, next_start), drum_end)
        end = np.where(drums, drum_end, end)
    order = np.argsort((start << 15) | key, kind="stable")
    key = key[order]
    return Notes((key >> 7).astype(np.int32), (key & 127).astype(np.int32),
                 velocity[order].astype(np.int32), start[order], end[order])


# -- notes -> tokens -------------------------------------------------------------------------------
def encode_notes(notes: Notes, vocab: Vocab, label: str | None = None,
                 canonical: bool = False) -> EncodedPiece:
    """Step 6: `Notes` -> tokens with the conditioning prefix and `end`.

    Args:
      notes: notes in time units; made canonical first unless `canonical` says they already are
        (the output of `canonical_notes` or `score_to_notes`).
    """
    if not canonical:
        notes = canonical_notes(notes, vocab)
    n = len(notes)
    present = np.zeros(vocab.instruments.num_classes, bool)
    present[notes.instrument] = True
    instruments = tuple(np.flatnonzero(present).tolist())
    prefix = vocab.prefix(label, instruments)
    if n == 0:
        return EncodedPiece(tokens=np.append(prefix, np.int32(END)), prefix_len=len(prefix),
                            duration_units=0, instruments=instruments, num_notes=0, stats=Stats())
    body, duration = notes_to_body(notes, vocab)
    tokens = np.concatenate([prefix, body, [END]]).astype(np.int32)
    return EncodedPiece(tokens=tokens, prefix_len=len(prefix), duration_units=duration,
                        instruments=instruments, num_notes=n, stats=Stats(notes_out=n))


def notes_to_body(notes: Notes, vocab: Vocab, *, bins: np.ndarray | None = None, origin: int = 0,
                  horizon: int | None = None) -> tuple[np.ndarray, int]:
    """Canonical notes -> body tokens (events and waits, no prefix, no `end`) and the last event's time.

    Events in the encoder's order: by time, releases before attacks, each group by (instrument, pitch); a
    pitched note's release is written only when its key is not re-attacked at that time. Each time step's
    waits go right before its first event (`wait:max_wait` tokens, then the rest).

    Args:
      notes: canonical notes (`canonical_notes`), times in units.
      bins: int[n] the notes' velocity bins; default: binned from `notes.velocity` (MIDI velocities).
      origin, horizon: write only the events at times origin <= t < horizon (default: all), with waits
        counted from `origin` (a crop of a piece, whose notes before `origin` only end inside it); the
        returned time is relative to `origin` too.
    """
    key = notes.instrument.astype(np.int64) * 128 + notes.pitch
    start, end = notes.start.astype(np.int64, copy=False), notes.end.astype(np.int64, copy=False)
    n = len(notes)
    if n == 0:
        return np.zeros(0, np.int32), 0
    bins = vocab.velocity_bin(notes.velocity) if bins is None else np.asarray(bins, np.int64)

    # Releases: pitched notes whose key is not re-attacked exactly at their end time. Canonical notes
    # are sorted by (start, key), one attack per (start, key), so a binary search for each note's
    # (end, key) among the attacks' (start, key) finds the re-attacks.
    attack_at = (start << 15) | key
    release_at = (end << 15) | key
    reattacked = attack_at[np.minimum(np.searchsorted(attack_at, release_at), n - 1)] == release_at
    released = ~reattacked & (notes.instrument != vocab.drums_index)

    # Every event as one int64 code, (time, event index) with the index of `vocab.event_ids` in the
    # low bits: releases (phase 0) sort before attacks (phase 1), each group by (instrument, pitch).
    # The codes are unique, so a plain sort orders the events and the table gives their ids.
    num_keys, num_bins = vocab.instruments.num_classes * 128, vocab.config.velocity_bins
    bits = (2 * num_keys * num_bins - 1).bit_length()
    attacks = (start << bits) | ((num_keys + key) * num_bins + bins)
    releases = (end[released] << bits) | (key[released] * num_bins)
    events = np.sort(np.concatenate([releases, attacks]))
    times = events >> bits
    if origin or horizon is not None:
        keep = (times >= origin) & (times < (np.iinfo(np.int64).max if horizon is None else horizon))
        events, times = events[keep], times[keep]
    ids = vocab.event_ids[events & ((1 << bits) - 1)]
    return _interleave_waits(times - origin, ids, vocab.config.max_wait, vocab)


def _interleave_waits(times: np.ndarray, ids: np.ndarray, max_wait: int, vocab: Vocab):
    """Sorted event times and ids -> body tokens with `wait:N` before each new time."""
    n = len(times)
    if n == 0:
        return np.zeros(0, np.int32), 0
    # A step (the events at one time) follows its gap in ceil(gap / max_wait) waits: `wait:max_wait`
    # tokens but the last, `wait:((gap - 1) % max_wait + 1)`. Only a first step at time 0 has none.
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(times[1:], times[:-1], out=first[1:])
    first_event = first.nonzero()[0]
    step_time = times[first_event]
    gaps = step_time.copy()
    gaps[1:] -= step_time[:-1]
    # Each event moves right by the waits written up to and including its step.
    shift = np.zeros(n, np.int64)
    shift[first_event] = -(-gaps // max_wait)
    position = np.arange(n) + shift.cumsum()
    out = np.full(int(position[-1]) + 1, vocab.wait_base + max_wait - 1, np.int32)  # `wait:max_wait`
    out[position] = ids
    waited = 1 if gaps[0] == 0 else 0
    out[position[first_event[waited:]] - 1] = vocab.wait_base + (gaps[waited:] - 1) % max_wait
    return out, int(step_time[-1])


def crop_notes(tokens: np.ndarray, rel: np.ndarray, sentinel: int, vocab: Vocab) -> Notes:
    """Body tokens of a crop with their (stretched, relative >= 1) times -> notes.

    A pitched note lasts from its note-on to the next event of its key; a key whose first event in
    the crop is a release gets a note from time 0 (before the crop); a note with no later event in
    the crop ends at `sentinel`. Velocities are bins.
    """
    kind = vocab.kind[tokens]
    inst, pitch, vbin = vocab.instrument[tokens], vocab.pitch[tokens], vocab.velocity_bin_of[tokens]
    pos = np.flatnonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.NOTE_OFF))
    key = inst[pos].astype(np.int64) * 128 + pitch[pos]
    order = np.argsort(key, kind="stable")  # by key, then position (= time)
    pos, key = pos[order], key[order]
    is_on = kind[pos] == TokenKind.NOTE_ON
    same_next = np.zeros(len(pos), bool)
    same_next[:-1] = key[1:] == key[:-1]
    first_of_key = np.ones(len(pos), bool)
    first_of_key[1:] = ~same_next[:-1]
    next_time = np.full(len(pos), sentinel, np.int64)
    next_time[:-1] = np.where(same_next[:-1], rel[pos[1:]], sentinel)
    lead_off = ~is_on & first_of_key
    drums = np.flatnonzero(kind == TokenKind.DRUM)
    rows = np.concatenate([pos[is_on], pos[lead_off], drums])
    start = np.concatenate([rel[pos[is_on]], np.zeros(int(lead_off.sum()), np.int64), rel[drums]])
    end = np.concatenate([next_time[is_on], rel[pos[lead_off]], rel[drums] + 1])
    return Notes(inst[rows].astype(np.int32), pitch[rows].astype(np.int32),
                          np.maximum(vbin[rows], 0).astype(np.int32), start, end)


def held_notes(body: np.ndarray, start: int, tokens: np.ndarray, rel: np.ndarray, sentinel: int,
                vocab: Vocab) -> Notes:
    """Pitched notes sounding at body position `start` that `_crop_notes` cannot see in the crop `tokens`.

    A key sounds at `start` when its last event before it is an attack. Its note reaches into the crop
    from time 0 and ends at the key's first event in the crop, a re-attack (rel time), or after the crop
    (`sentinel`) when the crop has none; keys whose first event in the crop is a release are `crop_notes`'
    lead notes already. Folding can move another note onto such a key: without these notes the crop would
    resolve that collision differently from the whole piece.
    """
    def key_events(ids):
        """(positions of note-ons / -offs in `ids`, their keys instrument * 128 + pitch)."""
        kind = vocab.kind[ids]
        pos = np.flatnonzero((kind == TokenKind.NOTE_ON) | (kind == TokenKind.NOTE_OFF))
        return pos, vocab.instrument[ids[pos]].astype(np.int64) * 128 + vocab.pitch[ids[pos]]

    pos, key = key_events(body[:start])
    held_key, last = np.unique(key[::-1], return_index=True)  # each key's last event before `start`
    held = pos[::-1][last]
    attack = vocab.kind[body[held]] == TokenKind.NOTE_ON
    held, held_key = held[attack], held_key[attack]
    if len(held) == 0:
        return Notes.empty()
    crop_pos, crop_key = key_events(tokens)
    crop_kind = vocab.kind[tokens]
    order = np.argsort(crop_key, kind="stable")  # by key, then position: the first event of each key first
    crop_key, crop_pos = crop_key[order], crop_pos[order]
    i = np.minimum(np.searchsorted(crop_key, held_key), max(len(crop_key) - 1, 0))
    found = (crop_key[i] == held_key) if len(crop_key) else np.zeros(len(held), bool)
    first = crop_pos[i] if len(crop_key) else np.zeros(len(held), np.int64)
    keep = ~(found & (crop_kind[first] == TokenKind.NOTE_OFF))
    end = np.where(found, rel[first], sentinel)[keep]
    held = held[keep]
    return Notes(vocab.instrument[body[held]].astype(np.int32), vocab.pitch[body[held]].astype(np.int32),
                          np.maximum(vocab.velocity_bin_of[body[held]], 0).astype(np.int32),
                          np.zeros(len(held), np.int64), end.astype(np.int64))


# -- tokens -> notes -------------------------------------------------------------------------------
def decode_tokens(tokens, vocab: Vocab) -> tuple[Notes, int]:
    """Tokens (any sequence, with or without prefix) -> (`Notes`, duration in units).

    Reads up to the first `end`. Tolerant of sequences a model writes: a release of a silent key is
    ignored, an attack on a sounding key re-attacks it, notes still sounding at the end are released
    there (lasting at least one unit).
    """
    tokens = np.asarray(tokens, np.int64)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab.size):
        bad = tokens[(tokens < 0) | (tokens >= vocab.size)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab.size})")
    ends = np.nonzero(tokens == END)[0]
    if len(ends):
        tokens = tokens[: ends[0]]
    kinds = vocab.kind[tokens].tolist()
    inst, pitch = vocab.instrument[tokens].tolist(), vocab.pitch[tokens].tolist()
    vbin, waits = vocab.velocity_bin_of[tokens].tolist(), vocab.wait_units[tokens].tolist()
    velocity_of_bin = vocab.bin_velocity(np.arange(vocab.config.velocity_bins)).tolist()
    sounding: dict[tuple[int, int], tuple[int, int]] = {}
    rows: list[tuple[int, int, int, int, int]] = []
    drums: list[tuple[int, int, int]] = []
    t = 0
    for kind, i, p, b, w in zip(kinds, inst, pitch, vbin, waits):
        if kind == TokenKind.WAIT:
            t += w
        elif kind == TokenKind.NOTE_ON:
            held = sounding.get((i, p))
            if held is not None and held[0] < t:
                rows.append((i, p, held[1], held[0], t))
            sounding[(i, p)] = (t, velocity_of_bin[b])
        elif kind == TokenKind.NOTE_OFF:
            held = sounding.pop((i, p), None)
            if held is not None and held[0] < t:
                rows.append((i, p, held[1], held[0], t))
        elif kind == TokenKind.DRUM:
            drums.append((p, velocity_of_bin[b], t))
    for (i, p), (s, v) in sounding.items():
        rows.append((i, p, v, s, max(t, s + 1)))
    for p, v, s in drums:
        rows.append((vocab.drums_index, p, v, s, s + vocab.config.drum_duration_units))
    if not rows:
        return Notes.empty(), t
    arr = np.array(rows, np.int64)
    notes = Notes(arr[:, 0].astype(np.int32), arr[:, 1].astype(np.int32), arr[:, 2].astype(np.int32),
                  arr[:, 3], arr[:, 4])
    return canonical_notes(notes, vocab), t


# -- files ------------------------------------------------------------------------------------------
def encode_midi(source, vocab: Vocab, label: str | None = None, reader: str = "symusic",
                path=None) -> EncodedPiece:
    """MIDI bytes or path -> `EncodedPiece`; raises `midi_io.MidiError` for unusable files."""
    if path is None and isinstance(source, (str, os.PathLike)):
        path = source
    score = midi_io.read_midi(source, reader=reader, path=path)
    if score.num_notes == 0:
        raise midi_io.MidiError(path, "no notes")
    notes, stats = score_to_notes(score, vocab)
    if len(notes) == 0:
        raise midi_io.MidiError(path, f"no notes in this vocabulary's range "
                                      f"({stats.dropped_pitch_range} dropped)")
    piece = encode_notes(notes, vocab, label, canonical=True)
    piece.stats = stats
    return piece


def notes_to_midi(notes: Notes, vocab: Vocab, path: str | os.PathLike, duration_units: int | None = None) -> None:
    """Writes `Notes` as a format-1 MIDI file: one track per instrument class, drums on channel 10; with
    `duration_units`, the file lasts that long even when it ends in silence."""
    unit_ms = vocab.config.time_unit_ms
    tracks = []
    for i in np.unique(notes.instrument):
        sel = notes.instrument == i
        is_drum = int(i) == vocab.drums_index
        tracks.append(dict(name=vocab.instruments.names[i], program=vocab.instruments.class_program[i],
                           is_drum=is_drum, start_ms=notes.start[sel] * unit_ms,
                           end_ms=notes.end[sel] * unit_ms, pitch=notes.pitch[sel],
                           velocity=notes.velocity[sel]))
    midi_io.write_midi(path, tracks, None if duration_units is None else duration_units * unit_ms)


def tokens_to_midi(tokens, vocab: Vocab, path: str | os.PathLike) -> Notes:
    """Decodes tokens and writes them as MIDI lasting as long as their waits (a closing rest included)."""
    notes, duration = decode_tokens(tokens, vocab)
    notes_to_midi(notes, vocab, path, duration_units=duration)
    return notes


def opening_body(source, vocab: Vocab, seconds: float | None, instruments: list[str],
                 names: tuple[str, str] = ("primer_seconds", "instruments")) -> tuple[np.ndarray, Notes, int]:
    """The body tokens of the first `seconds` (all if None) of MIDI bytes or a path (a primer, an opening), with
    its notes and length in time units.

    Cut at time unit C = round(seconds / time unit): notes starting at or after C are dropped, notes sounding
    at C end there (decode -> clip -> re-encode, so every kept note has its attack and release), and waits
    are appended so that the body lasts C units when the piece is longer than that.

    Args:
      instruments: instrument-class names the piece may play.
      names: how the messages name the seconds and instruments settings.
    Returns:
      (int32[T] body tokens (no prefix, no `end`), the kept Notes, the body's length in time units).
    Raises:
      midi_io.MidiError for unreadable MIDI (naming the path, if any), ValueError for instruments not in
      `instruments`.
    """
    path = source if isinstance(source, (str, os.PathLike)) else None
    piece = encode_midi(source, vocab)  # MidiError: "path: reason"
    notes, duration = decode_tokens(piece.body, vocab)
    if seconds is not None:
        cut = max(1, round(seconds * 1000 / vocab.config.time_unit_ms))
        keep = notes.start < cut
        notes = Notes(notes.instrument[keep], notes.pitch[keep], notes.velocity[keep], notes.start[keep],
                      np.minimum(notes.end[keep], cut))
        if len(notes) == 0:
            raise midi_io.MidiError(path, f"no notes in the first {seconds:g} s ({names[0]})")
        duration = min(duration, cut)
    known = vocab.instruments.names
    extra = sorted(set(np.unique(notes.instrument).tolist()) - {known.index(n) for n in instruments})
    if extra:
        where = f"{path}: the primer" if path is not None else "the primer"
        raise ValueError(f"{where} plays {', '.join(known[i] for i in extra)}, not in {names[1]} "
                         f"({','.join(instruments)}); add them or choose another primer")
    reencoded = encode_notes(notes, vocab)
    body = reencoded.tokens[reencoded.prefix_len:-1]  # without the prefix and `end`
    rest = duration - reencoded.duration_units
    if rest > 0:  # the cut falls in a rest: keep the silence up to it
        max_wait = vocab.config.max_wait
        waits = [max_wait] * (rest // max_wait) + ([rest % max_wait] if rest % max_wait else [])
        body = np.concatenate([body, vocab.wait(np.array(waits))])
    return body.astype(np.int32), notes, max(duration, reencoded.duration_units)
