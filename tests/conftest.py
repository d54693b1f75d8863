"""Test-wide set-up: 8 fake CPU devices (before JAX is first used) so sharding tests see a mesh."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


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
