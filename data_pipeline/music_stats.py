"""Objective statistics of pieces of music, per piece and pooled, to compare generated pieces with real ones.

    stats = music_stats.piece_stats(notes, vocab, duration_units)      # notes: `encoding.Notes` in time units
    pooled = music_stats.pooled_stats([(notes, duration_units), ...], vocab)
    ranges = music_stats.percentile_ranges([stats, ...])               # {"p10": {...}, "p50": {...}, "p90": {...}}
    rows = music_stats.compare(generated_stats, reference_stats)       # each statistic beside the reference range

Notes are the canonical notes of `data_pipeline.encoding` (what a dataset record or a MIDI file decodes to):
one voice per key, times in the vocabulary's time units, converted here to seconds. A note sounds on
[start, end). Pitched notes are those of every instrument but drums; a drum hit sounds for its written length
(the vocabulary's `drum_duration_units`, cut short by the next hit of the same drum), which says nothing of the
music, so drums count as notes and as sound but not in durations, polyphony or pitch statistics.

The statistics (a dict, keys in this order; None where the quantity is undefined, e.g. no pitched notes):

| key                 | unit    | definition                                                                   |
|---------------------|---------|------------------------------------------------------------------------------|
| `seconds`           | s       | piece length: max(duration_units, the latest note end), in seconds           |
| `notes`             | count   | attacks, drum hits included                                                  |
| `notes_per_second`  | 1/s     | notes / seconds (None when seconds is 0)                                     |
| `duration_median_s` | s       | median of pitched notes' durations (end - start)                             |
| `duration_p95_s`    | s       | 95th percentile of those durations                                           |
| `duration_p99_s`    | s       | 99th percentile of those durations                                           |
| `long_note_share`   | 0..1    | share of pitched notes lasting strictly longer than `long_note_s` (4 s)      |
| `max_duration_s`    | s       | longest pitched note                                                         |
| `polyphony_mean`    | notes   | at each distinct onset time t of a pitched note, the pitched notes sounding  |
|                     |         | at t (start <= t < end: the new ones included, those ending at t not);       |
|                     |         | the mean over those onset times                                              |
| `polyphony_median`  | notes   | the median over the same onset times                                         |
| `pitch_class_entropy` | bits  | Shannon entropy of the histogram of pitched notes' pitch classes (pitch mod  |
|                     |         | 12, one count per note): 0 (one class) .. log2(12) = 3.585 (uniform)         |
| `pitch_range`       | semitones | highest minus lowest pitch of pitched notes                                |
| `instruments`       | names   | the instruments that play (drums included), in the vocabulary's table order  |
| `silence_share`     | 0..1    | share of [0, seconds) during which no note sounds, drums included            |

Percentiles and medians interpolate linearly between order statistics (numpy's default): the median of
1, 2, 3, 4 is 2.5.

Pooled statistics (`pooled_stats`) treat many pieces as one body of music, not an average of pieces: seconds and
notes are summed, durations of all pitched notes are pooled (one median over all of them), the polyphony values
at every onset of every piece are pooled, the pitch-class histograms are added, the range spans all pieces'
pitches, the instruments are the union, and silence is the pieces' silent seconds over their summed seconds.
Pooled over one piece they equal that piece's statistics.

`percentile_ranges` summarises per-piece statistics across pieces: for each numeric statistic, the 10th / 50th /
90th percentile of its per-piece values (pieces where it is None left out). `compare` puts generated pieces'
values (pooled and the median over pieces) beside a reference set's per-piece 10th..90th percentile range;
the per-piece median is the like-for-like comparison with that range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from data_pipeline.encoding import Notes
from data_pipeline.vocab import Vocab

LONG_NOTE_S = 4.0
# Per-piece statistics summarised across pieces (`percentile_ranges`), in table order.
NUMERIC_STATS = ("seconds", "notes", "notes_per_second", "duration_median_s", "duration_p95_s", "duration_p99_s",
                 "long_note_share", "max_duration_s", "polyphony_mean", "polyphony_median", "pitch_class_entropy",
                 "pitch_range", "silence_share")
# What `compare` compares: the style of the music, not its size (a generated piece's length is asked for).
COMPARED_STATS = tuple(s for s in NUMERIC_STATS if s not in ("seconds", "notes"))
# The keys of a statistics dict, in order.
STAT_NAMES = NUMERIC_STATS[:-1] + ("instruments", NUMERIC_STATS[-1])


@dataclasses.dataclass
class Measures:
    """What the statistics of one or more pieces are computed from.

    Attributes:
      seconds: summed piece lengths.
      notes: attacks, drums included.
      durations_s: float64[D], each pitched note's duration in seconds.
      polyphony: int64[O], the pitched notes sounding at each distinct onset time of a pitched note.
      pitch_classes: int64[12], pitched notes per pitch class.
      pitch_min, pitch_max: lowest and highest pitched note, or None without pitched notes.
      instruments: bool[num_classes], which instruments play.
      silent_s: seconds during which nothing sounds.
    """

    seconds: float
    notes: int
    durations_s: np.ndarray
    polyphony: np.ndarray
    pitch_classes: np.ndarray
    pitch_min: int | None
    pitch_max: int | None
    instruments: np.ndarray
    silent_s: float


def _covered_units(start: np.ndarray, end: np.ndarray) -> int:
    """Length of the union of intervals [start, end) (time units)."""
    if len(start) == 0:
        return 0
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    # A new block of overlapping intervals begins where an interval starts after all earlier ones ended.
    new_block = np.empty(len(start), bool)
    new_block[0] = True
    new_block[1:] = start[1:] > reach[:-1]
    first = np.flatnonzero(new_block)
    block_end = reach[np.append(first[1:] - 1, len(start) - 1)]
    return int((block_end - start[first]).sum())


def measure(notes: Notes, vocab: Vocab, duration_units: int | None = None) -> Measures:
    """The `Measures` of one piece (see the module docstring for what counts).

    Args:
      notes: the piece's notes in `vocab`'s time units (N notes; any order).
      vocab: gives the time unit, the drums' instrument index and the instrument table.
      duration_units: the piece's length in time units if known (e.g. a closing rest); the latest note end
        counts when it is later.
    """
    unit_s = vocab.config.time_unit_ms / 1000.0
    start, end = np.asarray(notes.start, np.int64), np.asarray(notes.end, np.int64)
    length = max(int(duration_units or 0), int(end.max()) if len(end) else 0)
    pitched = np.asarray(notes.instrument) != vocab.drums_index
    p_start, p_end, pitch = start[pitched], end[pitched], np.asarray(notes.pitch, np.int64)[pitched]

    onsets = np.unique(p_start)
    # Sounding at t: started at or before t minus ended at or before t (a note that ended started earlier).
    polyphony = (np.searchsorted(np.sort(p_start), onsets, side="right")
                 - np.searchsorted(np.sort(p_end), onsets, side="right"))
    instruments = np.zeros(vocab.instruments.num_classes, bool)
    instruments[np.asarray(notes.instrument, np.int64)] = True
    return Measures(
        seconds=length * unit_s, notes=len(start), durations_s=(p_end - p_start) * unit_s,
        polyphony=polyphony.astype(np.int64), pitch_classes=np.bincount(pitch % 12, minlength=12).astype(np.int64),
        pitch_min=int(pitch.min()) if len(pitch) else None, pitch_max=int(pitch.max()) if len(pitch) else None,
        instruments=instruments, silent_s=(length - _covered_units(start, end)) * unit_s)


def combine(measures: Sequence[Measures]) -> Measures:
    """Several pieces' `Measures` as one body of music (see pooled statistics in the module docstring)."""
    if not measures:
        raise ValueError("no pieces to pool")
    lows = [m.pitch_min for m in measures if m.pitch_min is not None]
    highs = [m.pitch_max for m in measures if m.pitch_max is not None]
    return Measures(
        seconds=sum(m.seconds for m in measures), notes=sum(m.notes for m in measures),
        durations_s=np.concatenate([m.durations_s for m in measures]),
        polyphony=np.concatenate([m.polyphony for m in measures]),
        pitch_classes=np.sum([m.pitch_classes for m in measures], axis=0),
        pitch_min=min(lows) if lows else None, pitch_max=max(highs) if highs else None,
        instruments=np.logical_or.reduce([m.instruments for m in measures]),
        silent_s=sum(m.silent_s for m in measures))


