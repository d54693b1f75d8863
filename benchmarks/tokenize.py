r"""Tokenizer throughput: MIDI bytes -> token ids, ours against miditok's REMI, on one CPU core.

    python benchmarks/tokenize.py --midi_dir DIR [--limit N] [--repeats 3] [--out results.json]

Every `*.mid` / `*.midi` under `--midi_dir` (recursive, sorted, first `--limit`) is read into memory
first, so file I/O is excluded from the timings. Tokenizers timed on the same files:

- `ours_symusic`: `data_pipeline.encoding.encode_midi` with the default (symusic) reader;
- `ours_miditoolkit`: the same with the pure-Python miditoolkit reader;
- `miditok_remi`: `miditok.REMI(TokenizerConfig(use_programs=True))`, parsing with
  `symusic.Score.from_midi(bytes)` and encoding to ids, as miditok users do.

A first, untimed pass over all files is both the warm-up and the check: a file that any tokenizer
rejects is counted against that tokenizer and excluded for all. Notes are counted the same way for
every tokenizer: the notes symusic parses from the file (`Score.note_num()`), so notes/s compare the
same work. Each tokenizer then runs `--repeats` timed passes over the kept files; the table shows the
best pass (the least disturbed by other processes) and the JSON also has the median and every pass.
Passes are timed with the process's CPU time by default (`--clock=cpu`: the time spent on its core, so
other jobs on a shared machine do not count; note that they can still slow it through shared caches)
or with wall time (`--clock=wall`). Both clocks are recorded in the JSON.

The process is pinned to one core and numpy/BLAS thread pools are limited to 1 (environment variables
set before numpy is imported), so the numbers are per core.
"""

from __future__ import annotations

import os
import sys

# This script shares its name with the standard library's `tokenize` (used by linecache, inspect and
# others): take its own folder off the import path so that `import tokenize` finds the real one.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

# Thread pools read these once, when numpy / BLAS load: set them before any import that pulls numpy.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib import metadata  # noqa: E402

from absl import flags  # noqa: E402

from data_pipeline import encoding, outputs  # noqa: E402
from data_pipeline.vocab import Vocab  # noqa: E402
from launch import cli  # noqa: E402

_MIDI_DIR = flags.DEFINE_string("midi_dir", None, "Folder of MIDI files (searched recursively).")
_LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N files (sorted by path).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per tokenizer; the best is reported.")
_MIDITOOLKIT_REPEATS = flags.DEFINE_integer(
    "miditoolkit_repeats", 1, "Timed passes for the (slow, pure-Python) miditoolkit reader.")
_TOKENIZERS = flags.DEFINE_list("tokenizers", "ours_symusic,ours_miditoolkit,miditok_remi",
                                "Which tokenizers to run (comma-separated).")
_CLOCK = flags.DEFINE_enum(
    "clock", "cpu", ["cpu", "wall"],
    "Time with the process's CPU time (the time it ran on its core: robust to other processes sharing "
    "the machine) or with wall time (the same on an idle machine). Both go to the JSON.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")

REFERENCE = "miditok_remi"  # the `ratio` column is notes/s relative to this tokenizer
TARGET_NOTES_PER_S = 1_000_000
TARGET_RATIO = 2.0
PACKAGES = ("numpy", "symusic", "miditoolkit", "miditok")  # versions recorded in the JSON

# A tokenizer: MIDI bytes -> number of token ids (the ids themselves are built, then dropped).
Tokenizer = Callable[[bytes], int]


def make_tokenizers(names: list[str]) -> dict[str, Tokenizer]:
    vocab = Vocab()
    available: dict[str, Callable[[], Tokenizer]] = {
        "ours_symusic": lambda: lambda data: len(encoding.encode_midi(data, vocab, reader="symusic").tokens),
        "ours_miditoolkit": lambda: lambda data: len(
            encoding.encode_midi(data, vocab, reader="miditoolkit").tokens),
        "miditok_remi": _make_miditok_remi,
    }
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise cli.UsageError(f"unknown --tokenizers {unknown or names}; valid: {', '.join(available)}")
    return {name: available[name]() for name in names}


def _make_miditok_remi() -> Tokenizer:
    import miditok
    import symusic

    tokenizer = miditok.REMI(miditok.TokenizerConfig(use_programs=True))
    # use_programs=True makes REMI one stream for all tracks: encode() returns a single TokSequence.
    return lambda data: len(tokenizer.encode(symusic.Score.from_midi(data)).ids)


