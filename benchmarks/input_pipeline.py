r"""Input pipeline throughput: training tokens per second delivered by one CPU core, with MuseNet's
augmentations on, to set beside what the model consumes.

    python benchmarks/input_pipeline.py [--midi_dir DIR] [--seq_len 2048] [--batch_size 8]
        [--num_batches 50] [--repeats 3] [--worker_count 2] [--model_tokens_per_s X] [--out results.json]

Every `*.mid` / `*.midi` under `--midi_dir` (default: the repository's test fixtures) is encoded into
records in memory first (`input_pipeline.record_from_piece`), so MIDI parsing and storage reads are
excluded: the timings are the pipeline's own work (shuffle, window, augment, features, batch).

Rows, each `--num_batches` batches of `batch_size` x `seq_len` after 2 untimed warm-up batches, best
of `--repeats` runs:

- `none`, `transpose`, `volume`, `stretch`, `all`: which augmentations are on; built in this process
  (worker_count 0, no reader threads) pinned to one core, so tokens/s is per core.
- `all_workers_N` (with `--worker_count N`): all augmentations, N Grain worker processes on every
  core the process may use; tokens/s is the total, tokens/s/worker is divided by N.

`tokens` counts every position of a batch (B x L, what the model reads); `scored` counts the targets
the loss uses (`loss_mask`). The model column: pass the `small` model's training consumption in
tokens/s as `--model_tokens_per_s` (measured by the trainer's benchmark) and the table and JSON
compare it with the `all` row; the target is >= 20x. Until then it stays empty (null in the JSON).
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (imported by linecache, inspect,
# dataclasses) when this folder is first on the import path: take it off.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

# Thread pools read these once, when numpy / BLAS load: set them before any import that pulls numpy.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

from absl import flags  # noqa: E402

from data_pipeline import encoding, midi_io, outputs  # noqa: E402
from data_pipeline import input_pipeline as ip  # noqa: E402
from data_pipeline.vocab import Vocab  # noqa: E402
from launch import cli  # noqa: E402

_DEFAULT_MIDI_DIR = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "midi"

_MIDI_DIR = flags.DEFINE_string("midi_dir", None, "Folder of MIDI files (recursive); default: the test fixtures.")
_LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N files (sorted by path).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Window length L in tokens (the model's context).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Timed batches per run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per row; the best is reported.")
_WORKER_COUNT = flags.DEFINE_integer("worker_count", 0, "Also time N Grain worker processes (0: skip).")
_MODEL_TOKENS_PER_S = flags.DEFINE_float(
    "model_tokens_per_s", None, "Training tokens/s the `small` model consumes, for the ratio column.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")

WARMUP_BATCHES = 2
TARGET_RATIO = 20.0  # the pipeline must deliver >= 20x what the `small` model consumes
PACKAGES = ("numpy", "grain", "symusic")
AUGMENTATIONS = {
    "none": dict(transpose=False, volume=False, stretch=False),
    "transpose": dict(transpose=True, volume=False, stretch=False),
    "volume": dict(transpose=False, volume=True, stretch=False),
    "stretch": dict(transpose=False, volume=False, stretch=True),
    "all": dict(transpose=True, volume=True, stretch=True),
}


def load_records(root: pathlib.Path, limit: int | None, vocab: Vocab) -> tuple[list[dict], int]:
    """Records of every usable MIDI file under `root`, and how many files were skipped."""
    if not root.is_dir():
        raise cli.UsageError(f"--midi_dir {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())
    paths = paths[:limit] if limit else paths
    records = []
    for path in paths:
        try:
            piece = encoding.encode_midi(path, vocab)
        except midi_io.MidiError:
            continue
        records.append(ip.record_from_piece(piece, vocab, path=path.name))
    if not records:
        raise cli.UsageError(f"no usable *.mid / *.midi files under {root}")
    return records, len(paths) - len(records)


def time_run(records: list[dict], vocab: Vocab, config: ip.InputConfig, num_batches: int):
    """(wall seconds, CPU seconds of this process, tokens, scored tokens) for `num_batches` batches
    after the warm-up ones."""
    it = ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1)
    for _ in range(WARMUP_BATCHES):  # also waits for worker processes to start
        next(it)
    gc.collect()
    tokens = scored = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(it)
        tokens += batch["inputs"].size
        scored += int(batch["loss_mask"].sum())
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    it.close()  # stops worker processes now rather than at garbage collection
    return seconds, cpu_seconds, tokens, scored


def measure(name: str, records, vocab, config: ip.InputConfig, workers: int) -> dict:
    runs = [time_run(records, vocab, config, _NUM_BATCHES.value) for _ in range(_REPEATS.value)]
    seconds, _, tokens, scored = min(runs)
    # CPU time counts only this process: meaningful for in-process rows, where it is immune to other
    # processes competing for the core.
    cpu_seconds = min(r[1] for r in runs) if workers == 0 else None
    return dict(row=name, augmentations=[k for k, v in AUGMENTATIONS["all"].items() if getattr(config, k)],
                workers=workers, cores=1 if workers == 0 else len(_allowed_cores()), batches=_NUM_BATCHES.value,
                tokens=tokens, scored_tokens=scored, seconds=seconds,
                seconds_median=statistics.median(r[0] for r in runs), repeats=len(runs),
                tokens_per_s=tokens / seconds, scored_tokens_per_s=scored / seconds,
                tokens_per_s_per_worker=tokens / seconds / max(workers, 1),
                cpu_seconds=cpu_seconds, tokens_per_cpu_s=tokens / cpu_seconds if cpu_seconds else None,
                ms_per_batch=1000 * seconds / _NUM_BATCHES.value)


def _allowed_cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    for flag in (_SEQ_LEN, _BATCH_SIZE, _NUM_BATCHES, _REPEATS):
        if flag.value < 1:
            raise cli.UsageError(f"--{flag.name} must be >= 1")
    cli.prepare_output_file(_OUT.value)
    if _WORKER_COUNT.value < 0:
        raise cli.UsageError("--worker_count must be >= 0")
    model_rate = _MODEL_TOKENS_PER_S.value
    if model_rate is not None and model_rate <= 0:
        raise cli.UsageError("--model_tokens_per_s must be > 0")
    vocab = Vocab()
    midi_dir = pathlib.Path(_MIDI_DIR.value) if _MIDI_DIR.value else _DEFAULT_MIDI_DIR
    records, skipped = load_records(midi_dir, _LIMIT.value, vocab)
    base = ip.InputConfig(seq_len=_SEQ_LEN.value, batch_size=_BATCH_SIZE.value, seed=0, read_threads=0)
    if base.seq_len <= ip.max_prefix_len(vocab):
        raise cli.UsageError(f"--seq_len must exceed the longest prefix ({ip.max_prefix_len(vocab)} tokens)")

    all_cores = _allowed_cores()
    rows = []
    if hasattr(os, "sched_setaffinity"):  # one core: the in-process numbers are per core
        os.sched_setaffinity(0, {min(all_cores)})
    for name, switches in AUGMENTATIONS.items():
        rows.append(measure(name, records, vocab, dataclasses.replace(base, **switches), workers=0))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, all_cores)
    if _WORKER_COUNT.value:
        n = _WORKER_COUNT.value
        rows.append(measure(f"all_workers_{n}", records, vocab, dataclasses.replace(base, worker_count=n),
                            workers=n))
    per_core = next(r for r in rows if r["row"] == "all")["tokens_per_s"]
    ratio = per_core / model_rate if model_rate else None
    for row in rows:
        row["ratio_vs_model"] = row["tokens_per_s_per_worker"] / model_rate if model_rate else None

    header = ("row", "cores", "batches", "tokens", "seconds", "tokens/s", "scored/s", "tok/s/worker",
              "tok/cpu-s", "ms/batch", "model tok/s", "ratio")
    print(f"{header[0]:<16}" + "".join(f"{h:>13}" for h in header[1:]))
    for r in rows:
        model = f"{model_rate:,.0f}" if model_rate else "-"
        ratio_text = f"{r['ratio_vs_model']:.1f}" if r["ratio_vs_model"] is not None else "-"
        cpu_rate = f"{r['tokens_per_cpu_s']:,.0f}" if r["tokens_per_cpu_s"] else "-"
        print(f"{r['row']:<16}{r['cores']:>13}{r['batches']:>13,}{r['tokens']:>13,}{r['seconds']:>13.3f}"
              f"{r['tokens_per_s']:>13,.0f}{r['scored_tokens_per_s']:>13,.0f}"
              f"{r['tokens_per_s_per_worker']:>13,.0f}{cpu_rate:>13}{r['ms_per_batch']:>13.2f}"
              f"{model:>13}{ratio_text:>13}")
    print(f"{len(records)} pieces ({skipped} files skipped), L={base.seq_len}, B={base.batch_size}; "
          f"MIDI parsing excluded; best of {_REPEATS.value}")
    if ratio is None:
        print(f"target: >= {TARGET_RATIO:g}x the `small` model's tokens/s per core: "
              "model rate not given (--model_tokens_per_s)")
    else:
        print(f"target: >= {TARGET_RATIO:g}x the `small` model's tokens/s per core: {ratio:.1f}x, "
              f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}")

    if _OUT.value:
        result = dict(
            benchmark="input_pipeline",
            midi_dir=str(midi_dir),
            pieces=len(records),
            files_skipped=skipped,
            body_tokens=int(sum(len(r["tokens"]) for r in records)),
            config=dataclasses.asdict(base),
            rows=rows,
            # The model side: filled from --model_tokens_per_s once the `small` model has a benchmark.
            model=dict(config="small", tokens_per_s=model_rate),
            targets=dict(ratio_vs_model=dict(target=TARGET_RATIO, ratio=ratio,
                                             met=None if ratio is None else ratio >= TARGET_RATIO)),
            environment=dict(python=platform.python_version(), machine=platform.machine(),
                             processor=platform.processor() or "?", cpu_count=os.cpu_count(),
                             packages={p: _version(p) for p in PACKAGES}),
        )
        outputs.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
