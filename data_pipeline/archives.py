"""Safe reading of file collections: folders, zip archives and tar archives (plain, gz, bz2, xz).

Everything is read into memory, member by member; nothing is ever extracted to disk. The readers
still refuse what an extracting tool would be tricked by, so that a hostile archive can neither read
outside its root nor make the reader do unbounded work:

- Paths: a member whose name is absolute (`/x`, `\\x`, `C:x`), climbs (`..` anywhere) or holds a
  NUL byte is skipped as `unsafe_path`. Names are normalised to posix form without `./` or `//`.
- Links: symlink members (tar, zip with a symlink mode, folder entries) are skipped as `symlink`,
  tar hard links as `hardlink`; devices, fifos and sockets as `special_file`. Folders are walked
  without following links and files are opened with `O_NOFOLLOW`.
- Sizes: a member is read with a hard cap of `Limits.max_member_bytes` (+1 byte to detect excess),
  whatever its header declares, and skipped as `too_large` when it goes over. Every byte a reader
  has to decompress, read or skip over counts towards `Limits.max_total_bytes`; past it the whole
  read fails with `ArchiveError` (a decompression bomb stops there).
- Damage: a zip member that fails to decompress or whose CRC does not match is skipped as
  `corrupt_member`, an encrypted one as `encrypted`. A container that cannot be read at all (not a
  zip, truncated gzip stream, bad tar header) raises `ArchiveError` with a one-line reason.

Skipped members are yielded too (with `data=None` and a reason), so callers can report them.
"""

from __future__ import annotations

import dataclasses
import errno
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator

# Reasons a member is skipped (`Member.skipped`).
UNSAFE_PATH = "unsafe_path"
SYMLINK = "symlink"
HARDLINK = "hardlink"
SPECIAL_FILE = "special_file"
TOO_LARGE = "too_large"
ENCRYPTED = "encrypted"
CORRUPT_MEMBER = "corrupt_member"
BROKEN_ARCHIVE = "broken_archive"  # an archive inside a folder that cannot be read (its readable entries are kept)
NOT_SELECTED = "not_selected"

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = ZIP_SUFFIXES + TAR_SUFFIXES

_READ_CHUNK = 1 << 20
# Errors a damaged compressed stream raises from the stdlib readers.
_STREAM_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)


class ArchiveError(ValueError):
    """A folder or archive that cannot be read safely; str() is one line "path: reason"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")


class BudgetError(ArchiveError):
    """The whole source expands past `Limits.max_total_bytes`: the read stops (one damaged archive does not)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on the work one read may do.

    Attributes:
      max_member_bytes: largest member read, in bytes (uncompressed); bigger ones are skipped.
      max_total_bytes: bytes (uncompressed) one `iter_members` call may read or skip over in all.
      max_members: entries one archive may list.
    """

    max_member_bytes: int = 64 << 20
    max_total_bytes: int = 256 << 30
    max_members: int = 5_000_000


@dataclasses.dataclass(frozen=True)
class Member:
    """One file of a collection.

    Attributes:
      path: posix path relative to the collection's root (for members of an archive found inside a
        folder: `folder/archive.zip/member/path`).
      data: the file's bytes, or None when it was skipped.
      skipped: why it was skipped (one of the reason constants of this module), or None.
      detail: a human-readable note on the reason.
    """

    path: str
    data: bytes | None
    skipped: str | None = None
    detail: str = ""


def is_archive(name: str) -> bool:
    """Whether `name` has a zip or tar suffix this module reads."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    """`songs.tar.gz` -> `songs`; names without an archive suffix come back unchanged."""
    lower = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def safe_member_path(name: str) -> str | None:
    """The normalised relative posix path of an archive entry, or None if it is unsafe.

    Backslashes count as separators (zips written on Windows), so `..\\x` is caught too.
    """
    if not name or "\x00" in name:
        return None
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        return None
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


class _Budget:
    """Counts uncompressed bytes read or skipped over; raises once past `limits.max_total_bytes`."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.used = 0

    def spend(self, nbytes: int, where) -> None:
        self.used += nbytes
        if self.used > self.limits.max_total_bytes:
            raise BudgetError(where, f"expands past the limit of {self.limits.max_total_bytes} bytes "
                                      "(decompression bomb?); raise Limits.max_total_bytes to allow it")


