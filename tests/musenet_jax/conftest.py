"""Shared fixtures of the model-level tests."""

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compiles():
    """Compiling, not running, dominates small-model tests on CPU: skip XLA's optimisation passes for the
    module that asks (`pytestmark = pytest.mark.usefixtures("fast_compiles")`); the math is unchanged."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
