r"""musenet-eval: how well a model predicts held-out music, in bits per token, per note and per second.

    musenet-eval --model=exports/tiny --midi_dir=held_out/ [--label=classical] --out=results.json
    musenet-eval --workdir=runs/tiny [--step=600] --split=test --data_dir=data [--dataset=default]
    [--attention_impl=cpu]

The model comes from an export directory (--model) or a training workdir (--workdir; newest checkpoint
unless --step). The music is every *.mid / *.midi under --midi_dir (recursive, sorted; encoded with the
model's vocabulary; files that cannot be read are skipped and listed) or the pieces of a built dataset
split (--split, --data_dir, --dataset; the dataset's vocabulary must be the model's).

Every body token is scored once by sliding windows of the model's context L with stride --stride
(default L / 2), see `musenet_jax.evaluation`. Prints one row per piece and a TOTAL row; --out writes:

    {"model": str, "step": int, "attention_impl": str, "source": {...}, "context_tokens": L, "stride": S,
     "files": [{"path", "tokens", "notes", "seconds", "total_bits", "total_bits_no_velocity",
                "bits_per_token", "bits_per_note", "bits_per_second", "bits_per_second_no_velocity"}],
     "skipped": [{"path", "reason"}], "total": {the same fields but path}}

Totals are sums of bits over sums of tokens / notes / seconds. A ratio whose denominator is 0 is null.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "musenet-train workdir: evaluate one of its checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step with --workdir (default: the newest).")
_MODEL = flags.DEFINE_string("model", None, "Export directory written by musenet-export.")
_MIDI_DIR = flags.DEFINE_string("midi_dir", None, "Directory of .mid/.midi files to score (searched recursively).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split to score (e.g. test), with --data_dir.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory holding the built musenet_midi dataset.")
_DATASET = flags.DEFINE_string("dataset", "default", "Dataset config name under --data_dir.")
_LABEL = flags.DEFINE_string("label", None, "Label to condition --midi_dir pieces on (default: none).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_STRIDE = flags.DEFINE_integer("stride", None, "Body tokens between window ends (default: context / 2).")
_MAX_FILES = flags.DEFINE_integer("max_files", None, "Score at most this many files / records (the first ones).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here (atomically).")
_ATTENTION_IMPL = flags.DEFINE_string(
    "attention_impl", None, "Score with this attention implementation (reference, xla, cpu, pallas) instead of "
    "the model's own, e.g. 'cpu' on a CPU for a model trained with 'pallas' (which CPUs only interpret, slowly).")

MIDI_SUFFIXES = (".mid", ".midi")


def _check_flags(argv) -> None:
    """Every flag combination error, before JAX is imported."""
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if bool(_WORKDIR.value) == bool(_MODEL.value):
        raise cli.UsageError("give exactly one of --workdir or --model")
    if _STEP.value is not None and not _WORKDIR.value:
        raise cli.UsageError("--step goes with --workdir")
    if bool(_MIDI_DIR.value) == bool(_SPLIT.value):
        raise cli.UsageError("give exactly one of --midi_dir or --split")
    if _SPLIT.value and not _DATA_DIR.value:
        raise cli.UsageError("--split needs --data_dir")
    if _MIDI_DIR.value and (_DATA_DIR.value or flags.FLAGS["dataset"].present):
        raise cli.UsageError("--data_dir and --dataset go with --split, not --midi_dir")
    if _LABEL.value is not None and not _MIDI_DIR.value:
        raise cli.UsageError("--label goes with --midi_dir (dataset records carry their own labels)")
    for flag, low in ((_BATCH_SIZE, 1), (_STRIDE, 1), (_MAX_FILES, 1)):
        if flag.value is not None and flag.value < low:
            raise cli.UsageError(f"--{flag.name} must be >= {low}, got {flag.value}")
    for flag in (_WORKDIR, _MODEL, _MIDI_DIR, _DATA_DIR):
        if flag.value and not os.path.isdir(flag.value):
            raise ValueError(f"{flag.value}: no such directory (--{flag.name})")
    if _OUT.value:
        parent = os.path.dirname(os.path.abspath(_OUT.value))
        if os.path.isdir(_OUT.value) or not os.path.isdir(parent):
            raise ValueError(f"{_OUT.value}: cannot write there (--out must be a file in an existing directory)")


def _midi_pieces(vocab, evaluation):
    """(pieces, skipped) for --midi_dir: every MIDI file, encoded; unusable ones listed with the reason."""
    from data_pipeline import encoding
    from data_pipeline.midi_io import MidiError

    root = pathlib.Path(_MIDI_DIR.value)
    # Not is_file(): a broken link is then listed as skipped, not silently left out.
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and not p.is_dir())
    if not files:
        raise ValueError(f"{root}: no .mid or .midi files")
    if _MAX_FILES.value:
        files = files[:_MAX_FILES.value]
    label = _LABEL.value
    if label is not None:
        vocab.label_token(label)  # an unknown label is a usage error, not a per-file one
    pieces, skipped = [], []
    for path in files:
        try:
            piece = encoding.encode_midi(path, vocab, label=label, path=path)
        except MidiError as e:
            skipped.append({"path": str(path), "reason": e.reason})
            continue
        except OSError as e:
            skipped.append({"path": str(path), "reason": e.strerror or type(e).__name__})
            continue
        pieces.append(evaluation.EvalPiece.from_encoded(piece, vocab, name=str(path)))
    return pieces, skipped


def _split_pieces(vocab, evaluation):
    """(pieces, skipped) for --split: the split's records; the dataset's vocabulary must be the model's."""
    from data_pipeline import datasets

    data_vocab = datasets.load_vocab(_DATA_DIR.value, _DATASET.value)
    if data_vocab != vocab:
        raise ValueError(f"the model's vocabulary differs from the dataset's ({_DATA_DIR.value} {_DATASET.value}; "
                         f"model vs dataset: {vocab.config.differences(data_vocab.config)}); evaluate with "
                         "--midi_dir instead")
    try:
        source = datasets.data_source(_DATA_DIR.value, _DATASET.value, _SPLIT.value)
    except (ValueError, KeyError) as e:
        built = datasets.load_metadata(_DATA_DIR.value, _DATASET.value).get("examples", {})
        if built.get(_SPLIT.value) == 0:  # TFDS does not register an empty split
            raise ValueError(f"{_DATA_DIR.value} {_DATASET.value}: split {_SPLIT.value!r} has no records (this "
                             f"build: {', '.join(f'{k} {v}' for k, v in built.items())})") from None
        raise ValueError(f"{_DATA_DIR.value} {_DATASET.value}: cannot open split {_SPLIT.value!r} "
                         f"({' '.join(str(e).split())[:200]})") from None
    count = len(source) if not _MAX_FILES.value else min(len(source), _MAX_FILES.value)
    pieces, skipped = [], []
    for i in range(count):
        try:
            piece = evaluation.EvalPiece.from_record(source[i], vocab)
        except ValueError as e:
            skipped.append({"path": f"{_SPLIT.value}[{i}]", "reason": str(e)})
            continue
        pieces.append(piece if piece.name else
                      evaluation.EvalPiece(f"{_SPLIT.value}[{i}]", piece.prefix, piece.body, piece.features,
                                           piece.duration_units))
    if not count:
        raise ValueError(f"{_DATA_DIR.value} {_DATASET.value}: split {_SPLIT.value!r} is empty")
    return pieces, skipped


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """One line per (name, metrics) row, fixed-width columns."""
    headers = ("file", "tokens", "notes", "seconds", "bits/token", "bits/note", "bits/s", "bits/s (no vel)")
    width = min(max([len(headers[0])] + [len(name) for name, _ in rows]), 48)
    lines = [f"{headers[0]:<{width}} " + " ".join(f"{h:>{max(len(h), 9)}}" for h in headers[1:])]
    for name, m in rows:
        if len(name) > width:
            name = "..." + name[-(width - 3):]
        cells = (str(m["tokens"]), str(m["notes"]), f"{m['seconds']:.1f}", _fmt(m["bits_per_token"], ".3f"),
                 _fmt(m["bits_per_note"], ".2f"), _fmt(m["bits_per_second"], ".1f"),
                 _fmt(m["bits_per_second_no_velocity"], ".1f"))
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>{max(len(h), 9)}}" for c, h in zip(cells, headers[1:])))
    return "\n".join(lines)


