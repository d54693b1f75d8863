"""musenet-tokenize / musenet-detokenize as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _run(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_tokenize_then_detokenize_round_trip(midi_fixtures, tmp_path):
    src = midi_fixtures / "freedoom1_D_E1M1.mid"
    text = _run("tokenize_midi", str(src))
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("piano violin bass guitar trumpet drums start ")
    ids = _run("tokenize_midi", str(src), "--ids", "--out", str(tmp_path / "song.ids"))
    assert ids.returncode == 0 and ids.stdout == ""
    out = tmp_path / "song.mid"
    back = _run("detokenize_midi", str(tmp_path / "song.ids"), "--out", str(out))
    assert back.returncode == 0, back.stderr
    again = _run("tokenize_midi", str(out))
    assert again.stdout == text.stdout
    # The text form decodes to the same file too, read from stdin.
    out2 = tmp_path / "song2.mid"
    assert _run("detokenize_midi", "-", "--out", str(out2), stdin=text.stdout).returncode == 0
    assert out2.read_bytes() == out.read_bytes()


def test_label_in_prefix(midi_fixtures):
    res = _run("tokenize_midi", str(midi_fixtures / "bach_bwv1.6.mid"), "--label", "bach")
    assert res.returncode == 0 and res.stdout.startswith("bach ")


@pytest.mark.parametrize("content", [b"", b"not midi at all", b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk"])
def test_bad_midi_gives_one_line_error_and_no_output(content, tmp_path):
    src = tmp_path / "bad.mid"
    src.write_bytes(content)
    out = tmp_path / "out.txt"
    res = _run("tokenize_midi", str(src), "--out", str(out))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(src) in lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_usage_errors(tmp_path):
    res = _run("tokenize_midi")
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
    res = _run("detokenize_midi", str(tmp_path / "missing.tokens"), "--out", str(tmp_path / "x.mid"))
    assert res.returncode == 1 and "missing.tokens" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "bad.tokens").write_text("start piano:v10:Q4 end")
    res = _run("detokenize_midi", str(tmp_path / "bad.tokens"), "--out", str(tmp_path / "x.mid"))
    assert res.returncode == 1 and "Q4" in res.stderr and not (tmp_path / "x.mid").exists()
    res = _run("detokenize_midi", str(tmp_path / "bad.tokens"))
    assert res.returncode == 2 and "--out" in res.stderr


def test_labels_are_normalised_and_unreadable_inputs_are_named(midi_fixtures, tmp_path):
    src = midi_fixtures / "bach_bwv1.6.mid"
    labelled = _run("tokenize_midi", str(src), "--label", "Rock Music")  # as the builder names folders
    assert labelled.returncode == 0 and labelled.stdout.startswith("rock_music piano start "), labelled.stderr
    piped = subprocess.run([sys.executable, "-m", "launch.tokenize_midi", "-"], input=src.read_bytes(),
                           capture_output=True, timeout=120)  # '-' reads the MIDI file from stdin
    assert piped.returncode == 0 and piped.stdout.decode() == _run("tokenize_midi", str(src)).stdout
    not_vocab = _run("tokenize_midi", str(src), "--vocab", str(src))
    assert not_vocab.returncode == 1
    assert not_vocab.stderr.strip() == f"error: {src}: not a usable vocab.json ('utf-8' codec can't decode byte " \
                                       "0xe0 in position 13: invalid continuation byte)"
    (tmp_path / "binary.tok").write_bytes(bytes(range(128, 256)))
    binary = _run("detokenize_midi", str(tmp_path / "binary.tok"), "--out", str(tmp_path / "x.mid"))
    assert binary.returncode == 1 and binary.stderr.strip().startswith(f"error: {tmp_path / 'binary.tok'}: not a token")
    assert not (tmp_path / "x.mid").exists()
