"""The one way outputs are written: complete or absent, under a temporary name beside them, then renamed.

Every file or folder this project writes for a user or another process (MIDI, WAV, JSON reports, vocab.json,
exports, run metadata, the compiled CPU kernel) goes through `atomic_path` / `write_atomic`: a reader sees the
old output or the new one, never a partial one, and a failed writer leaves no temporary behind. Temporary names
are unique (`.<name>.<random>.partial`), so processes writing the same output at once do not collide; the last
rename wins.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator

from etils import epath

PARTIAL_SUFFIX = ".partial"
_PARTIAL = re.compile(r"\.(.+)\.[0-9a-f]{12}" + re.escape(PARTIAL_SUFFIX))


def output_name(path: str) -> str:
    """The output a temporary name of `atomic_path` stands for (for error messages); other paths unchanged."""
    head, name = os.path.split(path)
    match = _PARTIAL.fullmatch(name)
    return os.path.join(head, match.group(1)) if match else path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
    """Yields the name to write `path` under; on success it is renamed to `path`, on failure removed.

    A symlink is followed, so that its target is replaced rather than the link. Something that is not a
    regular file or folder (a device such as /dev/stdout, a FIFO) cannot be replaced: it is written directly.
    With `directory=True` the name is an empty folder, made here, to fill; it replaces an empty folder at `path`
    (the caller checks emptiness: a rename cannot replace a folder that holds anything).
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
    head, name = os.path.split(target)
    tmp = os.path.join(head, f".{name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
    if directory:
        os.mkdir(tmp)
    try:
        yield tmp
        if directory and os.path.isdir(target):
            os.rmdir(target)  # empty (the caller's check); rename cannot replace a folder on every platform
        os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes a whole file or nothing. A URL (`gs://...`, through `etils.epath`) is written as one object,
    which object storage makes all-or-nothing by itself."""
    if "://" in os.fspath(path):
        target = epath.Path(os.fspath(path))
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)
        return
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
