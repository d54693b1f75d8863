"""Atomic output files: complete or absent; links followed; devices and FIFOs written directly."""

from __future__ import annotations

import os
import threading

import pytest

from data_pipeline import outputs


def _write(path, text: str) -> None:
    with outputs.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def test_a_file_is_replaced_whole_and_a_failure_leaves_the_old_one(tmp_path):
    path = tmp_path / "out.txt"
    _write(path, "first")
    _write(path, "second")
    assert path.read_text() == "second"
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_link_is_followed_so_its_target_gets_the_data(tmp_path):
    (tmp_path / "target.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to(tmp_path / "target.txt")
    _write(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "target.txt").read_text() == "new"


def test_a_fifo_or_device_is_written_directly_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    _write(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == ["through the pipe"]
    assert fifo.is_fifo()
    _write(os.devnull, "discarded")  # a character device
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_writers_at_once_do_not_collide_and_one_whole_file_wins(tmp_path):
    path = tmp_path / "out.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=outputs.write_atomic, args=(path, data)) for data in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert path.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_folder_is_filled_under_a_temporary_name_and_replaces_an_empty_one(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(out, directory=True) as tmp:
            (tmp_path / tmp / "a.txt").write_text("half")
            raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty folder at the path is replaced
    with outputs.atomic_path(out, directory=True) as tmp:
        assert os.path.isdir(tmp) and os.path.dirname(tmp) == str(tmp_path) and tmp != str(out)
        (tmp_path / tmp / "a.txt").write_text("whole")
    assert (out / "a.txt").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_temporary_name_maps_back_to_its_output_for_messages(tmp_path):
    with outputs.atomic_path(tmp_path / "piece.mid") as tmp:
        assert outputs.output_name(tmp) == str(tmp_path / "piece.mid")
        open(tmp, "w").close()
    assert outputs.output_name(str(tmp_path / "other.partial")) == str(tmp_path / "other.partial")
