r"""musenet-eval: how well a model predicts held-out music, in bits per token, per note and per second.

    musenet-eval --model=exports/tiny --midi_dir=held_out/ [--label=classical] --out=results.json
        [--baseline_data_dir=data [--dataset=default] | --baseline_train=train_midi/]
    musenet-eval --workdir=runs/tiny [--step=600] --split=test --data_dir=data [--dataset=default]
    [--attention_impl=cpu] [--baseline_order=N] [--baselines=false]

The model comes from an export directory (--model) or a training workdir (--workdir; newest checkpoint
unless --step; a checkpoint that fails its manifest check is refused in one line listing the other steps).
The music is every *.mid / *.midi under --midi_dir (recursive, sorted; encoded with the
model's vocabulary; files that cannot be read are skipped and listed) or the pieces of a built dataset
split (--split, --data_dir, --dataset; the dataset's vocabulary must be the model's).

Every body token is scored once by sliding windows of the model's context L with stride --stride
(default L / 2), see `musenet_jax.evaluation`. Prints one row per piece and a TOTAL row.

Baselines (on by default; --baselines=false turns them off): a unigram and a smoothed n-gram
(interpolated modified Kneser-Ney, `musenet_jax.ngram`; the unigram is its order 1), scored by the same
windows on exactly the same tokens, in bits/token and velocity-free bits/s. They train on the
--baseline_split (default train) of the dataset: --data_dir's with --split, --baseline_data_dir's with
--midi_dir; or on the MIDI files under --baseline_train (encoded like --midi_dir's). --midi_dir with
neither computes no n-gram (a note on stderr says how to get one). The order is --baseline_order, or
(0, the default) the one of 1..5 with the lowest bits/token on the dataset's validation split; without
one, every 20th training record / file (by index) is held out for that choice, and the chosen order is
then fitted on all of them. At most --baseline_max_tokens training tokens are read, spread over the data.
A summary table follows the per-piece one: model, unigram and n-gram rows, and a line comparing the
model with the n-gram.

--out writes:

    {"model": str, "step": int, "attention_impl": str, "source": {...}, "context_tokens": L, "stride": S,
     "files": [{"path", "tokens", "notes", "seconds", "total_bits", "total_bits_no_velocity",
                "bits_per_token", "bits_per_note", "bits_per_second", "bits_per_second_no_velocity"}],
     "skipped": [{"path", "reason"}], "total": {the same fields but path},
     "baselines": null | {"unigram": {the total fields},
                          "ngram": {"order": k, "validation_bits_per_token": {"1": x, ..., "5": y} | null (order
                                    given), "train_tokens": int, "train_pieces": int,
                                    "train_source": {"data_dir", "dataset", "split" | "midi_dir", "label";
                                                     "order_chosen_on"}, the total fields}},
     "model_vs_ngram": null | {"bits_per_token_ratio": model / n-gram,
                               "bits_per_second_no_velocity_ratio": model / n-gram}}

Totals are sums of bits over sums of tokens / notes / seconds. A ratio whose denominator is 0 is null.

Infilling and accompaniment (`--task=infill|accompany`, `musenet_jax.infill_scoring`): --spans_per_piece spans of
every piece, drawn as training draws them (the same spans for every model, seeded by --task_seed), each scored
twice on the same tokens, the regenerated notes' events: as the middle of its infilling sequence (the model sees
the span's future, or the given parts) and by left-to-right continuation of the piece (it sees only the past). The
model needs the vocabulary's infilling tokens. Baselines do not apply. --out writes

    {"model", "step", "task", "source", "context_tokens", "spans_per_piece", "task_seed", "skipped_spans": int,
     "total": {"spans", "event_tokens", "infill_bits_per_event", "continuation_bits_per_event",
               "infill_bits_per_event_no_velocity", "continuation_bits_per_event_no_velocity",
               "infill_gain": 1 - infill / continuation, "middle_tokens", "infill_bits_per_middle_token",
               "by_kind": {"every part" | "some parts": {the same fields but by_kind}}}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

from absl import flags

from data_pipeline import outputs, windows
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

_TASK = flags.DEFINE_enum("task", "continue", ["continue", "infill", "accompany"],
                          "What to score: every token by continuation, or spans by infilling / accompaniment "
                          "beside continuation on the same tokens.")
_SPANS_PER_PIECE = flags.DEFINE_integer("spans_per_piece", 4, "Spans drawn per piece with --task=infill|accompany.")
_TASK_SEED = flags.DEFINE_integer("task_seed", 0, "Seed of the spans drawn with --task=infill|accompany.")

_BASELINES = flags.DEFINE_bool(
    "baselines", True, "Also score a unigram and the best smoothed n-gram (interpolated Kneser-Ney) on the same "
    "tokens; they train on --split's dataset, --baseline_data_dir or --baseline_train.")
_BASELINE_SPLIT = flags.DEFINE_string(
    "baseline_split", "train", "Split of the dataset (--data_dir with --split, or --baseline_data_dir) the baselines "
    "train on.")
_BASELINE_ORDER = flags.DEFINE_integer(
    "baseline_order", 0, "n-gram order; 0: the best of 1..5 on held-out data (the dataset's validation split, else "
    "every 20th training record or file).")
_BASELINE_DATA_DIR = flags.DEFINE_string(
    "baseline_data_dir", None, "With --midi_dir: a built dataset with the model's vocabulary (config --dataset) whose "
    "--baseline_split trains the baselines.")
_BASELINE_TRAIN = flags.DEFINE_string(
    "baseline_train", None, "With --midi_dir: a folder of MIDI files (encoded like --midi_dir's, with --label) the "
    "baselines train on.")
_BASELINE_MAX_TOKENS = flags.DEFINE_integer(
    "baseline_max_tokens", 10_000_000, "Train the baselines on at most this many tokens (records or files spread "
    "evenly over the data).")

MIDI_SUFFIXES = (".mid", ".midi")
MAX_BASELINE_ORDER = 10
HELD_OUT_EVERY = 20  # without a validation split, every 20th training record / file chooses the n-gram order
HELD_OUT_MAX_TOKENS = 1_000_000  # of a validation split, spread over it: plenty to rank five orders


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
    if _MIDI_DIR.value and (_DATA_DIR.value or (flags.FLAGS["dataset"].present and not _BASELINE_DATA_DIR.value)):
        raise cli.UsageError("--data_dir and --dataset go with --split, not --midi_dir (--dataset also goes with "
                             "--baseline_data_dir)")
    if _TASK.value != "continue":
        baseline = [f"--{name}" for name in ("stride", "baselines", "baseline_split", "baseline_order",
                                             "baseline_data_dir", "baseline_train", "baseline_max_tokens")
                    if flags.FLAGS[name].present]
        if baseline:
            raise cli.UsageError(f"{', '.join(baseline)} do(es) not apply to --task={_TASK.value} (each span is one "
                                 f"window; no baselines)")
    else:
        for flag in (_SPANS_PER_PIECE, _TASK_SEED):
            if flags.FLAGS[flag.name].present:
                raise cli.UsageError(f"--{flag.name} goes with --task=infill or --task=accompany")
        _check_baseline_flags()
    if _SPANS_PER_PIECE.value < 1:
        raise cli.UsageError(f"--spans_per_piece must be >= 1, got {_SPANS_PER_PIECE.value}")
    if _LABEL.value is not None and not _MIDI_DIR.value:
        raise cli.UsageError("--label goes with --midi_dir (dataset records carry their own labels)")
    for flag, low in ((_BATCH_SIZE, 1), (_STRIDE, 1), (_MAX_FILES, 1)):
        if flag.value is not None and flag.value < low:
            raise cli.UsageError(f"--{flag.name} must be >= {low}, got {flag.value}")
    for flag in (_WORKDIR, _MODEL, _MIDI_DIR, _DATA_DIR, _BASELINE_DATA_DIR, _BASELINE_TRAIN):
        if flag.value and not os.path.isdir(flag.value):
            raise ValueError(f"{flag.value}: no such directory (--{flag.name})")
    if _OUT.value:
        parent = os.path.dirname(os.path.abspath(_OUT.value))
        if os.path.isdir(_OUT.value) or not os.path.isdir(parent):
            raise ValueError(f"{_OUT.value}: cannot write there (--out must be a file in an existing directory)")


def _check_baseline_flags() -> None:
    present = [f"--{name}" for name in ("baseline_split", "baseline_order", "baseline_data_dir", "baseline_train",
                                         "baseline_max_tokens") if flags.FLAGS[name].present]
    if not _BASELINES.value:
        if present:
            raise cli.UsageError(f"{present[0]} goes with --baselines (--baselines=false turns them off)")
        return
    if _SPLIT.value and (_BASELINE_DATA_DIR.value or _BASELINE_TRAIN.value):
        raise cli.UsageError("--baseline_data_dir and --baseline_train go with --midi_dir (with --split the baselines "
                             "train on that dataset's --baseline_split)")
    if _BASELINE_DATA_DIR.value and _BASELINE_TRAIN.value:
        raise cli.UsageError("give at most one of --baseline_data_dir or --baseline_train")
    if flags.FLAGS["baseline_split"].present and not (_SPLIT.value or _BASELINE_DATA_DIR.value):
        raise cli.UsageError("--baseline_split names a split of a dataset: it goes with --split or --baseline_data_dir")
    if not 0 <= _BASELINE_ORDER.value <= MAX_BASELINE_ORDER:
        raise cli.UsageError(f"--baseline_order must be in 0..{MAX_BASELINE_ORDER} (0: the best of 1..5), got "
                             f"{_BASELINE_ORDER.value}")
    if _BASELINE_MAX_TOKENS.value < 1:
        raise cli.UsageError(f"--baseline_max_tokens must be >= 1, got {_BASELINE_MAX_TOKENS.value}")


def _midi_files(root: pathlib.Path) -> list[pathlib.Path]:
    # Not is_file(): a broken link is then listed as skipped, not silently left out.
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and not p.is_dir())


def _encode(path: pathlib.Path, vocab):
    """(EncodedPiece, None) or (None, the reason it cannot be used)."""
    from data_pipeline import encoding
    from data_pipeline.midi_io import MidiError

    try:
        return encoding.encode_midi(path, vocab, label=_LABEL.value, path=path), None
    except MidiError as e:
        return None, e.reason
    except OSError as e:
        return None, e.strerror or type(e).__name__


def _midi_pieces(vocab, evaluation):
    """(pieces, skipped) for --midi_dir: every MIDI file, encoded; unusable ones listed with the reason."""
    root = pathlib.Path(_MIDI_DIR.value)
    files = _midi_files(root)
    if not files:
        raise ValueError(f"{root}: no .mid or .midi files")
    if _MAX_FILES.value:
        files = files[:_MAX_FILES.value]
    label = _LABEL.value
    if label is not None:
        vocab.label_token(label)  # an unknown label is a usage error, not a per-file one
    pieces, skipped = [], []
    for path in files:
        piece, reason = _encode(path, vocab)
        if piece is None:
            skipped.append({"path": str(path), "reason": reason})
            continue
        pieces.append(evaluation.EvalPiece.from_encoded(piece, vocab, name=str(path)))
    return pieces, skipped


def _check_dataset_vocab(data_dir: str, vocab, instead: str) -> None:
    from data_pipeline import datasets

    data_vocab = datasets.load_vocab(data_dir, _DATASET.value)
    if data_vocab != vocab:
        raise ValueError(f"the model's vocabulary differs from the dataset's ({data_dir} {_DATASET.value}; "
                         f"model vs dataset: {vocab.config.differences(data_vocab.config)}); {instead}")


def _open_split(data_dir: str, split: str, *, missing_ok: bool = False):
    """A dataset split as a source; one-line errors for a split that is missing or empty (None if missing_ok)."""
    from data_pipeline import datasets

    try:
        return datasets.data_source(data_dir, _DATASET.value, split)
    except (ValueError, KeyError) as e:
        if missing_ok:
            return None
        built = datasets.load_metadata(data_dir, _DATASET.value).get("examples", {})
        if built.get(split) == 0:  # TFDS does not register an empty split
            raise ValueError(f"{data_dir} {_DATASET.value}: split {split!r} has no records (this "
                             f"build: {', '.join(f'{k} {v}' for k, v in built.items())})") from None
        raise ValueError(f"{data_dir} {_DATASET.value}: cannot open split {split!r} "
                         f"({' '.join(str(e).split())[:200]})") from None


def _split_pieces(vocab, evaluation):
    """(pieces, skipped) for --split: the split's records; the dataset's vocabulary must be the model's."""
    _check_dataset_vocab(_DATA_DIR.value, vocab, "evaluate with --midi_dir instead")
    source = _open_split(_DATA_DIR.value, _SPLIT.value)
    count = len(source) if not _MAX_FILES.value else min(len(source), _MAX_FILES.value)
    pieces, skipped = [], []
    for i in range(count):
        try:
            piece = windows.parse_record(source[i], vocab)
        except ValueError as e:
            skipped.append({"path": f"{_SPLIT.value}[{i}]", "reason": str(e)})
            continue
        pieces.append(piece if piece.name else dataclasses.replace(piece, path=f"{_SPLIT.value}[{i}]"))
    if not count:
        raise ValueError(f"{_DATA_DIR.value} {_DATASET.value}: split {_SPLIT.value!r} is empty")
    return pieces, skipped


