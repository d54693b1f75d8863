"""Output files that are complete or absent: written under a temporary name, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields the name to write `path` under; on success it is renamed to `path`, on failure removed.

    A symlink is followed, so that its target is replaced rather than the link. Something that is not a
    regular file (a device such as /dev/stdout, a FIFO) cannot be replaced: it is written directly.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:  # absent (or a dangling link, whose target is then created)
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        yield path
        return
    target = os.path.realpath(path) if os.path.islink(path) else path
    tmp = target + PARTIAL_SUFFIX
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