def main(argv):
    _check_flags(argv)
    from musenet_jax import attention, evaluation, export  # after flag parsing: importing JAX is slow

    if _ATTENTION_IMPL.value is not None and _ATTENTION_IMPL.value not in attention.IMPLS:
        raise cli.UsageError(f"--attention_impl must be one of {', '.join(attention.IMPLS)}, "
                             f"got {_ATTENTION_IMPL.value!r}")

    if _WORKDIR.value:
        model, vocab, step = export.load_checkpoint(_WORKDIR.value, _STEP.value, _ATTENTION_IMPL.value)
        model_path = _WORKDIR.value
    else:
        meta, _, _ = export.read_export_config(_MODEL.value)
        model, vocab = export.load_export(_MODEL.value, attention_impl=_ATTENTION_IMPL.value)
        step, model_path = int(meta["step"]), _MODEL.value
    if _MIDI_DIR.value:
        pieces, skipped = _midi_pieces(vocab, evaluation)
        source = {"midi_dir": _MIDI_DIR.value, "label": _LABEL.value}
    else:
        pieces, skipped = _split_pieces(vocab, evaluation)
        source = {"data_dir": _DATA_DIR.value, "dataset": _DATASET.value, "split": _SPLIT.value}
    for s in skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if not pieces:
        raise ValueError(f"nothing to score: all {len(skipped)} files were skipped")

    seq_len = model.config.max_len
    room = seq_len + 1 - max(len(p.prefix) for p in pieces)  # body tokens a window holds
    if room < 1:
        raise ValueError(f"the model's context ({seq_len} tokens) is too short for these pieces' prefixes")
    stride = _STRIDE.value or min(evaluation.default_stride(seq_len), room)
    if stride > room:
        raise cli.UsageError(f"--stride must be at most {room} (context {seq_len} + 1 - longest prefix)")

    t0 = time.perf_counter()
    scorer = evaluation.Scorer(model, vocab, batch_size=_BATCH_SIZE.value)
    scores = evaluation.score_pieces(scorer, pieces, stride=stride)
    total = evaluation.total_metrics(scores)
    print(f"scored {total['tokens']} tokens of {len(scores)} pieces in {time.perf_counter() - t0:.1f} s "
          f"(context {seq_len}, stride {stride})", file=sys.stderr)

    print(format_table([(s.name, s.metrics()) for s in scores] + [("TOTAL", total)]))
    if _OUT.value:
        result = {"model": model_path, "step": step, "attention_impl": model.config.attention_impl, "source": source,
                  "context_tokens": seq_len, "stride": stride,
                  "files": [{"path": s.name, **s.metrics()} for s in scores], "skipped": skipped, "total": total}
        cli.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
