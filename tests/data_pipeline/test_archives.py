"""Safe archive reading: hand-made malicious zips / tars / folders and damaged archives."""

import io
import os
import stat
import struct
import tarfile
import zipfile

import pytest

from data_pipeline import archives
from data_pipeline.archives import ArchiveError, Limits

MIB = 1 << 20


def _by_path(members):
    return {m.path: m for m in members}


def _make_zip(path, entries):
    """entries: (ZipInfo or name, bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _tar_add(tf, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("name, expected", [
    ("a.mid", "a.mid"),
    ("./x/./y.mid", "x/y.mid"),
    ("x//y.mid", "x/y.mid"),
    ("win\\dir\\z.mid", "win/dir/z.mid"),
    ("../evil.mid", None),
    ("a/../../evil.mid", None),
    ("a/..", None),
    ("..\\evil.mid", None),
    ("/etc/passwd", None),
    ("\\server\\share.mid", None),
    ("C:/x.mid", None),
    ("c:x.mid", None),
    ("nul\x00.mid", None),
    ("", None),
    ("./", None),
])
def test_safe_member_path(name, expected):
    assert archives.safe_member_path(name) == expected


def test_archive_stem_and_is_archive():
    assert archives.archive_stem("songs.tar.gz") == "songs"
    assert archives.archive_stem("a.b.ZIP") == "a.b"
    assert archives.archive_stem("song.mid") == "song.mid"
    assert archives.is_archive("x.TGZ") and not archives.is_archive("x.gz")


def test_zip_reads_files_and_skips_traversal_and_links(tmp_path):
    link = zipfile.ZipInfo("link.mid")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    fifo = zipfile.ZipInfo("fifo.mid")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    path = _make_zip(tmp_path / "a.zip", [
        ("b/ok.mid", b"second"), ("a.mid", b"first"), ("../up.mid", b"x"), ("/abs.mid", b"x"),
        ("d/../../up2.mid", b"x"), ("..\\win.mid", b"x"), (link, b"/etc/passwd"), (fifo, b""),
        ("dir/", b""),
    ])
    members = list(archives.iter_members(path))
    got = _by_path(members)
    assert [m.path for m in members if m.data is not None] == ["a.mid", "b/ok.mid"]  # sorted
    assert got["a.mid"].data == b"first" and got["b/ok.mid"].data == b"second"
    for bad in ("../up.mid", "/abs.mid", "d/../../up2.mid", "..\\win.mid"):
        assert got[bad].skipped == archives.UNSAFE_PATH and got[bad].data is None
    assert got["link.mid"].skipped == archives.SYMLINK
    assert got["fifo.mid"].skipped == archives.SPECIAL_FILE
    assert "dir/" not in got and "dir" not in got


def test_tar_skips_traversal_links_and_devices(tmp_path):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        _tar_add(tf, "root/ok.mid", b"fine")
        _tar_add(tf, "../evil.mid", b"x")
        _tar_add(tf, "/etc/evil.mid", b"x")
        _tar_add(tf, "root/sym.mid", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        _tar_add(tf, "root/hard.mid", kind=tarfile.LNKTYPE, linkname="../../etc/passwd")
        _tar_add(tf, "root/dev.mid", kind=tarfile.CHRTYPE)
        _tar_add(tf, "root/fifo.mid", kind=tarfile.FIFOTYPE)
        _tar_add(tf, "root/last.mid", b"still read")
    got = _by_path(archives.iter_members(path))
    assert got["root/ok.mid"].data == b"fine" and got["root/last.mid"].data == b"still read"
    assert got["../evil.mid"].skipped == archives.UNSAFE_PATH
    assert got["/etc/evil.mid"].skipped == archives.UNSAFE_PATH
    assert got["root/sym.mid"].skipped == archives.SYMLINK
    assert got["root/hard.mid"].skipped == archives.HARDLINK
    assert got["root/dev.mid"].skipped == archives.SPECIAL_FILE
    assert got["root/fifo.mid"].skipped == archives.SPECIAL_FILE


def test_zip_bomb_declared_size_is_skipped_unread(tmp_path):
    path = _make_zip(tmp_path / "bomb.zip", [("bomb.mid", bytes(20 * MIB)), ("ok.mid", b"ok")])
    assert os.path.getsize(path) < MIB // 4  # 20 MiB of zeros deflates to ~20 KiB
    got = _by_path(archives.iter_members(path, limits=Limits(max_member_bytes=MIB, max_total_bytes=2 * MIB)))
    assert got["bomb.mid"].skipped == archives.TOO_LARGE
    assert got["ok.mid"].data == b"ok"


def _patch_declared_sizes(path, new_size):
    """Rewrites every local and central header's uncompressed size: a zip whose header lies."""
    raw = bytearray(path.read_bytes())
    for sig, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = raw.find(sig)
        while pos >= 0:
            struct.pack_into("<I", raw, pos + size_offset, new_size)
            pos = raw.find(sig, pos + 4)
    path.write_bytes(bytes(raw))


