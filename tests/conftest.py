"""Test-wide set-up: 8 fake CPU devices (before JAX is first used) so sharding tests see a mesh."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def midi_fixtures() -> pathlib.Path:
    """Folder of small real MIDI files (licences in its LICENSES.md)."""
    return FIXTURES / "midi"