# -- baselines ---------------------------------------------------------------------------------------
def _baseline_data(vocab):
    """(train, held out or None, what they are: a dict for the JSON) for the baselines; None without data.

    Dataset: --baseline_split of --data_dir (with --split) or --baseline_data_dir; held out: its validation
    split when the order is to be chosen. MIDI (--baseline_train): every file, encoded like --midi_dir's.
    Records / files are read spread over the data up to --baseline_max_tokens.
    """
    from musenet_jax import ngram

    data_dir = _DATA_DIR.value if _SPLIT.value else _BASELINE_DATA_DIR.value
    if data_dir:
        if _BASELINE_DATA_DIR.value:
            _check_dataset_vocab(data_dir, vocab, "train the baselines on MIDI files with --baseline_train instead")
        source = _open_split(data_dir, _BASELINE_SPLIT.value)
        train = ngram.read_sequences(source, vocab, indices=ngram.spread_order(len(source)),
                                     max_tokens=_BASELINE_MAX_TOKENS.value)
        what = {"data_dir": data_dir, "dataset": _DATASET.value, "split": _BASELINE_SPLIT.value}
        held_out = None
        if _BASELINE_ORDER.value == 0 and _BASELINE_SPLIT.value != "validation":
            validation = _open_split(data_dir, "validation", missing_ok=True)  # missing when built empty
            if validation is not None and len(validation):
                held_out = ngram.read_sequences(validation, vocab, indices=ngram.spread_order(len(validation)),
                                                max_tokens=HELD_OUT_MAX_TOKENS)
                what["order_chosen_on"] = "validation split"
        if not train.tokens:
            raise ValueError(f"{data_dir} {_DATASET.value}: split {_BASELINE_SPLIT.value!r} has no usable records "
                             "for the baselines")
        return train, held_out, what
    if not _BASELINE_TRAIN.value:
        print("note: no n-gram baseline computed: --midi_dir needs --baseline_data_dir=DATA (a built dataset with "
              "the model's vocabulary) or --baseline_train=DIR (MIDI files) to train one", file=sys.stderr)
        return None
    files = _midi_files(pathlib.Path(_BASELINE_TRAIN.value))

    def get(i: int):
        piece, _ = _encode(files[i], vocab)
        return None if piece is None else (piece.tokens, piece.prefix_len)

    train = ngram.gather(ngram.spread_order(len(files)), get, max_tokens=_BASELINE_MAX_TOKENS.value)
    if not train.tokens:
        raise ValueError(f"{_BASELINE_TRAIN.value}: no usable MIDI files to train the baselines on "
                         f"({len(files)} .mid / .midi files, {len(train.skipped)} unreadable)")
    return train, None, {"midi_dir": _BASELINE_TRAIN.value, "label": _LABEL.value}