def test_zip_bomb_with_lying_header_is_not_trusted(tmp_path):
    path = _make_zip(tmp_path / "liar.zip", [("liar.mid", bytes(8 * MIB))])
    _patch_declared_sizes(path, 100)  # claims 100 bytes, holds 8 MiB
    [member] = archives.iter_members(path, limits=Limits(max_member_bytes=MIB, max_total_bytes=2 * MIB))
    # zipfile stops at the declared size, so the CRC cannot match: skipped, and never 8 MiB read.
    assert member.skipped == archives.CORRUPT_MEMBER and member.data is None


def test_total_budget_stops_many_small_members(tmp_path):
    path = _make_zip(tmp_path / "many.zip", [(f"{i:02d}.mid", bytes(200_000)) for i in range(20)])
    seen = []
    with pytest.raises(ArchiveError, match="expands past the limit"):
        for m in archives.iter_members(path, limits=Limits(max_member_bytes=MIB, max_total_bytes=MIB)):
            seen.append(m)
    assert 0 < len(seen) <= 5


def test_tar_gz_bomb_is_refused_before_decompressing(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        _tar_add(tf, "small.mid", b"ok")
        _tar_add(tf, "huge.mid", bytes(40 * MIB))
    assert os.path.getsize(path) < MIB
    limits = Limits(max_member_bytes=MIB, max_total_bytes=4 * MIB)
    seen = []
    with pytest.raises(ArchiveError, match="expands past the limit"):
        for m in archives.iter_members(path, limits=limits):
            seen.append(m)
    assert [m.path for m in seen] == ["small.mid"]
    # With room in the total budget the member is skipped (too large) and reading goes on.
    got = _by_path(archives.iter_members(path, limits=Limits(max_member_bytes=MIB, max_total_bytes=64 * MIB)))
    assert got["huge.mid"].skipped == archives.TOO_LARGE and got["small.mid"].data == b"ok"


def test_encrypted_zip_member_is_skipped(tmp_path):
    path = _make_zip(tmp_path / "enc.zip", [("secret.mid", b"data")])
    raw = bytearray(path.read_bytes())
    pos = raw.find(b"PK\x01\x02")
    raw[pos + 8] |= 0x1  # general purpose flag: encrypted
    path.write_bytes(bytes(raw))
    [member] = archives.iter_members(path)
    assert member.skipped == archives.ENCRYPTED


def test_corrupt_zip_member_crc_is_skipped_and_others_read(tmp_path):
    path = tmp_path / "crc.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("bad.mid", b"A" * 1000)
        zf.writestr("good.mid", b"B" * 10)
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"A" * 1000) + 500] = ord("Z")  # flip stored data: CRC mismatch
    path.write_bytes(bytes(raw))
    got = _by_path(archives.iter_members(path))
    assert got["bad.mid"].skipped == archives.CORRUPT_MEMBER and "CRC" in got["bad.mid"].detail
    assert got["good.mid"].data == b"B" * 10


@pytest.mark.parametrize("name, content", [
    ("junk.zip", b"this is not a zip file at all" * 10),
    ("empty.zip", b""),
    ("junk.tar.gz", b"\x1f\x8b\x08\x00garbage that is no gzip stream" * 4),
    ("empty.tar", b""),
    ("junk.tar", b"x" * 2048),
])
def test_unreadable_archives_raise_one_line_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ArchiveError) as exc:
        list(archives.iter_members(path))
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_truncated_archives_raise(tmp_path):
    full = tmp_path / "full.zip"
    _make_zip(full, [(f"{i}.mid", os.urandom(5000)) for i in range(5)])
    cut = tmp_path / "cut.zip"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="zip"):
        list(archives.iter_members(cut))

    tgz = tmp_path / "full.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for i in range(5):
            _tar_add(tf, f"{i}.mid", os.urandom(50_000))
    cut_tgz = tmp_path / "cut.tar.gz"
    cut_tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="broken archive"):
        list(archives.iter_members(cut_tgz))


