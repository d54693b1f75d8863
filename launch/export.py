r"""musenet-export: a training checkpoint's model parameters as a portable inference export.

    musenet-export --workdir=runs/tiny --out=exports/tiny [--dtype=bfloat16] [--step=600]

Writes `model.safetensors` (parameters only, no optimizer state), `config.json` and `vocab.json` into --out,
which must not exist or be empty; the directory appears complete or not at all. Default: the newest step.
The checkpoint's files are checked against its manifest first; a damaged one is refused in one line that lists
the other steps to pass as --step.
"""

from __future__ import annotations

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "musenet-train workdir holding checkpoints/.")
_OUT = flags.DEFINE_string("out", None, "Export directory to create (must not exist or be empty).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value or not _OUT.value:
        raise cli.UsageError("--workdir and --out are required")
    from musenet_jax import export  # after flag parsing: importing JAX is slow

    out = export.export_checkpoint(_WORKDIR.value, _OUT.value, dtype=_DTYPE.value, step=_STEP.value)
    meta, _, vocab = export.read_export_config(out)
    print(f"exported step {meta['step']} of {_WORKDIR.value} ({meta['dtype']}, vocab size {vocab.size}) to {out}")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
