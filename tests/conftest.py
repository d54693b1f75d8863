"""Test-wide set-up: 8 fake CPU devices (before JAX is first used) so sharding tests see a mesh.

Imports here are JAX and pytest alone, so that the kernel tests (`tests/pallas_kernels/`) run where only those
are installed, e.g. on an accelerator host with its own JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import pytest

if TYPE_CHECKING:
    import ml_collections

jax.config.update("jax_num_cpu_devices", 8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# One persistent compilation cache per test run, shared by the xdist workers and every process a test starts
# (they inherit the environment): many tests compile the same small model's steps, in-process and in
# `python -m launch.*` children, and on 2 cores compiling is most of their time. A size limit makes JAX lock
# the cache directory, so that a process never reads an entry another is still writing.
_CACHE_DIR_ENV, _CACHE_SIZE_ENV = "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"
_OWN_CACHE = pytest.StashKey[str]()  # the directory that this process made, and removes at the end


def pytest_configure(config: pytest.Config) -> None:
    if (os.environ.get("PYTEST_XDIST_WORKER") is None and _CACHE_DIR_ENV not in os.environ
            and importlib.util.find_spec("filelock") is not None):  # JAX's lock needs it
        config.stash[_OWN_CACHE] = tempfile.mkdtemp(prefix="musenet-jax-tests-compilation-cache-")
        os.environ.update({_CACHE_DIR_ENV: config.stash[_OWN_CACHE], _CACHE_SIZE_ENV: str(4 << 30)})
    if _CACHE_DIR_ENV in os.environ:  # JAX read its environment on import, before this ran
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR_ENV])
        jax.config.update("jax_compilation_cache_max_size", int(os.environ.get(_CACHE_SIZE_ENV, -1)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if (own := config.stash.get(_OWN_CACHE, None)) is not None:
        shutil.rmtree(own, ignore_errors=True)


# The files that take longest on a 2-core CI machine (seconds of one worker, from `--durations`), collected
# first; `.ci/run` turns off xdist's reordering by test count, under which these came last and could run alone at the
# end. The GPU-interpreter file (~170 s, its own child processes) comes after the single-process ones: next to
# the multi-host runs' processes at the start it took ~280 s.
LONG_FILES = ("multihost/test_training.py",  # ~300
              "pallas_kernels/test_block_sparse_attention.py",  # ~140
              "launch/test_evaluate.py",  # ~120
              "musenet_jax/test_train_step.py",  # ~105
              "musenet_jax/test_train.py",  # ~105
              "pallas_kernels/test_lowering.py",  # ~95
              "musenet_jax/test_model.py",  # ~90
              "pallas_kernels/test_mosaic_gpu_interpreter.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    rank = {pathlib.Path(__file__).parent / name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def midi_fixtures() -> pathlib.Path:
    """Folder of small real MIDI files (licences in its LICENSES.md)."""
    return FIXTURES / "midi"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, midi_fixtures) -> str:
    """TFDS data dir of a `directory` dataset built from the MIDI fixtures, with two label folders:
    `freedoom` (freedoom*.mid) and `classical` (the bach / miditoolkit / mozart / music21 files). Read-only."""
    root = tmp_path_factory.mktemp("fixture_dataset")
    manual = root / "midi"
    for label, pattern in (("freedoom", "freedoom*.mid"), ("classical", "[bm]*.mid")):
        (manual / label).mkdir(parents=True)
        for f in midi_fixtures.glob(pattern):
            shutil.copy(f, manual / label / f.name)
    out = root / "tfds"
    res = subprocess.run([sys.executable, "-m", "launch.build_data", "--config", "directory", "--manual_dir",
                          str(manual), "--data_dir", str(out), "--num_workers", "0"],
                         capture_output=True, text=True, timeout=600, cwd=FIXTURES.parents[1])
    assert res.returncode == 0, res.stderr
    return str(out)


def small_config(total_steps: int = 6) -> ml_collections.ConfigDict:
    """`configs/tiny.py` shrunk for tests: D=32, 2 layers x 2 heads x 16, 64-token context, batch 4."""
    from configs import tiny

    config = tiny.get_config()
    config.unlock()
    config.model.update(d_model=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=2, attention_stride=8)
    config.data.update(name="directory", seq_len=64, eval_split="train")  # 13 files: validation may be empty
    config.train.update(batch_size=4, total_steps=total_steps, warmup_steps=2, log_every=1, learning_rate=3e-3)
    config.eval.update(batch_size=4, every_steps=3, max_batches=2)
    config.checkpoint.update(every_steps=3, max_to_keep=3, async_save=True)
    return config


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished training run shared by the export / evaluate / generate tests. Read-only: copy to modify.

    Attributes:
      data_dir: the TFDS data dir it trained on (the `data_dir` fixture; labels `freedoom`, `classical`).
      workdir: its training workdir; checkpoints sharded on a (data 2, fsdp 2, tensor 2) mesh.
      steps: the steps with a kept checkpoint, oldest first.
      export: a float32 export (`musenet_jax.export`) of the newest step, `steps[-1]`.
    """

    data_dir: str
    workdir: pathlib.Path
    steps: tuple[int, ...]
    export: pathlib.Path


def _listing(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Iterator[TrainedRun]:
    """10 steps of `small_config` at learning rate 1e-2 on `data_dir`, checkpointed every 5 steps, exported.

    One run serves several test modules because training (and compiling it) dominates their time. Its needs:
    checkpoints really sharded (export / restore gather them) at more than one step (export chooses one);
    enough learning that low-temperature samples end (10 steps at 1e-2 learns that waits are frequent).
    Synchronous saves so that every checkpoint is complete when training returns.
    """
    from musenet_jax import export, train  # heavy imports, only for the tests that train

    root = tmp_path_factory.mktemp("trained_run")
    config = small_config(10)
    config.train.learning_rate = 1e-2
    config.checkpoint.update(every_steps=5, max_to_keep=3, async_save=False)
    config.eval.update(every_steps=10, max_batches=1)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    workdir = root / "work"
    train.train_and_evaluate(config, str(workdir), data_dir)
    steps = tuple(sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()))
    assert steps == (5, 10), steps
    run = TrainedRun(data_dir=data_dir, workdir=workdir, steps=steps,
                     export=pathlib.Path(export.export_checkpoint(workdir, root / "export", dtype="float32")))
    before = {path: _listing(path) for path in (run.workdir, run.export)}
    yield run
    # Users must copy before writing: a test that changed the shared run would make others order-dependent.
    assert {path: _listing(path) for path in (run.workdir, run.export)} == before, "a test modified trained_run"
