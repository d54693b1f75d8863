r"""Exactness check of the encoding over a folder of MIDI files; rerun it after any change to the hot path.

    python benchmarks/roundtrip_check.py --midi_dir DIR [--save tokens.npz | --compare tokens.npz]

For every `*.mid` under `--midi_dir` (recursive) it checks that:

1. readers agree: tokens from the symusic reader equal tokens from the miditoolkit reader (or both
   readers reject the file), except for the files listed in `--reader_mismatch_ok`;
2. decoding is exact: `encode_notes(decode_tokens(tokens))` reproduces the tokens;
3. MIDI round trip: the decoded notes written with `notes_to_midi` and read back with `encode_midi`
   give the tokens again.

`--save` writes every file's tokens (both readers) to an .npz; `--compare` checks them against such a
snapshot, byte for byte, so an optimisation can be shown not to change any output. Prints the counts
and one line per problem; exits with 1 if there is any.
"""

from __future__ import annotations

import os
import sys

# This folder holds a `tokenize.py` that would shadow the standard library's module of that name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import collections
import pathlib
import tempfile

import numpy as np
from absl import flags

from data_pipeline import encoding, midi_io, outputs
from data_pipeline.vocab import Vocab
from launch import cli

_MIDI_DIR = flags.DEFINE_string("midi_dir", None, "Folder of MIDI files (searched recursively for *.mid).")
_LIMIT = flags.DEFINE_integer("limit", None, "Check only the first N files (sorted by path).")
# miditoolkit assigns a note to the program in effect at its note-off, symusic to the one at its
# note-on; these two files of the development corpus change program while a note sounds.
_READER_MISMATCH_OK = flags.DEFINE_list(
    "reader_mismatch_ok", ["mma_examples/misc/truncate.mid", "mma_examples/simple/marine-hymn.mid"],
    "Files (relative to --midi_dir) where the two readers are known to disagree.")
_SAVE = flags.DEFINE_string("save", None, "Write every file's tokens (both readers) to this .npz.")
_COMPARE = flags.DEFINE_string("compare", None, "Check tokens against a snapshot written by --save.")

READERS = ("symusic", "miditoolkit")


def _encode(data: bytes, vocab: Vocab, reader: str) -> np.ndarray | str:
    """Tokens, or the reason the file is rejected."""
    try:
        return encoding.encode_midi(data, vocab, reader=reader).tokens
    except midi_io.MidiError as e:
        return e.reason


def check_file(path: pathlib.Path, rel: str, vocab: Vocab, tmp_dir: str,
               problems: list[str], counts: collections.Counter) -> dict[str, np.ndarray | str]:
    """Runs the three checks on one file; appends problems; returns its tokens (or reasons) per reader."""
    data = path.read_bytes()
    out = {reader: _encode(data, vocab, reader) for reader in READERS}
    tokens, other = out["symusic"], out["miditoolkit"]
    rejected = [isinstance(t, str) for t in (tokens, other)]
    if all(rejected):
        counts["rejected by both readers"] += 1
        return out
    if any(rejected) or not np.array_equal(tokens, other):
        if rel in _READER_MISMATCH_OK.value:
            counts["known reader mismatch"] += 1
        else:
            problems.append(f"{rel}: readers disagree (symusic {_describe(tokens)}, "
                            f"miditoolkit {_describe(other)})")
        if rejected[0]:
            return out
    counts["files encoded"] += 1
    counts["tokens"] += len(tokens)

    notes, _ = encoding.decode_tokens(tokens, vocab)
    again = encoding.encode_notes(notes, vocab).tokens
    if not np.array_equal(again, tokens):
        problems.append(f"{rel}: encode_notes(decode_tokens(tokens)) differs at token "
                        f"{_first_difference(tokens, again)}")
    midi_path = os.path.join(tmp_dir, "roundtrip.mid")
    encoding.notes_to_midi(notes, vocab, midi_path)
    reread = _encode(pathlib.Path(midi_path).read_bytes(), vocab, "symusic")
    if isinstance(reread, str) or not np.array_equal(reread, tokens):
        where = reread if isinstance(reread, str) else f"differs at token {_first_difference(tokens, reread)}"
        problems.append(f"{rel}: notes_to_midi -> encode_midi {where}")
    return out


def _describe(tokens: np.ndarray | str) -> str:
    return f"rejects: {tokens}" if isinstance(tokens, str) else f"{len(tokens)} tokens"


def _first_difference(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _snapshot_key(rel: str, reader: str) -> str:
    return f"{reader}:{rel}"


def compare_snapshot(path: str, results: dict[str, dict], problems: list[str]) -> int:
    """Checks `results` against a `--save` snapshot; returns the number of entries compared."""
    with np.load(path) as snapshot:
        saved = {k: snapshot[k] for k in snapshot.files}
    current = _flatten(results)
    for key in sorted(set(saved) | set(current)):
        if key not in saved or key not in current:
            problems.append(f"{key}: only in the {'snapshot' if key in saved else 'current run'}")
        elif saved[key].dtype != current[key].dtype or saved[key].tobytes() != current[key].tobytes():
            problems.append(f"{key}: differs from the snapshot")
    return len(saved)


def _flatten(results: dict[str, dict]) -> dict[str, np.ndarray]:
    """Snapshot entries: tokens as int32, a rejected file as its reason (a unicode array)."""
    return {_snapshot_key(rel, reader): (np.asarray(t) if isinstance(t, str) else t)
            for rel, per_reader in results.items() for reader, t in per_reader.items()}


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    if not _MIDI_DIR.value:
        raise cli.UsageError("--midi_dir is required")
    root = pathlib.Path(_MIDI_DIR.value)
    if not root.is_dir():
        raise cli.UsageError(f"--midi_dir {root} is not a folder")
    if _SAVE.value and not os.path.isdir(os.path.dirname(os.path.abspath(_SAVE.value))):
        raise cli.UsageError(f"--save {_SAVE.value}: its folder does not exist")
    if _COMPARE.value and not os.path.isfile(_COMPARE.value):
        raise cli.UsageError(f"--compare {_COMPARE.value}: no such file")
    paths = sorted(root.rglob("*.mid"))[:_LIMIT.value]
    if not paths:
        raise cli.UsageError(f"no *.mid files under {root}")

    vocab = Vocab()
    problems: list[str] = []
    counts: collections.Counter = collections.Counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        for path in paths:
            rel = path.relative_to(root).as_posix()
            results[rel] = check_file(path, rel, vocab, tmp_dir, problems, counts)

    print(f"files: {len(paths)}")
    for name in ("files encoded", "tokens", "rejected by both readers", "known reader mismatch"):
        print(f"{name}: {counts[name]:,}")
    if _COMPARE.value:
        compared = compare_snapshot(_COMPARE.value, results, problems)
        print(f"snapshot entries compared: {compared:,}")
    if _SAVE.value:
        # A file object: np.savez would add .npz to a temporary name without it.
        with outputs.atomic_path(_SAVE.value) as tmp, open(tmp, "wb") as f:
            np.savez(f, **_flatten(results))
        print(f"wrote {_SAVE.value}")
    for line in problems:
        print(f"MISMATCH {line}")
    print(f"problems: {len(problems)}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
