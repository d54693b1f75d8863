r"""musenet-train: train a MuseNet-class model on a built dataset, on one process or many.

    musenet-train --config=configs/tiny.py --workdir=runs/tiny --data_dir=data
    musenet-train --config=configs/small.py --config.train.total_steps=20000 --workdir=... --data_dir=...
    # one of N processes (every process runs the same command with its own --process_id):
    musenet-train --coordinator_address=10.0.0.2:8476 --num_processes=4 --process_id=1 --config=... ...
    # N local processes with D CPU devices each (development, tests):
    musenet-launch --num_processes=2 --devices_per_process=4 -- musenet-train --config=... ...

The run resumes from the newest checkpoint in --workdir, also onto another process count or mesh. The run
length is `config.train.total_steps`. One trainer at a time writes a workdir: a second one started on it stops with
one line naming the first (`musenet_jax.lease`).

Linked config fields: data.seq_len and model.max_len are one value (a FieldReference in configs/*.py): override
either and both change; giving them different values is a usage error.

Distributed start-up happens before any other JAX use: --distributed=auto (default) joins a job when the
three explicit flags are given or a cluster is detected (TPU VM pod worker, SLURM job with more than one
task, Kubernetes indexed Job / JobSet pod; `musenet_jax.distributed`); `on` always calls
jax.distributed.initialize() and lets JAX detect the cluster; `off` runs a single process.

Exit codes: 0 when training finished or was preempted (SIGTERM or Ctrl-C on any process: every process
saves a checkpoint of the same step and exits 0 with a message; rerun the same command to resume), and when
the workdir's checkpoint has already reached total_steps (nothing is trained or rewritten); 1 for errors;
2 for bad flags; 130 for a second Ctrl-C (stops at once, without the checkpoint); 3
(`distributed.ABORT_EXIT_CODE`) when another process of the job died or hung for --heartbeat_timeout_s
seconds (a one-line message names it).
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard and logs.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory holding the built musenet_midi dataset.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0's coordination service (with --num_processes and "
                                   "--process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (explicit start-up).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: join a job when the explicit flags are given or a cluster is detected; "
                                 "on: always jax.distributed.initialize(); off: single process.")
_HEARTBEAT = flags.DEFINE_float("heartbeat_timeout_s", 60.0,
                                "Seconds without a heartbeat or step progress after which another process counts "
                                "as dead and this one exits (multi-process runs).")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise cli.UsageError("--config is required (e.g. --config=configs/tiny.py)")
    cli.check_linked_overrides(_CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"]))
    if not _WORKDIR.value or not _DATA_DIR.value:
        raise cli.UsageError("--workdir and --data_dir are required")
    from musenet_jax import distributed  # after flag parsing: importing JAX is slow

    try:
        options = distributed.Options(mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                                      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                                      heartbeat_timeout_s=_HEARTBEAT.value)
    except distributed.DistributedError as e:
        raise cli.UsageError(str(e)) from e
    joined = distributed.initialize(options)  # before any other JAX use
    if joined:
        print(f"joined: {joined}", flush=True)

    from musenet_jax import train

    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value,
                                      heartbeat_timeout_s=_HEARTBEAT.value)
    if not result["trained"]:
        return  # the trainer said why
    if result["preempted"]:
        print(f"preempted: stopped after step {result['step']} with a checkpoint in {_WORKDIR.value}; rerun the "
              "same command to resume", flush=True)
        return
    ngram, order = result.get("eval/ngram_bits_per_token"), result.get("eval/ngram_order")
    ngram_text = "" if ngram is None or ngram != ngram else f", {int(order)}-gram baseline {ngram:.3f}"  # NaN: none
    print(f"done: step {result['step']}, validation {result['eval/bits_per_token']:.3f} bits/token "
          f"(unigram baseline {result['eval/unigram_bits_per_token']:.3f}{ngram_text}); checkpoints in "
          f"{_WORKDIR.value}")


def parse_flags(argv: list[str]) -> list[str]:
    """`cli.parse_flags`, after checking that the --config file exists: ml_collections reports a missing one
    only as "Failed loading config file" (with overrides) or at first use (without), naming no path."""
    for arg, after in zip(argv[1:], [*argv[2:], None]):
        path = arg.removeprefix("--config=") if arg.startswith("--config=") else after if arg == "--config" else None
        if path is not None and not os.path.isfile(path.split(":")[0]):  # `file.py:argument` passes an argument
            cli.fail(f"--config {path}: no such file (see --help)", code=2)
    return cli.parse_flags(argv)


def run():
    cli.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