def _entropy_bits(counts: np.ndarray) -> float | None:
    total = counts.sum()
    if total == 0:
        return None
    p = counts[counts > 0] / total
    return float(max(-(p * np.log2(p)).sum(), 0.0))  # max: -0.0 for a single class


def summarize(m: Measures, vocab: Vocab, long_note_s: float = LONG_NOTE_S) -> dict:
    """`Measures` -> the statistics dict of the module docstring (plain Python numbers, JSON-ready)."""
    d, poly = m.durations_s, m.polyphony
    has_d, has_poly = len(d) > 0, len(poly) > 0
    return {
        "seconds": float(m.seconds),
        "notes": int(m.notes),
        "notes_per_second": m.notes / m.seconds if m.seconds > 0 else None,
        "duration_median_s": float(np.median(d)) if has_d else None,
        "duration_p95_s": float(np.percentile(d, 95)) if has_d else None,
        "duration_p99_s": float(np.percentile(d, 99)) if has_d else None,
        "long_note_share": float(np.mean(d > long_note_s)) if has_d else None,
        "max_duration_s": float(d.max()) if has_d else None,
        "polyphony_mean": float(poly.mean()) if has_poly else None,
        "polyphony_median": float(np.median(poly)) if has_poly else None,
        "pitch_class_entropy": _entropy_bits(m.pitch_classes),
        "pitch_range": m.pitch_max - m.pitch_min if m.pitch_min is not None else None,
        "instruments": [vocab.instruments.names[i] for i in np.flatnonzero(m.instruments)],
        "silence_share": m.silent_s / m.seconds if m.seconds > 0 else None,
    }