def _fit_baselines(train, held_out, what: dict, vocab) -> tuple[object, object, dict]:
    """(unigram, n-gram, its JSON description): the n-gram of --baseline_order, or the order of 1..5 with the
    lowest held-out bits/token. Without held-out data every 20th training item is held out for the choice,
    then the chosen order is fitted on all of them."""
    from musenet_jax import ngram

    order, bits = _BASELINE_ORDER.value, None
    if order:
        model = ngram.NgramModel.fit(train.tokens, vocab.size, order)
    else:
        fit_on = train
        if held_out is None:
            fit_on, held_out = ngram.hold_out(train, HELD_OUT_EVERY)
            if not held_out.tokens:
                raise ValueError(f"one training {'record' if 'dataset' in what else 'file'} is too little to choose "
                                 "the n-gram order on held-out data; give --baseline_order")
            what["order_chosen_on"] = f"every {HELD_OUT_EVERY}th training {'record' if 'dataset' in what else 'file'}"
        model = ngram.NgramModel.fit(fit_on.tokens, vocab.size, max(ngram.DEFAULT_ORDERS))
        order, bits = ngram.select_order(model, held_out.tokens, ngram.DEFAULT_ORDERS,
                                         context_lengths=held_out.prefix_lengths)
        model = (model.with_order(order) if fit_on is train else
                 ngram.NgramModel.fit(train.tokens, vocab.size, order))
    info = {"order": order, "validation_bits_per_token": None if bits is None else {str(k): v for k, v in bits.items()},
            "train_tokens": model.train_tokens, "train_pieces": len(train.tokens), "train_source": what}
    return model.with_order(1), model, info


