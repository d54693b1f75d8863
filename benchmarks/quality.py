r"""Model quality on held-out music beside honest baselines, and the music statistics of generated pieces.

    python -m benchmarks.quality --workdir=runs/main_job/tiny --data_dir=runs/main_job/data --out=DIR
    python -m benchmarks.quality --model=runs/main_job/export --data_dir=runs/main_job/data --out=DIR

Part 1, prediction, by `musenet-eval` (its JSON is kept as DIR/eval.json). Every body token of the `--split`
(default test) pieces is scored once by the model, by a unigram and by the best interpolated Kneser-Ney
n-gram (orders 1..5, chosen on the validation split, fitted on the train split), all three on the same windows
and tokens. Rows: bits/token and velocity-free bits/s, and the model's ratio to the n-gram.

Part 2, generation. Two sets of 30 s pieces with the sampler's defaults (structured decoding, the note-length
guard) at `--temperature` and `--top_p`; their music statistics come from `data_pipeline.music_stats`.
- Matched (`--num_pieces`, seeds 0..N-1): the conditions (label and instrument set) of the `--split`'s own
  pieces, every distinct one at least once and the rest in proportion to how often the split holds them
  (`music_stats.matched_conditions`), so that the pieces stand beside a reference of the same mix: the default
  test split is mostly Bach chorales on piano, and pieces in other styles set against its ranges would measure
  the styles' difference, not the model. Their statistics stand beside the split's per-piece 10th..90th
  percentile range. The checks (each True / False in the JSON):
  - no pitched note longer than the guard (`max_note_seconds`);
  - notes longer than 4 s: at most 1% of the generated pitched notes;
  - the median over pieces of their median polyphony at onsets, and of their notes/s, inside the split's
    per-piece p10..p90;
  - the median over pieces of their pitch-class entropy at most the split's per-piece p90.
- Styles (`--num_style_pieces`, seeds 0..M-1, cycling through `PROGRAMS`: every label of the bundled corpus,
  one instrument set with drums): each piece beside the train split's pieces of its own label (`by_label`:
  notes/s and median polyphony p10..p90), since the held-out split holds too few pieces of most styles to give a
  range. Reported, not a check.
The pieces are written to DIR/pieces/ (`m<seed>-...` matched, `s<seed>-...` styles) as MIDI and piano-roll PNG, to
look at and listen to.

Writes DIR/quality.json: {"model", "step", "split", "prediction": {"model", "unigram", "ngram": {..., "order"}},
"ratios", "generation": {"settings", "pieces": [{"seed", "label", "instruments", "ended", "stats"}] (matched),
"pooled", "comparison", "reference_percentiles", "style_pieces": [...], "by_label"}, "checks", "seconds_taken"}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags

from data_pipeline import outputs
from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "musenet-train workdir (newest checkpoint).")
_MODEL = flags.DEFINE_string("model", None, "Export directory (musenet-export).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built dataset the model was trained on (required).")
_DATASET = flags.DEFINE_string("dataset", "default", "Dataset config name.")
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split to score and to compare statistics with.")
_NUM_PIECES = flags.DEFINE_integer("num_pieces", 8, "Pieces generated on the split's conditions (seeds 0..N-1).")
_NUM_STYLE_PIECES = flags.DEFINE_integer("num_style_pieces", 8, "Pieces generated on `PROGRAMS` (seeds 0..M-1).")
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Length of each generated piece.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature of the generated pieces (the main job's).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass of the generated pieces (the main job's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward when scoring.")
_OUT = flags.DEFINE_string("out", None, "Output folder: quality.json and pieces/ (required).")

# (label, instruments) per style piece, cycled: conditions the bundled corpus has (a model is judged on what it
# was shown; bach is chorales on piano, the quartets' strings map to violin and cello), one set with drums.
PROGRAMS = (
    ("bach", ("piano",)),
    ("freedoom", ("piano", "violin", "bass", "guitar", "flute", "drums")),
    ("beethoven", ("violin", "cello")),
    ("mozart", ("violin",)),
    ("bach", ("piano",)),
    ("freedoom", ("violin", "bass", "guitar", "drums")),
    ("haydn", ("violin",)),
    ("beethoven", ("violin", "cello")),
)
LONG_NOTE_SHARE_MAX = 0.01


def _load():
    from musenet_jax import export

    if _WORKDIR.value:
        model, vocab, step = export.load_checkpoint(_WORKDIR.value)
        return model, vocab, step, _WORKDIR.value
    meta, _, _ = export.read_export_config(_MODEL.value)
    model, vocab = export.load_export(_MODEL.value)
    return model, vocab, int(meta["step"]), _MODEL.value


def prediction(out_dir: str) -> dict:
    """Model, unigram and best n-gram total metrics on the split (module doc, part 1), by musenet-eval itself,
    so that these numbers are the ones a user gets from it."""
    path = os.path.join(out_dir, "eval.json")
    source = ["--workdir", _WORKDIR.value] if _WORKDIR.value else ["--model", _MODEL.value]
    res = subprocess.run([sys.executable, "-m", "launch.evaluate", *source, "--split", _SPLIT.value, "--data_dir",
                          _DATA_DIR.value, "--dataset", _DATASET.value, f"--batch_size={_BATCH_SIZE.value}",
                          "--out", path], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode:
        raise ValueError(f"musenet-eval failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    report = json.loads(open(path).read())
    if not report.get("baselines"):
        raise ValueError("musenet-eval computed no baselines")
    return {"model": report["total"], **report["baselines"]}


def _generate(model, vocab, conditions: list[tuple], out_dir: str, tag: str) -> tuple[list[dict], list]:
    """One piece per (label, instruments) of `conditions`, seed = its index; written to out_dir/pieces/."""
    from data_pipeline import encoding, music_stats, rendering
    from musenet_jax import sampling

    rows, measured = [], []
    for seed, (label, instruments) in enumerate(conditions):
        label = label if label in vocab.config.labels else None
        instruments = [name for name in instruments if name in vocab.instruments.names]
        piece, = sampling.generate(model, vocab, label=label, instruments=instruments, seconds=_SECONDS.value,
                                   sampling=sampling.SamplingConfig(temperature=_TEMPERATURE.value, top_p=_TOP_P.value),
                                   seed=seed)
        notes, duration = encoding.decode_tokens(piece.tokens[piece.prefix_len:], vocab)
        name = f"{tag}{seed:02d}-{label or 'none'}-{'-'.join(instruments)}"
        encoding.notes_to_midi(notes, vocab, os.path.join(out_dir, "pieces", name + ".mid"), duration_units=duration)
        rendering.piano_roll(notes, vocab, os.path.join(out_dir, "pieces", name + ".png"), title=name)
        stats = music_stats.piece_stats(notes, vocab, duration)
        rows.append({"seed": seed, "label": label, "instruments": instruments, "ended": piece.ended,
                     "stats": stats})
        measured.append((notes, duration))
        print(f"generated {name}: {stats['notes']} notes, {piece.seconds:.1f} s", flush=True)
    return rows, measured


def generation(model, vocab, out_dir: str) -> tuple[dict, list[dict]]:
    """Generated pieces' statistics and the split's per-piece statistics (module doc, part 2)."""
    from data_pipeline import datasets, encoding, music_stats
    from musenet_jax import sampling

    source = datasets.data_source(_DATA_DIR.value, _DATASET.value, _SPLIT.value)
    reference, conditions = [], []
    for i in range(len(source)):
        record = source[i]
        notes, duration = encoding.decode_tokens(np.asarray(record["tokens"]), vocab)
        reference.append(music_stats.piece_stats(notes, vocab, duration))
        label = record["label"].decode() if isinstance(record["label"], bytes) else str(record["label"])
        names = tuple(vocab.instruments.names[int(i)] for i in np.asarray(record["instruments"]).reshape(-1))
        conditions.append((label, names))
    if not reference:
        raise ValueError(f"the {_SPLIT.value} split holds no pieces to compare with")
    os.makedirs(os.path.join(out_dir, "pieces"), exist_ok=True)
    settings = {"seconds": _SECONDS.value, "temperature": _TEMPERATURE.value, "top_p": _TOP_P.value,
                "max_note_seconds": sampling.DEFAULT_MAX_NOTE_SECONDS}
    rows, measured = _generate(model, vocab, music_stats.matched_conditions(conditions, _NUM_PIECES.value),
                               out_dir, "m")
    styles = [PROGRAMS[seed % len(PROGRAMS)] for seed in range(_NUM_STYLE_PIECES.value)]
    style_rows, _ = _generate(model, vocab, styles, out_dir, "s")
    pooled = music_stats.pooled_stats(measured, vocab)
    generated = [r["stats"] for r in rows]
    result = {"settings": settings, "pieces": rows, "pooled": pooled,
              "comparison": music_stats.compare(generated, reference, pooled),
              "reference_percentiles": music_stats.percentile_ranges(reference),
              "style_pieces": style_rows, "by_label": by_label(style_rows, vocab)}
    return result, reference


def by_label(rows: list[dict], vocab) -> dict:
    """Each generated piece beside the train split's pieces of its own label (p10..p90 of notes/s and median
    polyphony): the like-for-like view, where the held-out split holds too few pieces of most styles."""
    from data_pipeline import datasets, encoding, music_stats

    source = datasets.data_source(_DATA_DIR.value, _DATASET.value, "train")
    stats: dict[str, list[dict]] = {}
    for i in range(len(source)):
        record = source[i]
        label = record["label"].decode() if isinstance(record["label"], bytes) else str(record["label"])
        notes, duration = encoding.decode_tokens(np.asarray(record["tokens"]), vocab)
        stats.setdefault(label, []).append(music_stats.piece_stats(notes, vocab, duration))
    out = {}
    for row in rows:
        real = stats.get(row["label"] or "", [])
        ranges = music_stats.percentile_ranges(real) if real else None
        entry = {"train_pieces": len(real)}
        for key in ("notes_per_second", "polyphony_median"):
            value = row["stats"][key]
            lo, hi = (ranges["p10"].get(key), ranges["p90"].get(key)) if ranges else (None, None)
            entry[key] = {"value": value, "p10": lo, "p90": hi,
                          "inside": None if lo is None or value is None else bool(lo <= value <= hi)}
        out[f"s{row['seed']:02d}-{row['label'] or 'none'}"] = entry
    return out


def checks(gen: dict, reference: list[dict]) -> dict:
    """The module doc's pass / fail checks."""
    from data_pipeline import music_stats

    pieces = [r["stats"] for r in gen["pieces"]]
    ranges = music_stats.percentile_ranges(reference)

    def median(key):
        values = [p[key] for p in pieces if p[key] is not None]
        return float(np.median(values)) if values else None

    def within(key):
        value, lo, hi = median(key), ranges["p10"].get(key), ranges["p90"].get(key)
        return value is not None and lo is not None and lo <= value <= hi

    guard = gen["settings"]["max_note_seconds"]
    longest = max((p["max_duration_s"] or 0.0) for p in pieces)
    pec = median("pitch_class_entropy")
    return {
        "no_note_longer_than_guard": bool(not guard or longest <= guard + 1e-9),
        "long_notes_at_most_1_percent": bool((gen["pooled"]["long_note_share"] or 0.0) <= LONG_NOTE_SHARE_MAX),
        "median_polyphony_in_range": within("polyphony_median"),
        "notes_per_second_in_range": within("notes_per_second"),
        "pitch_class_entropy_at_most_p90": bool(pec is not None and pec <= ranges["p90"]["pitch_class_entropy"]),
    }