def piece_stats(notes: Notes, vocab: Vocab, duration_units: int | None = None,
                long_note_s: float = LONG_NOTE_S) -> dict:
    """The statistics of one piece (module docstring); `duration_units` as in `measure`."""
    return summarize(measure(notes, vocab, duration_units), vocab, long_note_s)


def pooled_stats(pieces: Iterable[tuple[Notes, int | None]], vocab: Vocab, long_note_s: float = LONG_NOTE_S) -> dict:
    """The statistics of many pieces taken together (module docstring).

    Args:
      pieces: (notes, duration_units or None) per piece, as `piece_stats` takes them; at least one.
    """
    return summarize(combine([measure(n, vocab, d) for n, d in pieces]), vocab, long_note_s)


def percentile_ranges(per_file_stats: Sequence[Mapping], q: Sequence[float] = (10, 50, 90)) -> dict[str, dict]:
    """Each numeric statistic's percentiles across pieces.

    Args:
      per_file_stats: statistics dicts (`piece_stats`), one per piece.
      q: percentiles, 0..100.
    Returns:
      {"p10": {statistic: value}, "p50": ..., "p90": ...} (keys `p` + each q, `g`-formatted), over the
      `NUMERIC_STATS` found in the dicts; a value is None where no piece defines that statistic.
    """
    out = {f"p{x:g}": {} for x in q}
    names = [s for s in NUMERIC_STATS if any(s in row for row in per_file_stats)]
    for name in names:
        values = np.array([row[name] for row in per_file_stats if row.get(name) is not None], np.float64)
        for x in q:
            out[f"p{x:g}"][name] = float(np.percentile(values, x)) if len(values) else None
    return out


def compare(generated: Sequence[Mapping], reference: Sequence[Mapping], generated_pooled: Mapping | None = None,
            q: tuple[float, float] = (10, 90), stats: Sequence[str] = COMPARED_STATS) -> list[dict]:
    """Generated pieces' statistics beside a reference set's per-piece range.

    Args:
      generated: per-piece statistics dicts of the generated pieces (at least one).
      reference: per-piece statistics dicts of the reference pieces (e.g. a test split).
      generated_pooled: the generated pieces' pooled statistics (`pooled_stats`), if known.
      q: the percentiles bounding the reference range.
      stats: which statistics.
    Returns:
      One dict per statistic: `stat`; `pooled` (from `generated_pooled`, else None); `median`, the median over
      generated pieces; `low`, `high`, the reference's q[0] / q[1] percentiles across its pieces; `inside`,
      whether `median` lies in [low, high]; `pooled_inside`, the same for `pooled`. Values are None where
      undefined (and `inside` then None).
    """
    gen = percentile_ranges(generated, (50,))["p50"]
    ref = percentile_ranges(reference, q)
    low, high = ref[f"p{q[0]:g}"], ref[f"p{q[1]:g}"]

    def inside(value, lo, hi):
        return None if value is None or lo is None else bool(lo <= value <= hi)

    rows = []
    for name in stats:
        pooled = None if generated_pooled is None else generated_pooled.get(name)
        lo, hi = low.get(name), high.get(name)
        rows.append({"stat": name, "pooled": pooled, "median": gen.get(name), "low": lo, "high": hi,
                     "inside": inside(gen.get(name), lo, hi), "pooled_inside": inside(pooled, lo, hi)})
    return rows