def _prepare_baselines(vocab) -> tuple[object, object, dict, float] | None:
    """(unigram, n-gram, the n-gram's JSON description, seconds taken) fitted on the baselines' training data,
    or None without any (before the model is scored: a bad baseline flag fails fast)."""
    t0 = time.perf_counter()
    data = _baseline_data(vocab)
    if data is None:
        return None
    return (*_fit_baselines(*data, vocab), time.perf_counter() - t0)


def _score_baselines(prepared, vocab, evaluation, pieces, seq_len: int, stride: int) -> dict:
    """{"unigram": total metrics, "ngram": {order, validation bits, training data, total metrics}} on the
    windows and tokens the model was scored on."""
    unigram, ngram_model, info, fit_s = prepared
    t0 = time.perf_counter()
    totals = {}
    for name, model in (("unigram", unigram), ("ngram", ngram_model)):
        scorer = evaluation.NgramScorer(model, vocab, seq_len=seq_len, batch_size=64)  # B: speed only
        totals[name] = evaluation.total_metrics(evaluation.score_pieces(scorer, pieces, stride=stride))
    held = info["validation_bits_per_token"]
    print(f"baselines: {info['order']}-gram (held-out bits/token "
          f"{', '.join(f'{k}: {v:.3f}' for k, v in held.items()) if held else 'not measured: order given'}), "
          f"trained on {info['train_tokens']:,} tokens of {info['train_pieces']} pieces in {fit_s:.1f} s, scored "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return {"unigram": totals["unigram"], "ngram": {**info, **totals["ngram"]}}


def _ratio(a, b):
    return None if a is None or not b else a / b


def model_vs_ngram(model: dict, ngram_total: dict) -> tuple[dict, str]:
    """(the JSON's model_vs_ngram ratios, the verdict line)."""
    ratios = {"bits_per_token_ratio": _ratio(model["bits_per_token"], ngram_total["bits_per_token"]),
              "bits_per_second_no_velocity_ratio": _ratio(model["bits_per_second_no_velocity"],
                                                          ngram_total["bits_per_second_no_velocity"])}
    change = ", ".join(f"{'-' if r is None else f'{100 * (r - 1):+.1f}%'} {unit}" for r, unit in
                       zip(ratios.values(), ("bits/token", "bits/s (no velocity)")))
    beats = all(r is not None and r < 1 for r in ratios.values())
    return ratios, (f"model vs best n-gram: {change}" if beats else
                    f"model does NOT beat the n-gram baseline ({change})")


def format_summary(rows: list[tuple[str, dict]]) -> str:
    """Model and baselines side by side: bits/token, bits/s, bits/s (no vel)."""
    headers = ("bits/token", "bits/s", "bits/s (no vel)")
    width = max(len(name) for name, _ in rows)
    lines = [" " * width + " " + " ".join(f"{h:>{max(len(h), 10)}}" for h in headers)]
    for name, m in rows:
        cells = (_fmt(m["bits_per_token"], ".3f"), _fmt(m["bits_per_second"], ".1f"),
                 _fmt(m["bits_per_second_no_velocity"], ".1f"))
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>{max(len(h), 10)}}" for c, h in zip(cells, headers)))
    return "\n".join(lines)


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
    if _TASK.value != "continue":
        return _score_task(model, vocab, step, model_path, source, pieces, evaluation)
    room = seq_len + 1 - max(len(p.prefix) for p in pieces)  # body tokens a window holds
    if room < 1:
        raise ValueError(f"the model's context ({seq_len} tokens) is too short for these pieces' prefixes")
    stride = _STRIDE.value or min(evaluation.default_stride(seq_len), room)
    if stride > room:
        raise cli.UsageError(f"--stride must be at most {room} (context {seq_len} + 1 - longest prefix)")

    prepared = _prepare_baselines(vocab) if _BASELINES.value else None
    t0 = time.perf_counter()
    scorer = evaluation.Scorer(model, vocab, batch_size=_BATCH_SIZE.value)
    scores = evaluation.score_pieces(scorer, pieces, stride=stride)
    total = evaluation.total_metrics(scores)
    print(f"scored {total['tokens']} tokens of {len(scores)} pieces in {time.perf_counter() - t0:.1f} s "
          f"(context {seq_len}, stride {stride})", file=sys.stderr)

    baselines = None if prepared is None else _score_baselines(prepared, vocab, evaluation, pieces, seq_len,
                                                               stride)

    print(format_table([(s.name, s.metrics()) for s in scores] + [("TOTAL", total)]))
    ratios = None
    if baselines:
        ratios, verdict = model_vs_ngram(total, baselines["ngram"])
        print()
        print(format_summary([("model", total), ("unigram", baselines["unigram"]),
                              (f"n-gram (order {baselines['ngram']['order']})", baselines["ngram"])]))
        print(verdict)
    if _OUT.value:
        result = {"model": model_path, "step": step, "attention_impl": model.config.attention_impl, "source": source,
                  "context_tokens": seq_len, "stride": stride,
                  "files": [{"path": s.name, **s.metrics()} for s in scores], "skipped": skipped, "total": total,
                  "baselines": baselines, "model_vs_ngram": ratios}
        outputs.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")


