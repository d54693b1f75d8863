"""Paths and small files of a run directory (`--workdir`), local or on cloud storage.

Pod jobs keep their workdir on object storage (`gs://bucket/runs/x`): every host must see the same
checkpoints, and the hosts share no disk. Orbax reads and writes such paths itself; the run's small files
(config.json, vocab.json, final_metrics.json, metrics.jsonl, TensorBoard events) go through `etils.epath`,
which handles local paths and, with the `gcs` extra installed (`pip install 'musenet-jax[gcs]'`), `gs://`.

Local paths are made absolute (orbax needs that); a URL (`scheme://...`) is kept as it is, never joined to
the current directory.
"""

from __future__ import annotations

import json
import os

from etils import epath

from data_pipeline import outputs


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs like gs://bucket/dir (anything with a scheme), False for local paths."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """The run directory as an `epath.Path`: absolute when local, unchanged when remote."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def write_text(path: epath.Path, text: str) -> None:
    """Writes `text` so that readers see the old file or the new one, never a partial one
    (`data_pipeline.outputs.write_atomic`, local or on object storage)."""
    outputs.write_atomic(path, text)


def write_json(path: epath.Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")
