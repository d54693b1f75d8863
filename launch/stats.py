r"""musenet-stats: objective statistics of music (note lengths, polyphony, pitch classes, silence), per file and pooled.

    musenet-stats generated/ song.mid [--vocab=vocab.json] [--out=stats.json]
    musenet-stats --data_dir=DATA [--dataset=default] --split=test
    musenet-stats generated/ --reference_data_dir=DATA --reference_split=test     # or --reference=real/
    [--per_file] [--long_note_s=4] [--max_files=N]

The pieces are MIDI files (each PATH a file, or a folder searched recursively for *.mid / *.midi, sorted;
read with the dataset codec and --vocab, default the default vocabulary; files that cannot be read are skipped
and listed) or the records of a built dataset split (decoded from their tokens with the dataset's vocabulary).
`data_pipeline.music_stats` defines every statistic. Prints one row per piece (--per_file; by default when
there are at most 20), a POOLED row (all pieces as one body of music) and the p10 / p50 / p90 of each statistic
across pieces. With a reference (--reference paths, or --reference_data_dir and --reference_split) it then
prints, for each statistic, the pieces' pooled value and per-piece median beside the reference's per-piece
p10..p90 range, and whether the median lies inside. --out writes:

    {"source": {...}, "long_note_s": float, "files": [{"path", <statistics>}], "skipped": [{"path", "reason"}],
     "pooled": {<statistics>}, "percentiles": {"p10": {...}, "p50": {...}, "p90": {...}},
     "reference": {"source", "pieces", "skipped", "pooled", "percentiles"}, "comparison": [{"stat", "pooled",
     "median", "low", "high", "inside", "pooled_inside"}]}           # the last two only with a reference
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import flags

from data_pipeline import outputs
from launch import cli

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory of a built musenet_midi dataset.")
_DATASET = flags.DEFINE_string("dataset", "default", "Dataset config name under --data_dir.")
_SPLIT = flags.DEFINE_string("split", None, "Split of --data_dir to measure (e.g. test).")
_REFERENCE = flags.DEFINE_multi_string("reference", None, "Reference MIDI file or folder (repeat for several).")
_REFERENCE_DATA_DIR = flags.DEFINE_string("reference_data_dir", None, "Reference: a built dataset's data directory.")
_REFERENCE_DATASET = flags.DEFINE_string("reference_dataset", "default", "Dataset config under --reference_data_dir.")
_REFERENCE_SPLIT = flags.DEFINE_string("reference_split", None, "Split of --reference_data_dir (e.g. test).")
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.json to read MIDI files with; default: the default vocabulary.")
_PER_FILE = flags.DEFINE_bool("per_file", None, "Print a row per piece (default: when there are at most 20).")
_LONG_NOTE_S = flags.DEFINE_float("long_note_s", None, "Notes longer than this many seconds count as long "
                                  "(long_note_share; default: music_stats.LONG_NOTE_S, 4).")
_MAX_FILES = flags.DEFINE_integer("max_files", None, "Measure at most this many files / records of each source "
                                  "(the first ones).")
_OUT = flags.DEFINE_string("out", None, "Write the statistics as JSON here (atomically).")

MIDI_SUFFIXES = (".mid", ".midi")
PER_FILE_LIMIT = 20  # more pieces than this: no per-piece rows unless --per_file


def _check_flags(argv) -> None:
    """Every flag combination error, before anything is read."""
    paths = argv[1:]
    if bool(paths) == bool(_DATA_DIR.value):
        raise cli.UsageError("give MIDI files / folders or --data_dir with --split, not both" if paths
                             else "nothing to measure: give MIDI files / folders, or --data_dir with --split")
    if bool(_DATA_DIR.value) != bool(_SPLIT.value):
        raise cli.UsageError("--data_dir and --split go together")
    if flags.FLAGS["dataset"].present and not _DATA_DIR.value:
        raise cli.UsageError("--dataset goes with --data_dir")
    if _REFERENCE.value and _REFERENCE_DATA_DIR.value:
        raise cli.UsageError("give one of --reference or --reference_data_dir")
    if bool(_REFERENCE_DATA_DIR.value) != bool(_REFERENCE_SPLIT.value):
        raise cli.UsageError("--reference_data_dir and --reference_split go together")
    if flags.FLAGS["reference_dataset"].present and not _REFERENCE_DATA_DIR.value:
        raise cli.UsageError("--reference_dataset goes with --reference_data_dir")
    if _VOCAB.value and not (paths or _REFERENCE.value):
        raise cli.UsageError("--vocab is for reading MIDI files (dataset records use their dataset's vocabulary)")
    if _MAX_FILES.value is not None and _MAX_FILES.value < 1:
        raise cli.UsageError(f"--max_files must be >= 1, got {_MAX_FILES.value}")
    if _LONG_NOTE_S.value is not None and not _LONG_NOTE_S.value >= 0:
        raise cli.UsageError(f"--long_note_s must be >= 0, got {_LONG_NOTE_S.value}")
    cli.prepare_output_file(_OUT.value)


def midi_files(paths: list[str]) -> list[pathlib.Path]:
    """Each path a file, or a folder's *.mid / *.midi files (recursive, sorted); raises ValueError if none."""
    files = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            # Not is_file(): a broken link is then listed as skipped, not silently left out.
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and not p.is_dir())
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if not files:
        raise ValueError(f"{', '.join(paths)}: no .mid or .midi files")
    return files


