r"""musenet-tokenize: print a MIDI file as MuseNet tokens.

    musenet-tokenize song.mid                       # human-readable tokens
    musenet-tokenize song.mid --ids --out song.ids  # token ids, one line
    musenet-tokenize song.mid --label bach --vocab vocab.json
    cat song.mid | musenet-tokenize -               # '-' reads the MIDI file from standard input
"""

from __future__ import annotations

import sys

from absl import flags

from data_pipeline import encoding, outputs
from data_pipeline.vocab import Vocab, VocabConfig, normalize_label
from launch import cli

_IDS = flags.DEFINE_bool("ids", False, "Print token ids instead of the human-readable form.")
_OUT = flags.DEFINE_string("out", None, "Write to this file instead of standard output.")
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.json of a dataset or model; default: the default vocabulary.")
_LABEL = flags.DEFINE_string("label", None, "Genre / composer label to put in the conditioning prefix.")
_READER = flags.DEFINE_enum("reader", "symusic", ["symusic", "miditoolkit"], "MIDI parser.")


def load_vocab(vocab_path: str | None, labels: tuple[str, ...] = ()) -> Vocab:
    """The vocabulary from `--vocab`, or the default one extended with `labels`."""
    if vocab_path:
        return Vocab.load(vocab_path)
    return Vocab(VocabConfig(labels=labels))


def main(argv):
    if len(argv) != 2:
        raise cli.UsageError("expected exactly one MIDI file: musenet-tokenize IN.mid")
    # Normalised as the dataset builder does folder names ("Rock Music" -> rock_music).
    label = normalize_label(_LABEL.value) if _LABEL.value else None
    vocab = load_vocab(_VOCAB.value, (label,) if label else ())
    source = sys.stdin.buffer.read() if argv[1] == "-" else argv[1]
    piece = encoding.encode_midi(source, vocab, label=label, reader=_READER.value, path=argv[1])
    if _IDS.value:
        text = " ".join(map(str, piece.tokens.tolist()))
    else:
        text = vocab.to_text(piece.tokens)
    if _OUT.value:
        outputs.write_atomic(_OUT.value, text + "\n")
    else:
        sys.stdout.write(text + "\n")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