def _score_task(model, vocab, step: int, model_path: str, source: dict, pieces, evaluation) -> None:
    """--task=infill|accompany: the spans' bits by infilling beside continuation (module doc)."""
    from musenet_jax import infill_scoring

    if not vocab.config.infill:
        raise ValueError(f"{model_path}: this model's vocabulary has no infilling tokens (format v1, from before "
                         f"infilling): it can only be scored by continuation (leave out --task)")
    t0 = time.perf_counter()
    seq_len = model.config.max_len
    examples, skipped = infill_scoring.span_examples(pieces, _TASK.value, vocab, seq_len,
                                                     spans_per_piece=_SPANS_PER_PIECE.value, seed=_TASK_SEED.value)
    if not examples:
        raise ValueError(f"no span of these {len(pieces)} pieces fits the model's {seq_len}-token window for "
                         f"--task={_TASK.value} ({skipped} skipped)")
    total = infill_scoring.score_spans(evaluation.Scorer(model, vocab, batch_size=_BATCH_SIZE.value), examples)
    print(f"scored {total['spans']} spans ({skipped} skipped) of {len(pieces)} pieces in "
          f"{time.perf_counter() - t0:.1f} s (context {seq_len})", file=sys.stderr)
    print(f"{_TASK.value}: {total['event_tokens']} regenerated event tokens in {total['spans']} spans")
    print(f"  {_TASK.value:<12} {total['infill_bits_per_event']:.3f} bits/event "
          f"({total['infill_bits_per_event_no_velocity']:.3f} without velocity)")
    print(f"  continuation {total['continuation_bits_per_event']:.3f} bits/event "
          f"({total['continuation_bits_per_event_no_velocity']:.3f} without velocity), the same tokens")
    print(f"  {_TASK.value} vs continuation: {100 * -total['infill_gain']:+.1f}% bits; the whole middle "
          f"(waits, end): {total['infill_bits_per_middle_token']:.3f} bits/token over {total['middle_tokens']} tokens")
    for kind, part in total["by_kind"].items():
        print(f"  {kind}: {part['spans']} spans, {part['event_tokens']} event tokens: "
              f"{part['infill_bits_per_event']:.3f} vs {part['continuation_bits_per_event']:.3f} bits/event "
              f"({100 * -part['infill_gain']:+.1f}%)")
    if _OUT.value:
        result = {"model": model_path, "step": step, "task": _TASK.value, "source": source,
                  "context_tokens": seq_len, "spans_per_piece": _SPANS_PER_PIECE.value,
                  "task_seed": _TASK_SEED.value, "skipped_spans": skipped, "total": total}
        outputs.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
