"""Damage to a checkpoint as an operator meets it: a data file cut short, or random bytes written into one."""

from __future__ import annotations

import os
import pathlib

DAMAGES = ("truncated", "random bytes")


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest file of a checkpoint folder's train state (parameters and optimizer moments)."""
    files = [p for p in (pathlib.Path(step_dir) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: (p.stat().st_size, str(p)))


def damage(step_dir: pathlib.Path, how: str) -> pathlib.Path:
    """Damages the largest data file of a checkpoint folder and returns it: `truncated` to half its size, or
    `random bytes`: 64 KiB (at most half the file) overwritten from a quarter of the way in, size unchanged."""
    path = largest_data_file(step_dir)
    size = path.stat().st_size
    if how == "truncated":
        os.truncate(path, size // 2)
    elif how == "random bytes":
        with open(path, "r+b") as f:
            f.seek(size // 4)
            f.write(os.urandom(min(64 << 10, size // 2)))
    else:
        raise ValueError(f"unknown damage {how!r}; one of {DAMAGES}")
    return path