def test_tar_with_damaged_header_in_the_middle_raises(tmp_path):
    path = tmp_path / "mid.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        _tar_add(tf, "a.mid", b"a" * 512)
        _tar_add(tf, "b.mid", b"b" * 512)
    raw = bytearray(path.read_bytes())
    raw[1024:1124] = b"\xff" * 100  # second header (after a's header and one data block)
    path.write_bytes(bytes(raw))
    seen = []
    with pytest.raises(ArchiveError, match="bad header"):
        for m in archives.iter_members(path):
            seen.append(m.path)
    assert seen == ["a.mid"]


def test_folder_skips_links_and_special_files_and_opens_archives(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mid").write_bytes(b"secret")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mid").write_bytes(b"a")
    (root / "notes.txt").write_bytes(b"not wanted")
    os.symlink(outside / "secret.mid", root / "sub" / "link.mid")
    os.symlink(outside, root / "linkdir")
    os.mkfifo(root / "pipe.mid")
    _make_zip(root / "sub" / "pack.zip", [("x/b.mid", b"b"), ("../c.mid", b"c")])

    members = list(archives.iter_members(root, select=lambda p: p.endswith(".mid"), open_archives=True))
    got = _by_path(members)
    assert got["sub/a.mid"].data == b"a"
    assert got["sub/pack.zip/x/b.mid"].data == b"b"
    assert got["sub/pack.zip/../c.mid"].skipped == archives.UNSAFE_PATH
    assert got["sub/link.mid"].skipped == archives.SYMLINK
    assert got["linkdir"].skipped == archives.SYMLINK
    assert got["pipe.mid"].skipped == archives.SPECIAL_FILE
    assert got["notes.txt"].skipped == archives.NOT_SELECTED and got["notes.txt"].data is None
    assert not any(m.data == b"secret" for m in members)
    # Deterministic order.
    assert [m.path for m in members] == [m.path for m in archives.iter_members(
        root, select=lambda p: p.endswith(".mid"), open_archives=True)]


def test_a_damaged_archive_in_a_folder_costs_only_its_unreadable_part(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.mid").write_bytes(b"a")
    (root / "bad.zip").write_bytes(b"PK this is not a zip")
    tgz = tmp_path / "full.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        _tar_add(tf, "first.mid", b"f" * 100)  # compresses well: read before the cut
        for i in range(5):
            _tar_add(tf, f"{i}.mid", os.urandom(50_000))
    (root / "cut.tar.gz").write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    (root / "z.mid").write_bytes(b"z")
    got = _by_path(archives.iter_members(root, open_archives=True))
    assert got["a.mid"].data == b"a" and got["z.mid"].data == b"z"  # the files after them are read too
    assert got["bad.zip"].skipped == got["cut.tar.gz"].skipped == archives.BROKEN_ARCHIVE
    assert "not a readable zip archive" in got["bad.zip"].detail
    assert got["cut.tar.gz/first.mid"].data == b"f" * 100
    # The whole read's size budget still stops everything.
    with pytest.raises(archives.BudgetError):
        list(archives.iter_members(root, open_archives=True, limits=Limits(max_total_bytes=50)))


def test_folder_member_size_limit(tmp_path):
    (tmp_path / "big.mid").write_bytes(bytes(2 * MIB))
    (tmp_path / "small.mid").write_bytes(b"s")
    got = _by_path(archives.iter_members(tmp_path, limits=Limits(max_member_bytes=MIB)))
    assert got["big.mid"].skipped == archives.TOO_LARGE and got["small.mid"].data == b"s"


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(ArchiveError, match="no such file"):
        list(archives.iter_members(tmp_path / "nope.zip"))
    (tmp_path / "song.mid").write_bytes(b"MThd")
    with pytest.raises(ArchiveError, match="not a folder or a supported archive"):
        list(archives.iter_members(tmp_path / "song.mid"))
