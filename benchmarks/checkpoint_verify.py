r"""Checkpoint verification cost: seconds per GB to check a checkpoint against its manifest, beside the
time to plainly read the same bytes.

    python -m benchmarks.checkpoint_verify [--megabytes 400] [--arrays 16] [--repeats 3] [--dir DIR]
        [--out results.json]

Saves a state of `--arrays` float32 arrays of random values, `--megabytes` MB in all, as an orbax checkpoint
the way the trainer does (`musenet_jax.checkpoints.manager`, one process) under `--dir` (default: a
temporary folder, removed at the end), then times, best of `--repeats`:

- `read`: every file of the checkpoint folder read in BLOCK_BYTES blocks by HASH_THREADS threads, nothing
  computed: the baseline, in the same run;
- `verify`: `checkpoints.verify` against the manifest (size, then CRC-32 of every file; what a resume,
  an export and an evaluation pay before reading);
- `manifest`: `checkpoints.write_manifest` (list, hash, write the part: what a save pays after its commit);
- `orbax restore`: orbax reading the state back to host arrays, for scale.

Each row gives seconds, GB/s, seconds per GB (1 GB = 1e9 bytes of the checkpoint's files) and its time
relative to `read`. The files were just written, so the reads come from the page cache where there is room
for them (a cold read from disk or object storage is slower for every row alike; point --dir at the storage
to measure); the table's header says how much memory the machine has.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import shutil
import tempfile
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from etils import epath

from data_pipeline import outputs
from launch import cli
from musenet_jax import checkpoints

_MEGABYTES = flags.DEFINE_integer("megabytes", 400, "Size of the saved state in MB (1e6 bytes).")
_ARRAYS = flags.DEFINE_integer("arrays", 16, "Arrays the state is split into (files grow with them).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per row; the best is reported.")
_DIR = flags.DEFINE_string("dir", None, "Folder to write the checkpoint in (default: a temporary one).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")

STEP = 1


def _read_all(step_dir: epath.Path, files: list[str]) -> int:
    """Reads every file as `checkpoints.verify` does (same blocks, same threads), computing nothing; bytes."""

    def read(rel: str) -> int:
        n = 0
        with (step_dir / rel).open("rb") as f:
            while block := f.read(checkpoints.BLOCK_BYTES):
                n += len(block)
        return n

    with concurrent.futures.ThreadPoolExecutor(min(checkpoints.HASH_THREADS, len(files))) as pool:
        return sum(pool.map(read, files))


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run(root: str) -> dict:
    """Saves the state under `root`, times every row and returns the results (module docstring)."""
    config = ml_collections.ConfigDict({"checkpoint": {"max_to_keep": 1, "async_save": False}})
    manager = checkpoints.manager(root, config)
    per_array = _MEGABYTES.value * 10**6 // 4 // _ARRAYS.value
    rng = np.random.default_rng(0)
    state = {f"a{i:03d}": rng.standard_normal(per_array, dtype=np.float32) for i in range(_ARRAYS.value)}
    t0 = time.perf_counter()
    manager.save(STEP, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    save_s = time.perf_counter() - t0
    del state
    step_dir = manager.directory / str(STEP)
    checkpoints.write_manifest(step_dir)
    files, _ = checkpoints.read_manifest(step_dir)
    total = sum(n for n, _ in files.values())
    problems = []

    def verify():
        problems.append(checkpoints.verify(step_dir, files))

    def restore():
        manager.restore(STEP, args=ocp.args.Composite(state=ocp.args.StandardRestore()))

    repeats = _REPEATS.value
    seconds = {"read": _best(lambda: _read_all(step_dir, sorted(files)), repeats),
               "verify": _best(verify, repeats),
               "manifest": _best(lambda: checkpoints.write_manifest(step_dir), repeats),
               "orbax restore": _best(restore, repeats)}
    manager.close()
    if any(p is not None for p in problems):
        raise RuntimeError(f"the fresh checkpoint failed its own check: {next(p for p in problems if p)}")
    rows = [{"row": name, "seconds": s, "gb_per_s": total / s / 1e9, "s_per_gb": s / (total / 1e9),
             "vs_read": s / seconds["read"]} for name, s in seconds.items()]
    return {"bytes": total, "files": len(files), "arrays": _ARRAYS.value, "save_s": save_s, "repeats": repeats,
            "block_bytes": checkpoints.BLOCK_BYTES, "hash_threads": checkpoints.HASH_THREADS,
            "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes(), "machine": platform.machine(),
            "python": platform.python_version(), "orbax": ocp.__version__, "results": rows}


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    if min(_MEGABYTES.value, _ARRAYS.value, _REPEATS.value) < 1:
        raise cli.UsageError("--megabytes, --arrays and --repeats must be >= 1")
    cli.prepare_output_file(_OUT.value)
    if _DIR.value:
        cli.prepare_output_dir(_DIR.value, "--dir")
        if os.listdir(_DIR.value):
            raise cli.UsageError(f"--dir {_DIR.value} is not empty; give a new or empty folder")
    root = _DIR.value or tempfile.mkdtemp(prefix="checkpoint-verify-")
    try:
        result = run(root)
    finally:
        if not _DIR.value:
            shutil.rmtree(root, ignore_errors=True)
    memory = result["memory_bytes"]
    print(f"{result['bytes'] / 1e9:.3f} GB in {result['files']} files ({result['arrays']} arrays), saved in "
          f"{result['save_s']:.2f} s; {result['cpu_count']} CPUs, "
          f"{'?' if memory is None else f'{memory / 2**30:.0f} GiB'} memory (warm page cache where it fits); "
          f"best of {result['repeats']}")
    print(f"{'row':<14}{'seconds':>10}{'GB/s':>9}{'s/GB':>9}{'vs read':>9}")
    for r in result["results"]:
        print(f"{r['row']:<14}{r['seconds']:>10.3f}{r['gb_per_s']:>9.2f}{r['s_per_gb']:>9.3f}{r['vs_read']:>8.2f}x")
    if _OUT.value:
        outputs.write_atomic(_OUT.value, json.dumps(result, indent=2) + "\n")
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