def find_midi(root: pathlib.Path, limit: int | None) -> list[pathlib.Path]:
    if not root.is_dir():
        raise cli.UsageError(f"--midi_dir {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())
    if not paths:
        raise cli.UsageError(f"no *.mid / *.midi files under {root}")
    return paths[:limit] if limit else paths


def count_notes(data: bytes) -> int | None:
    """Notes in the file as symusic parses them (the shared note count), or None if it cannot."""
    import symusic

    try:
        return int(symusic.Score.from_midi(data).note_num())
    except Exception:  # symusic raises RuntimeError for bad files; any failure just excludes the file
        return None


def check_pass(files: list[bytes], tokenizers: dict[str, Tokenizer]):
    """The untimed warm-up pass: which files every tokenizer accepts, and their notes and tokens.

    Returns (kept file indices, notes per kept file, {tokenizer: total tokens}, {tokenizer: failures}).
    """
    kept, notes = [], []
    tokens = dict.fromkeys(tokenizers, 0)
    failures = dict.fromkeys(tokenizers, 0)
    for i, data in enumerate(files):
        counts, ok = {}, True
        for name, tokenize in tokenizers.items():
            try:
                counts[name] = tokenize(data)
            except Exception:  # a crash of any tokenizer on a file only excludes that file
                failures[name] += 1
                ok = False
        num_notes = count_notes(data)
        if ok and num_notes:
            kept.append(i)
            notes.append(num_notes)
            for name, n in counts.items():
                tokens[name] += n
    return kept, notes, tokens, failures


def time_pass(files: list[bytes], tokenize: Tokenizer) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for one pass over `files` (in memory)."""
    gc.collect()  # start every pass from the same heap state
    cpu, wall = time.process_time(), time.perf_counter()
    for data in files:
        tokenize(data)
    return time.process_time() - cpu, time.perf_counter() - wall


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    if not _MIDI_DIR.value:
        raise cli.UsageError("--midi_dir is required")
    if _REPEATS.value < 1 or _MIDITOOLKIT_REPEATS.value < 1:
        raise cli.UsageError("--repeats and --miditoolkit_repeats must be >= 1")
    cli.prepare_output_file(_OUT.value)
    # One core: the numbers are per core, and a second core would only add scheduling noise.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    tokenizers = make_tokenizers(_TOKENIZERS.value)

    paths = find_midi(pathlib.Path(_MIDI_DIR.value), _LIMIT.value)
    files = [p.read_bytes() for p in paths]  # all I/O happens here, before any timing
    kept, notes, tokens, failures = check_pass(files, tokenizers)
    if not kept:
        raise cli.UsageError(f"none of the {len(files)} files under {_MIDI_DIR.value} could be tokenized")
    files = [files[i] for i in kept]
    total_notes = sum(notes)

    rows = []
    for name, tokenize in tokenizers.items():
        repeats = _MIDITOOLKIT_REPEATS.value if name == "ours_miditoolkit" else _REPEATS.value
        cpu, wall = zip(*(time_pass(files, tokenize) for _ in range(repeats)))
        seconds = cpu if _CLOCK.value == "cpu" else wall
        best = min(seconds)
        rows.append(dict(tokenizer=name, files=len(files), notes=total_notes, tokens=tokens[name],
                         seconds=best, seconds_median=statistics.median(seconds), repeats=repeats,
                         notes_per_s=total_notes / best, files_per_s=len(files) / best,
                         cpu_seconds=list(cpu), wall_seconds=list(wall)))
    reference = next((r for r in rows if r["tokenizer"] == REFERENCE), None)
    for row in rows:
        row["ratio"] = row["notes_per_s"] / reference["notes_per_s"] if reference else None

    header = ("tokenizer", "files", "notes", "tokens", "seconds", "notes/s", "files/s", "ratio")
    print(f"{header[0]:<18}" + "".join(f"{h:>14}" for h in header[1:]))
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['tokenizer']:<18}{r['files']:>14,}{r['notes']:>14,}{r['tokens']:>14,}{r['seconds']:>14.3f}"
              f"{r['notes_per_s']:>14,.0f}{r['files_per_s']:>14,.0f}{ratio:>14}")
    excluded = len(paths) - len(files)
    print(f"{len(paths)} files found, {excluded} excluded (failures: "
          + ", ".join(f"{k} {v}" for k, v in failures.items())
          + f"); file I/O excluded; one core; {_CLOCK.value} time, best of the repeats")

    ours = next((r for r in rows if r["tokenizer"] == "ours_symusic"), None)
    targets = {}
    if ours is not None:
        met = ours["notes_per_s"] >= TARGET_NOTES_PER_S
        targets["notes_per_s"] = dict(target=TARGET_NOTES_PER_S, met=met)
        if ours["ratio"] is not None:
            targets["ratio_vs_miditok"] = dict(target=TARGET_RATIO, met=ours["ratio"] >= TARGET_RATIO)
        print("targets (ours_symusic): "
              + ", ".join(f"{k} >= {v['target']:,}: {'met' if v['met'] else 'NOT met'}"
                          for k, v in targets.items()))

    if _OUT.value:
        result = dict(
            benchmark="tokenize",
            midi_dir=_MIDI_DIR.value,
            files_found=len(paths),
            files_excluded=excluded,
            failures=failures,
            io_excluded=True,
            cores=1,
            clock=_CLOCK.value,
            note_count="symusic Score.note_num() of each file, the same for every tokenizer",
            rows=rows,
            targets=targets,
            environment=dict(python=platform.python_version(), machine=platform.machine(),
                             processor=platform.processor() or "?",
                             packages={p: _version(p) for p in PACKAGES}),
        )
        outputs.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