def _read_midi(paths: list[str], vocab):
    """(names, [(notes, duration_units)], skipped) for MIDI files, read with `vocab` as the dataset builder does."""
    from data_pipeline import encoding
    from data_pipeline.midi_io import MidiError

    names, pieces, skipped = [], [], []
    for path in midi_files(paths)[:_MAX_FILES.value]:
        try:
            encoded = encoding.encode_midi(path, vocab, path=path)
        except MidiError as e:
            skipped.append({"path": str(path), "reason": e.reason})
            continue
        except OSError as e:
            skipped.append({"path": str(path), "reason": e.strerror or type(e).__name__})
            continue
        names.append(str(path))
        pieces.append(encoding.decode_tokens(encoded.tokens, vocab))
    return names, pieces, skipped


def _read_split(data_dir: str, dataset: str, split: str):
    """(names, [(notes, duration_units)], skipped, vocab) for a built dataset split's records."""
    from data_pipeline import datasets, encoding

    if not os.path.isdir(data_dir):
        raise ValueError(f"{data_dir}: no such directory")
    vocab = datasets.load_vocab(data_dir, dataset)
    try:
        source = datasets.data_source(data_dir, dataset, split)
    except (ValueError, KeyError) as e:
        built = datasets.load_metadata(data_dir, dataset).get("examples", {})
        if built.get(split) == 0:  # TFDS does not register an empty split
            raise ValueError(f"{data_dir} {dataset}: split {split!r} has no records (this build: "
                             f"{', '.join(f'{k} {v}' for k, v in built.items())})") from None
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{data_dir} {dataset}: cannot open split {split!r} ({detail})") from None
    names, pieces, skipped = [], [], []
    for i in range(min(len(source), _MAX_FILES.value or len(source))):
        record = source[i]
        path = record.get("path", b"")
        name = (path.decode() if isinstance(path, bytes) else str(path)) or f"{split}[{i}]"
        try:
            pieces.append(encoding.decode_tokens(record["tokens"], vocab))
        except ValueError as e:  # token ids outside the vocabulary
            skipped.append({"path": name, "reason": str(e)})
            continue
        names.append(name)
    return names, pieces, skipped, vocab


def _measure(names, pieces, vocab, long_note_s):
    """(per-file rows, pooled, percentiles) of decoded pieces."""
    from data_pipeline import music_stats

    measures = [music_stats.measure(notes, vocab, duration) for notes, duration in pieces]
    rows = [music_stats.summarize(m, vocab, long_note_s) for m in measures]
    pooled = music_stats.summarize(music_stats.combine(measures), vocab, long_note_s)
    return [{"path": name, **row} for name, row in zip(names, rows)], pooled, music_stats.percentile_ranges(rows)


def _load(paths, data_dir, dataset, split, vocab_for_midi, what: str):
    """Reads one source; skipped files go to stderr; nothing readable is an error."""
    if paths:
        names, pieces, skipped = _read_midi(paths, vocab_for_midi)
        vocab, source = vocab_for_midi, {"paths": list(paths)}
    else:
        names, pieces, skipped, vocab = _read_split(data_dir, dataset, split)
        source = {"data_dir": data_dir, "dataset": dataset, "split": split}
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if not pieces:
        raise ValueError(f"nothing to measure{what}: all {len(skipped)} files were skipped" if skipped
                         else f"nothing to measure{what}: no pieces")
    return names, pieces, skipped, vocab, source


def main(argv):
    _check_flags(argv)
    from data_pipeline import music_stats
    from data_pipeline.vocab import Vocab

    long_note_s = music_stats.LONG_NOTE_S if _LONG_NOTE_S.value is None else _LONG_NOTE_S.value
    midi_vocab = None
    if argv[1:] or _REFERENCE.value:
        midi_vocab = Vocab.load(_VOCAB.value) if _VOCAB.value else Vocab()

    names, pieces, skipped, vocab, source = _load(argv[1:], _DATA_DIR.value, _DATASET.value, _SPLIT.value,
                                                  midi_vocab, "")
    files, pooled, percentiles = _measure(names, pieces, vocab, long_note_s)
    result = {"source": source, "long_note_s": long_note_s, "files": files, "skipped": skipped, "pooled": pooled,
              "percentiles": percentiles}
    comparison = None
    if _REFERENCE.value or _REFERENCE_DATA_DIR.value:  # read before printing: a bad reference fails the command
        r_names, r_pieces, r_skipped, r_vocab, r_source = _load(
            _REFERENCE.value, _REFERENCE_DATA_DIR.value, _REFERENCE_DATASET.value, _REFERENCE_SPLIT.value,
            midi_vocab, " in the reference")
        r_files, r_pooled, r_percentiles = _measure(r_names, r_pieces, r_vocab, long_note_s)
        comparison = music_stats.compare(files, r_files, pooled)
        result["reference"] = {"source": r_source, "pieces": len(r_files), "skipped": r_skipped, "pooled": r_pooled,
                               "percentiles": r_percentiles}
        result["comparison"] = comparison

    per_file = _PER_FILE.value if _PER_FILE.value is not None else len(files) <= PER_FILE_LIMIT
    rows = [(f["path"], f) for f in files] if per_file else []
    print(music_stats.format_table(rows + [("POOLED", pooled)] + list(percentiles.items())))
    if comparison is not None:
        print(f"\nagainst the reference ({result['reference']['pieces']} pieces): pooled and per-piece median of "
              f"these {len(files)} pieces beside the reference's per-piece range")
        print(music_stats.format_comparison(comparison))
    if _OUT.value:
        outputs.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