def _table(pred: dict) -> str:
    lines = [f"{'':<16}{'bits/token':>11}{'bits/s':>9}{'bits/s (no vel)':>17}"]
    for name in ("model", "unigram", "ngram"):
        m = pred[name]
        title = f"{name} ({m['order']})" if name == "ngram" else name
        lines.append(f"{title:<16}{m['bits_per_token']:>11.3f}{m['bits_per_second']:>9.1f}"
                     f"{m['bits_per_second_no_velocity']:>17.1f}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(_WORKDIR.value) == bool(_MODEL.value):
        raise cli.UsageError("give exactly one of --workdir or --model")
    if not _DATA_DIR.value or not _OUT.value:
        raise cli.UsageError("--data_dir and --out are required")
    for flag, low in ((_NUM_PIECES, 1), (_NUM_STYLE_PIECES, 0), (_BATCH_SIZE, 1)):
        if flag.value < low:
            raise cli.UsageError(f"--{flag.name} must be >= {low}, got {flag.value}")
    if not _SECONDS.value > 0 or not _TEMPERATURE.value > 0:
        raise cli.UsageError("--seconds and --temperature must be > 0")
    if not 0 < _TOP_P.value <= 1:
        raise cli.UsageError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
    cli.prepare_output_dir(_OUT.value)
    from data_pipeline import music_stats

    t0 = time.perf_counter()
    model, vocab, step, where = _load()
    pred = prediction(_OUT.value)
    ratios = {k: pred["model"][k] / pred["ngram"][k] for k in ("bits_per_token", "bits_per_second_no_velocity")}
    print(f"\n{_SPLIT.value} split, same tokens for every row:\n{_table(pred)}")
    print(f"model / best n-gram: {ratios['bits_per_token']:.3f} bits/token, "
          f"{ratios['bits_per_second_no_velocity']:.3f} velocity-free bits/s")
    gen, reference = generation(model, vocab, _OUT.value)
    print(f"\n{_NUM_PIECES.value} pieces generated on the {_SPLIT.value} split's conditions vs its per-piece p10..p90:")
    print(music_stats.format_comparison(gen["comparison"]))
    print("\nstyle pieces, each vs the train split's pieces of its label (p10..p90):")
    fmt = music_stats.format_value
    for name, entry in gen["by_label"].items():
        cells = []
        for key in ("notes_per_second", "polyphony_median"):
            e = entry[key]
            verdict = "-" if e["inside"] is None else "yes" if e["inside"] else "NO"
            cells.append(f"{key} {fmt(e['value'], '.3g')} in {fmt(e['p10'], '.3g')}..{fmt(e['p90'], '.3g')}: {verdict}")
        print(f"  {name:<16} ({entry['train_pieces']} pieces)  " + "; ".join(cells))
    result_checks = checks(gen, reference)
    result_checks["model_10_percent_below_ngram"] = bool(max(ratios.values()) <= 0.9)
    for name, ok in result_checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    report = {"model": where, "step": step, "split": _SPLIT.value, "prediction": pred, "ratios": ratios,
              "generation": gen, "checks": result_checks, "seconds_taken": time.perf_counter() - t0}
    path = os.path.join(_OUT.value, "quality.json")
    outputs.write_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path} and {_OUT.value}/pieces/")


if __name__ == "__main__":
    cli.run(main)
