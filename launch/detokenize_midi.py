r"""musenet-detokenize: write a MIDI file from MuseNet tokens (human-readable form or ids).

    musenet-detokenize song.tokens --out song.mid
    musenet-tokenize song.mid --ids | musenet-detokenize - --out song.mid
"""

from __future__ import annotations

import re
import sys

import numpy as np
from absl import flags

from data_pipeline import encoding
from data_pipeline.vocab import SPECIAL_NAMES, Vocab, VocabConfig
from launch import cli

_OUT = flags.DEFINE_string("out", None, "Output MIDI file (required).")
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.json the tokens belong to; default: the default vocabulary.")


def parse_tokens(text: str, vocab_path: str | None) -> tuple[np.ndarray, Vocab]:
    """Token ids (whitespace or comma separated integers) or the text form -> (ids, vocab)."""
    words = text.replace(",", " ").split()
    if not words:
        raise ValueError("no tokens in the input")
    if all(re.fullmatch(r"\d+", w) for w in words):
        vocab = Vocab.load(vocab_path) if vocab_path else Vocab()
        ids = np.array([int(w) for w in words], np.int64)
        if ids.max() >= vocab.size:
            raise ValueError(f"token id {ids.max()} is outside the vocabulary (size {vocab.size})")
        return ids, vocab
    if vocab_path:
        vocab = Vocab.load(vocab_path)
    else:
        # Bare words before `start` that name no instrument are labels of the conditioning prefix.
        default = Vocab()
        head = words[: words.index("start")] if "start" in words else []
        labels = tuple(w for w in head if ":" not in w and w not in SPECIAL_NAMES
                       and w not in default.instruments.names)
        vocab = Vocab(VocabConfig(labels=labels))
    return vocab.from_text(" ".join(words)), vocab


def main(argv):
    if len(argv) != 2:
        raise cli.UsageError("expected exactly one token file (or - for standard input)")
    if not _OUT.value:
        raise cli.UsageError("--out is required")
    if argv[1] == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(argv[1], encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{argv[1]}: not a token file (not UTF-8 text; token files hold names or ids)") from None
    tokens, vocab = parse_tokens(text, _VOCAB.value)
    notes = encoding.tokens_to_midi(tokens, vocab, _OUT.value)
    print(f"wrote {_OUT.value}: {len(notes)} note{'' if len(notes) == 1 else 's'}", file=sys.stderr)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