def _read_capped(fileobj, cap: int) -> bytes:
    """Reads at most `cap + 1` bytes, so a result longer than `cap` means "too large"."""
    chunks, size = [], 0
    while size <= cap:
        chunk = fileobj.read(min(_READ_CHUNK, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def iter_members(source: str | os.PathLike, *, limits: Limits = Limits(),
                 select: Callable[[str], bool] | None = None,
                 open_archives: bool = False) -> Iterator[Member]:
    """Yields every file of a folder or archive, in a deterministic order.

    Args:
      source: a folder, or a zip / tar archive (chosen by suffix, see `ARCHIVE_SUFFIXES`).
      limits: size bounds (see `Limits`); one budget covers the whole call.
      select: `select(path)` says whether a member is wanted; unwanted members are yielded with
        `skipped=NOT_SELECTED` and never read. Archives found in a folder are opened regardless
        when `open_archives` is set, and `select` applies to their members.
      open_archives: when `source` is a folder, read archives inside it as if they were folders
        (their members are named `path/of/archive.zip/member`); archives inside archives are not
        opened. One that cannot be read (or read to its end) is yielded as a member skipped with
        `BROKEN_ARCHIVE`, after the entries read before the damage.

    Raises:
      ArchiveError: `source` is missing, not a folder or supported archive, or is itself damaged
        beyond reading; `BudgetError` when it expands past `limits.max_total_bytes`.
    """
    source = os.fspath(source)
    budget = _Budget(limits)
    if os.path.isdir(source):
        yield from _iter_folder(source, budget, select, open_archives)
    elif not os.path.exists(source):
        raise ArchiveError(source, "no such file or folder")
    elif is_archive(source):
        yield from _iter_archive(source, "", budget, select)
    else:
        raise ArchiveError(source, f"not a folder or a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")


def _iter_archive(path: str, prefix: str, budget: _Budget, select) -> Iterator[Member]:
    if path.lower().endswith(ZIP_SUFFIXES):
        yield from _iter_zip(path, prefix, budget, select)
    else:
        yield from _iter_tar(path, prefix, budget, select)


def _iter_folder(root: str, budget: _Budget, select, open_archives: bool) -> Iterator[Member]:
    def on_error(err: OSError):
        raise ArchiveError(err.filename or root, err.strerror or str(err))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        # os.walk lists links to folders among `dirnames` but does not enter them: report them.
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)
                yield Member(rel_dir + name, None, SYMLINK, "link to a folder")
        for name in sorted(filenames):
            rel = rel_dir + name
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                yield Member(rel, None, SYMLINK, "symbolic link")
                continue
            if not stat.S_ISREG(st.st_mode):
                yield Member(rel, None, SPECIAL_FILE, "not a regular file")
                continue
            if open_archives and is_archive(name):
                # One damaged archive among many files costs its own unreadable part, not the whole read.
                try:
                    yield from _iter_archive(full, rel + "/", budget, select)
                except BudgetError:
                    raise
                except ArchiveError as e:
                    yield Member(rel, None, BROKEN_ARCHIVE, e.reason)
                continue
            if select is not None and not select(rel):
                yield Member(rel, None, NOT_SELECTED)
                continue
            if st.st_size > budget.limits.max_member_bytes:
                yield Member(rel, None, TOO_LARGE, f"{st.st_size} bytes")
                continue
            try:
                fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as e:
                if e.errno == errno.ELOOP:  # became a link after lstat
                    yield Member(rel, None, SYMLINK, "symbolic link")
                    continue
                raise ArchiveError(full, e.strerror or str(e)) from None
            with os.fdopen(fd, "rb") as f:
                data = _read_capped(f, budget.limits.max_member_bytes)
            budget.spend(len(data), root)
            if len(data) > budget.limits.max_member_bytes:
                yield Member(rel, None, TOO_LARGE, "grew while being read")
                continue
            yield Member(rel, data)


def _zip_entry_type(info: zipfile.ZipInfo) -> str | None:
    """A skip reason for zip entries that are not plain files (unix mode in the external attrs)."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return SYMLINK
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return SPECIAL_FILE
    return None


def _iter_zip(path: str, prefix: str, budget: _Budget, select) -> Iterator[Member]:
    limits = budget.limits
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
        raise ArchiveError(path, f"not a readable zip archive ({e})") from None
    except OSError as e:
        raise ArchiveError(path, e.strerror or str(e)) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise ArchiveError(path, f"lists {len(infos)} entries, over the limit of {limits.max_members}")
        for info in sorted(infos, key=lambda i: i.filename):
            if info.is_dir():
                continue
            name = safe_member_path(info.filename)
            if name is None:
                yield Member(prefix + info.filename, None, UNSAFE_PATH, "absolute or climbing path")
                continue
            rel = prefix + name
            kind = _zip_entry_type(info)
            if kind is not None:
                yield Member(rel, None, kind, "link or special file in a zip")
                continue
            if select is not None and not select(rel):
                yield Member(rel, None, NOT_SELECTED)
                continue
            if info.flag_bits & 0x1:
                yield Member(rel, None, ENCRYPTED, "password-protected")
                continue
            if info.file_size > limits.max_member_bytes:
                yield Member(rel, None, TOO_LARGE, f"declares {info.file_size} bytes")
                continue
            try:
                # zipfile stops at the declared size and checks the CRC when it gets there (which
                # `_read_capped` does unless the member is too large); the cap protects us should the
                # header lie, and the budget counts what was really decompressed.
                with zf.open(info) as f:
                    data = _read_capped(f, limits.max_member_bytes)
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                    OSError, ValueError) as e:
                budget.spend(info.file_size, path)
                yield Member(rel, None, CORRUPT_MEMBER, str(e).split("\n")[0])
                continue
            budget.spend(len(data), path)
            if len(data) > limits.max_member_bytes:
                yield Member(rel, None, TOO_LARGE, "more data than declared")
                continue
            yield Member(rel, data)


class _BrokenHeader(tarfile.TarError):
    pass


class _CheckedTarInfo(tarfile.TarInfo):
    """Turns a bad header after the first into an error; plain tarfile just stops iterating there.

    The first header must stay tarfile's own error, which `open(mode="r:*")` relies on to try the
    next compression.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            if tar.offset == 0:
                raise
            raise _BrokenHeader(f"bad header at byte {tar.offset}: {e}") from None


def _iter_tar(path: str, prefix: str, budget: _Budget, select) -> Iterator[Member]:
    limits = budget.limits
    try:
        tf = tarfile.open(path, mode="r:*", tarinfo=_CheckedTarInfo)
    except _STREAM_ERRORS as e:
        if isinstance(e, OSError) and e.strerror and not isinstance(e, tarfile.TarError):
            raise ArchiveError(path, e.strerror) from None
        raise ArchiveError(path, f"not a readable tar archive ({e})") from None
    count = 0
    with tf:
        # Members come in archive order; `next()` skips each member's data by reading past it, so
        # every member's size is charged to the budget whether or not it is read.
        while True:
            try:
                info = tf.next()
            except _STREAM_ERRORS as e:
                raise ArchiveError(path, f"broken archive after {count} entries ({e})") from None
            if info is None:
                break
            tf.members.clear()  # tarfile keeps every header it read; a big archive would fill memory
            count += 1
            if count > limits.max_members:
                raise ArchiveError(path, f"lists more than the limit of {limits.max_members} entries")
            budget.spend(info.size, path)
            if info.isdir():
                continue
            name = safe_member_path(info.name)
            if name is None:
                yield Member(prefix + info.name, None, UNSAFE_PATH, "absolute or climbing path")
                continue
            rel = prefix + name
            if info.issym():
                yield Member(rel, None, SYMLINK, f"link to {info.linkname}")
                continue
            if info.islnk():
                yield Member(rel, None, HARDLINK, f"link to {info.linkname}")
                continue
            if not info.isreg():
                yield Member(rel, None, SPECIAL_FILE, "device, fifo or other special entry")
                continue
            if select is not None and not select(rel):
                yield Member(rel, None, NOT_SELECTED)
                continue
            if info.size > limits.max_member_bytes:
                yield Member(rel, None, TOO_LARGE, f"{info.size} bytes")
                continue
            try:
                f = tf.extractfile(info)
                data = _read_capped(f, limits.max_member_bytes)
            except _STREAM_ERRORS as e:
                raise ArchiveError(path, f"broken archive at {name} ({e})") from None
            if len(data) != info.size:
                raise ArchiveError(path, f"broken archive: {name} is truncated")
            yield Member(rel, data)
