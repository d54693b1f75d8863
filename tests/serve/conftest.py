"""The shared real `musenet-serve` (launch/serve_client.py) over the small test export (tests/conftest.py
`trained_run`)."""

from __future__ import annotations

import pytest

from launch.serve_client import serve


@pytest.fixture(scope="session")
def server(trained_run):
    """The shared server: the small export, --max_batch=4 (the page asks 4 candidates)."""
    with serve(str(trained_run.export), "--max_batch=4", "--queue_size=32") as running:
        yield running
