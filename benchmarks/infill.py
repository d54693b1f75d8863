r"""Infilling and accompaniment as a musician receives them: what is kept, what is written, and how it sounds.

    python -m benchmarks.infill --model=runs/main_job/export --data_dir=runs/main_job/data --out=DIR

For each of the first `--num_pieces` pieces of the `--split` (default test), a span is drawn as training and
`musenet-eval --task=infill` draw it (`data_pipeline.infill.draw_task`, seeded by (`--seed`, piece index); spans
of every part, or of one part of several), and the model rewrites it (`musenet_jax.infilling.complete`, the
sampler's defaults at `--temperature` / `--top_p`). Every piece with several parts also gets each of its parts
written anew under the others over its first `--accompany_seconds` (accompaniment).

Checks per rewrite (each True / False in the JSON, and all of them over the set):
- kept: the notes outside the rewrite are the source's, note for note, and the tokens before the span are the
  source's byte for byte;
- inside: every written note starts in the span and no pitched written note sounds past its end (no hanging note
  at the seam), and no written note overlaps a kept one of the same key;
- length: the written MIDI file reads back as the same notes to the time unit (10 ms), none past the source's end.

Music, reported beside the source's own notes of the span: notes per second, median note length, median
polyphony at onsets (`data_pipeline.music_stats`). The rewritten pieces go to DIR/pieces/ as MIDI and piano roll
(the span shaded). Writes DIR/infill.json: {"model", "split", "settings", "rewrites": [{"piece", "task", "span",
"instruments", "checks", "written", "source"}], "checks", "seconds_taken"}.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags

from data_pipeline import outputs
from launch import cli

_MODEL = flags.DEFINE_string("model", None, "Export directory (musenet-export; required).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built dataset (required).")
_DATASET = flags.DEFINE_string("dataset", "default", "Dataset config name.")
_SPLIT = flags.DEFINE_string("split", "test", "Split whose pieces are rewritten.")
_NUM_PIECES = flags.DEFINE_integer("num_pieces", 8, "Pieces of the split to rewrite a span of.")
_ACCOMPANY_SECONDS = flags.DEFINE_float("accompany_seconds", 12.0, "Length accompanied in pieces of several parts.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the spans and the sampling.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (the main job's).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (the main job's).")
_OUT = flags.DEFINE_string("out", None, "Output folder: infill.json and pieces/ (required).")


def music(notes, span, vocab) -> dict:
    """Notes per second of the span, median note length (s) and median polyphony at onsets of a set of notes."""
    from data_pipeline import music_stats

    unit_s = vocab.config.time_unit_ms / 1000.0
    stats = music_stats.piece_stats(notes, vocab) if len(notes) else {}
    median = stats.get("duration_median_s")
    return {"notes": len(notes), "notes_per_second": round(len(notes) / ((span.end - span.start) * unit_s), 2),
            "median_note_s": None if median is None else round(median, 3),
            "median_polyphony": stats.get("polyphony_median")}


def rewrite_checks(source, result, span, midi_path: str, vocab) -> dict:
    """The kept / inside / length checks of one rewrite (module doc); `midi_path`: the rewrite as written."""
    from data_pipeline import encoding, infill

    target = infill.target_notes(source, span, vocab)
    kept = target.take(~span.regenerated(target))

    def rows(notes):
        return sorted(zip(*(getattr(notes, f).tolist() for f in ("instrument", "pitch", "velocity", "start", "end")),
                          strict=True))

    written = result.written
    pitched = written.instrument != vocab.drums_index
    before_ours, _ = encoding.notes_to_body(result.notes, vocab, horizon=span.start)
    before_theirs, _ = encoding.notes_to_body(encoding.canonical_notes(source, vocab), vocab, horizon=span.start)
    overlap = False
    for key in set(zip(result.notes.instrument.tolist(), result.notes.pitch.tolist(), strict=True)):
        if key[0] == vocab.drums_index:
            continue
        sel = (result.notes.instrument == key[0]) & (result.notes.pitch == key[1])
        order = np.argsort(result.notes.start[sel])
        overlap |= bool(np.any(result.notes.start[sel][order][1:] < result.notes.end[sel][order][:-1]))
    return {"kept": rows(result.given) == rows(kept) and np.array_equal(before_ours, before_theirs),
            "inside": bool(np.all((written.start >= span.start) & (written.start < span.end))
                           and np.all(written.end[pitched] <= span.end) and not overlap
                           and rows(result.notes) == sorted(rows(result.given) + rows(written))),
            # The file holds the notes to the time unit, and lasts as long as the source.
            "length": rows(encoding.decode_tokens(encoding.encode_midi(midi_path, vocab).body, vocab)[0])
            == rows(encoding.canonical_notes(result.notes, vocab))
            and int(result.notes.end.max(initial=0)) <= result.duration_units}


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    missing = [f"--{f.name}" for f in (_MODEL, _DATA_DIR, _OUT) if f.value is None]
    if missing:
        raise cli.UsageError(f"missing required flags: {', '.join(missing)}")
    if _NUM_PIECES.value < 1 or not _ACCOMPANY_SECONDS.value > 0:
        raise cli.UsageError("--num_pieces must be >= 1 and --accompany_seconds > 0")
    from data_pipeline import datasets, encoding, infill, rendering, windows
    from musenet_jax import export, infilling, sampling

    t0 = time.perf_counter()
    model, vocab = export.load_export(_MODEL.value)
    source = datasets.data_source(_DATA_DIR.value, _DATASET.value, _SPLIT.value)
    config = sampling.SamplingConfig(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
    unit_s = vocab.config.time_unit_ms / 1000.0
    os.makedirs(os.path.join(_OUT.value, "pieces"), exist_ok=True)
    rewrites = []
    for index in range(min(_NUM_PIECES.value, len(source))):
        piece = windows.parse_record(source[index], vocab)
        notes, duration = encoding.decode_tokens(piece.body, vocab)
        rng = np.random.default_rng((_SEED.value, index))
        span, _ = infill.draw_task(notes.instrument, duration, infill.TaskMix(infill_rate=1.0), rng,
                                      vocab)
        tasks = [("infill", span, False)]
        parts = np.unique(notes.instrument).tolist()
        if len(parts) > 1:
            stop = min(duration, round(_ACCOMPANY_SECONDS.value / unit_s))
            for part in parts:
                tasks.append(("accompany", infill.Span(0, stop, (part,)), True))
        for task, span, accompany in tasks:
            given = notes.take(~np.isin(notes.instrument, span.instruments)) if accompany else notes
            result = infilling.complete(model, vocab, given, duration, span, label=piece.label,
                                        sampling_config=config, seed=_SEED.value, sample=index,
                                        accompany=accompany)
            original = infill.target_notes(notes, span, vocab)
            original = original.take(span.regenerated(original))
            what = ",".join(vocab.instruments.names[i] for i in (span.instruments or parts))
            name = f"{index:02d}-{task}-{os.path.basename(piece.name).rsplit('.', 1)[0]}-{what.replace(',', '+')}"
            path = os.path.join(_OUT.value, "pieces", name)
            encoding.notes_to_midi(result.notes, vocab, path + ".mid", duration_units=duration)
            rendering.piano_roll(result.notes, vocab, path + ".png", title=name, span=(span.start, span.end))
            checks = rewrite_checks(given, result, span, path + ".mid", vocab)
            rewrites.append({"piece": piece.name, "task": task, "span": [span.start * unit_s, span.end * unit_s],
                             "instruments": what, "chunks": result.chunks, "checks": checks,
                             "written": music(result.written, span, vocab),
                             "source": music(original, span, vocab)})
            print(f"{name}: {task} {span.start * unit_s:.2f}-{span.end * unit_s:.2f} s of {what}: "
                  f"{len(result.written)} notes written ({len(original)} in the source), "
                  f"checks {'ok' if all(checks.values()) else checks}", file=sys.stderr)

    print(f"{'rewrite':<44} {'span (s)':>12} {'notes/s':>15} {'median len (s)':>17} {'kept/inside/len':>16}")
    for r in rewrites:
        name = f"{r['task']} {os.path.basename(r['piece'])[:30]} ({r['instruments'][:10]})"
        span = f"{r['span'][0]:.1f}-{r['span'][1]:.1f}"
        rate = f"{r['written']['notes_per_second']:.1f} vs {r['source']['notes_per_second']:.1f}"
        length = f"{r['written']['median_note_s'] or 0:.2f} vs {r['source']['median_note_s'] or 0:.2f}"
        ok = "/".join("y" if r["checks"][k] else "N" for k in ("kept", "inside", "length"))
        print(f"{name:<44} {span:>12} {rate:>15} {length:>17} {ok:>16}")
    summary = {k: all(r["checks"][k] for r in rewrites) for k in ("kept", "inside", "length")}
    print(f"all rewrites: kept verbatim {summary['kept']}, written inside the span {summary['inside']}, "
          f"length exact {summary['length']} ({len(rewrites)} rewrites, written vs source)")
    result = {"model": _MODEL.value, "split": _SPLIT.value,
              "settings": {"temperature": _TEMPERATURE.value, "top_p": _TOP_P.value, "seed": _SEED.value},
              "rewrites": rewrites, "checks": summary, "seconds_taken": round(time.perf_counter() - t0, 1)}
    outputs.write_atomic(os.path.join(_OUT.value, "infill.json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