# -- tables ---------------------------------------------------------------------------------------
# (statistic, column header, format); shares are printed as percentages.
_COLUMNS = (("seconds", "seconds", ".1f"), ("notes", "notes", "d"), ("notes_per_second", "notes/s", ".2f"),
            ("duration_median_s", "dur_med_s", ".3f"), ("duration_p95_s", "dur_p95_s", ".2f"),
            ("duration_p99_s", "dur_p99_s", ".2f"), ("long_note_share", "long%", "%"),
            ("max_duration_s", "dur_max_s", ".2f"), ("polyphony_mean", "poly_mean", ".2f"),
            ("polyphony_median", "poly_med", ".1f"), ("pitch_class_entropy", "pc_bits", ".3f"),
            ("pitch_range", "range", "d"), ("silence_share", "silence%", "%"))


def format_value(value, spec: str = "g") -> str:
    """One table cell: '-' for None; spec '%' prints a share as a percentage with one decimal."""
    if value is None:
        return "-"
    if spec == "%":
        return f"{100 * value:.1f}"
    if spec == "d":
        return str(round(value)) if float(value).is_integer() else f"{value:.1f}"  # percentiles may interpolate
    return format(value, spec)


def format_table(rows: Sequence[tuple[str, Mapping]], name_width: int = 40) -> str:
    """One line per (name, statistics dict) row under a header; long names keep their end."""
    width = min(max([4] + [len(name) for name, _ in rows]), name_width)
    lines = [f"{'file':<{width}} " + " ".join(f"{h:>9}" for _, h, _ in _COLUMNS)]
    for name, row in rows:
        if len(name) > width:
            name = "..." + name[-(width - 3):]
        lines.append(f"{name:<{width}} " + " ".join(f"{format_value(row.get(k), spec):>9}" for k, _, spec in _COLUMNS))
    return "\n".join(lines)


def format_comparison(rows: Sequence[Mapping], q: tuple[float, float] = (10, 90)) -> str:
    """`compare`'s rows as a table: statistic, pooled, per-piece median, reference range, inside?"""
    headers = ("statistic", "pooled", "median", f"ref p{q[0]:g}", f"ref p{q[1]:g}", "inside?")
    width = max(len(headers[0]), *(len(r["stat"]) for r in rows))
    lines = [f"{headers[0]:<{width}} " + " ".join(f"{h:>9}" for h in headers[1:])]
    for r in rows:
        verdict = {True: "yes", False: "NO", None: "-"}[r["inside"]]
        cells = [format_value(r[k], ".4g") for k in ("pooled", "median", "low", "high")] + [verdict]
        lines.append(f"{r['stat']:<{width}} " + " ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def matched_conditions(conditions: list[tuple], n: int) -> list[tuple]:
    """`n` generation conditions in the mix of `conditions` (one per reference piece, any hashable values).

    Every distinct condition gets one piece (the most frequent first, ties in order of first appearance; if
    there are more than `n`, the `n` most frequent), the remaining pieces go by largest remainder of their share
    of the reference. Returned grouped, the most frequent first.
    """
    counts: dict = {}
    for condition in conditions:
        counts[condition] = counts.get(condition, 0) + 1
    ranked = sorted(counts, key=lambda c: -counts[c])[:n]  # sorted() is stable: ties keep first appearance
    seats = {c: 1 for c in ranked}
    left, total = n - len(ranked), sum(counts[c] for c in ranked)
    shares = {c: left * counts[c] / total for c in ranked}
    for c in ranked:
        seats[c] += int(shares[c])
    by_remainder = sorted(ranked, key=lambda c: -(shares[c] - int(shares[c])))
    for c in by_remainder[: n - sum(seats.values())]:
        seats[c] += 1
    return [c for c in ranked for _ in range(seats[c])]
