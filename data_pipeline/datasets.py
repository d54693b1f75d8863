"""Reading built `musenet_midi` datasets: the vocabulary, random-access splits, metadata, report.

A built dataset lives in `<data_dir>/musenet_midi/<config>/<version>/`: the ArrayRecord files, TFDS's
`dataset_info.json` / `features.json` / `metadata.json`, and ours: `vocab.json` (the vocabulary,
label table included), `rejected.tsv` and `token_counts.npz`: per split, in record order, the body-token
count and the conditioning-prefix length of every record, and the split's body-token histogram, so
that a trainer can lay out windows and a unigram baseline without reading every record (minutes at
start-up for a large split on remote storage). None of these functions imports the builder or TensorFlow.
Without an explicit version they read the newest build, and refuse builds older than
`CURRENT_ENCODING_VERSION`, whose records the current encoder would write differently.

    vocab = datasets.load_vocab(data_dir, "default")
    train = datasets.data_source(data_dir, "default", "train")   # len(train), train[i] -> dict
    counts = datasets.token_counts(data_dir, "default", "train")  # int32[len(train)]
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline.vocab import Vocab

DATASET_NAME = "musenet_midi"
VOCAB_FILE = "vocab.json"
REPORT_FILE = "rejected.tsv"
TOKEN_COUNTS_FILE = "token_counts.npz"
# Keys of `token_counts.npz`: "<split>" holds the token counts (the file's first content), then these.
PREFIX_LEN_SUFFIX = "_prefix_len"
HISTOGRAM_SUFFIX = "_histogram"
# The oldest builder version whose records the current encoder would write the same way. Builds of
# older versions (their release notes, in the builder, say what changed) are not picked by default:
# training on them would teach the old encoding. Raise this when a builder version changes the records.
CURRENT_ENCODING_VERSION = "1.1.0"


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in version.split("."))
    except ValueError:
        return (-1,)


def _build_command(data_dir, config_name: str) -> str:
    manual = "" if config_name == "default" else " --manual_dir DIR"  # the MIDI it was built from
    return f"musenet-build-data --config {config_name}{manual} --data_dir {os.fspath(data_dir)}"


def dataset_dir(data_dir: str | os.PathLike, config_name: str = "default", version: str | None = None) -> str:
    """The folder of a built dataset: the newest complete version unless `version` is given.

    Without `version`, a build older than `CURRENT_ENCODING_VERSION` (encoded the old way) is refused;
    name its version to read it anyway.

    Raises:
      FileNotFoundError: nothing built there, or only builds older than `CURRENT_ENCODING_VERSION`; the
        message is one line naming the build command.
    """
    config_dir = os.path.join(os.fspath(data_dir), DATASET_NAME, config_name)
    if version is None:
        built = [v for v in (os.listdir(config_dir) if os.path.isdir(config_dir) else ())
                 if os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))]
        if not built:
            raise FileNotFoundError(f"no built {DATASET_NAME}/{config_name} dataset in {data_dir} "
                                    f"(build it with {_build_command(data_dir, config_name)})")
        version = max(built, key=_version_key)
        if _version_key(version) < _version_key(CURRENT_ENCODING_VERSION):
            raise FileNotFoundError(
                f"{config_dir} holds only {DATASET_NAME} version {version}, encoded before version "
                f"{CURRENT_ENCODING_VERSION} changed the encoding (a note-off now releases its key); rebuild "
                f"it with {_build_command(data_dir, config_name)} (or name version={version!r} to read the old "
                f"build from Python)")
    path = os.path.join(config_dir, version)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"{path}: not a built dataset (no dataset_info.json)")
    return path


def load_vocab(data_dir: str | os.PathLike, config_name: str = "default",
               version: str | None = None) -> Vocab:
    """The `Vocab` a dataset's records were written with (its label table included)."""
    return Vocab.load(os.path.join(dataset_dir(data_dir, config_name, version), VOCAB_FILE))


