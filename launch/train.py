r"""musenet-train: train a MuseNet-class model on a built dataset.

    musenet-train --config=configs/tiny.py --workdir=runs/tiny --data_dir=data
    musenet-train --config=configs/small.py --config.train.total_steps=20000 --workdir=... --data_dir=...

The run resumes from the newest checkpoint in --workdir. The run length is `config.train.total_steps`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and logs.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory holding the built musenet_midi dataset.")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise cli.UsageError("--config is required (e.g. --config=configs/tiny.py)")
    if not _WORKDIR.value or not _DATA_DIR.value:
        raise cli.UsageError("--workdir and --data_dir are required")
    from musenet_jax import train  # after flag parsing: importing JAX is slow

    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value)
    print(f"done: step {result['step']}, validation {result['eval/bits_per_token']:.3f} bits/token "
          f"(unigram baseline {result['eval/unigram_bits_per_token']:.3f}); checkpoints in {_WORKDIR.value}")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