def data_source(data_dir: str | os.PathLike, config_name: str = "default", split: str = "train",
                version: str | None = None):
    """A split as a random-access source (`len(src)`, `src[i]` -> dict of numpy arrays / bytes).

    `split` takes TFDS slicing syntax too (`"train[:10%]"`). Text fields come back as bytes.
    """
    # From the folder alone (not `tfds.data_source`), so that custom configs, which the registered
    # builder class does not list, open the same way.
    return tfds.builder_from_directory(dataset_dir(data_dir, config_name, version)).as_data_source(split)


def token_counts(data_dir: str | os.PathLike, config_name: str = "default", split: str = "train",
                 version: str | None = None) -> np.ndarray | None:
    """int32[n]: the body-token count of each record of `split`, aligned with `data_source(...)[i]`.

    Takes the same slicing syntax as `data_source`. None for a dataset built before the counts were
    stored (count them from the records instead: `input_pipeline.count_tokens`).
    """
    return _per_record(data_dir, config_name, split, version, "", "counts")


def prefix_lengths(data_dir: str | os.PathLike, config_name: str = "default", split: str = "train",
                   version: str | None = None) -> np.ndarray | None:
    """int32[n]: the conditioning-prefix length (`[label] instrument.. start`, tokens) of each record of
    `split`, aligned with `data_source(...)[i]`; slicing as `data_source`. None for a dataset built
    before they were stored."""
    return _per_record(data_dir, config_name, split, version, PREFIX_LEN_SUFFIX, "prefix lengths")


def token_histogram(data_dir: str | os.PathLike, config_name: str = "default", split: str = "train",
                    version: str | None = None) -> np.ndarray | None:
    """int64[vocab size]: how often each token id occurs in the bodies of `split`'s records.

    `split` may join whole splits (`"train+validation"`); None for a slice of a split (`"train[:10%]"`)
    or a dataset built before the histograms were stored.
    """
    stored = _stored_parts(data_dir, config_name, split, version, HISTOGRAM_SUFFIX)
    if stored is None:
        return None
    _, parts = stored
    if any(instruction.from_ not in (None, 0) or instruction.to not in (None, num_records)
           for instruction, _, num_records in parts):
        return None
    return sum(values.astype(np.int64) for _, values, _ in parts)


def _per_record(data_dir, config_name: str, split: str, version: str | None, suffix: str,
                what: str) -> np.ndarray | None:
    """The per-record array `<split><suffix>` of `token_counts.npz` for a (sliced) split, or None."""
    stored = _stored_parts(data_dir, config_name, split, version, suffix)
    if stored is None:
        return None
    counts_path, parts = stored
    for instruction, values, num_records in parts:
        if len(values) != num_records:
            raise ValueError(f"{counts_path}: {len(values)} {what} for split {instruction.splitname!r} of "
                             f"{num_records} records")
    return np.concatenate([values[i.from_:i.to] for i, values, _ in parts]).astype(np.int32)


def _stored_parts(data_dir, config_name: str, split: str, version: str | None, suffix: str):
    """(path of `token_counts.npz`, [(read instruction, its split's array `<split><suffix>`, records in that
    split)] for each split `split` reads); None when the file or one of those arrays is missing."""
    path = dataset_dir(data_dir, config_name, version)
    counts_path = os.path.join(path, TOKEN_COUNTS_FILE)
    if not os.path.isfile(counts_path):
        return None
    splits = tfds.builder_from_directory(path).info.splits
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    with np.load(counts_path) as stored:  # reads only the arrays asked for
        if any(i.splitname + suffix not in stored.files for i in instructions):
            return None
        return counts_path, [(i, stored[i.splitname + suffix], splits[i.splitname].num_examples)
                             for i in instructions]


def load_metadata(data_dir: str | os.PathLike, config_name: str = "default",
                  version: str | None = None) -> dict:
    """The build's metadata: source, labels, filters, per-split counts, reject counts per reason."""
    with open(os.path.join(dataset_dir(data_dir, config_name, version), "metadata.json")) as f:
        return json.load(f)


def load_report(data_dir: str | os.PathLike, config_name: str = "default",
                version: str | None = None) -> list[tuple[str, str, str]]:
    """`rejected.tsv` as (path, reason, detail) rows."""
    with open(os.path.join(dataset_dir(data_dir, config_name, version), REPORT_FILE), newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[0], r[1], r[2] if len(r) > 2 else "") for r in rows[1:]]
