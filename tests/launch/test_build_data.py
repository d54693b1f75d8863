"""musenet-build-data end to end: a real folder with damaged files, and one-line errors for bad input."""

import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from data_pipeline import datasets


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.build_data", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.e2e
def test_directory_build_with_corrupt_files(tmp_path, midi_fixtures):
    manual = tmp_path / "midi"
    (manual / "game").mkdir(parents=True)
    (manual / "bach").mkdir()
    for name in ("freedoom1_D_E1M1.mid", "freedoom1_D_E3M9.mid"):
        shutil.copy(midi_fixtures / name, manual / "game" / name)
    shutil.copy(midi_fixtures / "bach_bwv1.6.mid", manual / "bach" / "bwv1.6.mid")
    (manual / "bach" / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    data_dir = tmp_path / "data"

    result = run_cli("--config=directory", f"--manual_dir={manual}", f"--data_dir={data_dir}",
                     "--num_workers=2")
    assert result.returncode == 0, result.stderr
    assert "rejected 1 (invalid_midi 1)" in result.stdout
    assert [(p, r) for p, r, _ in datasets.load_report(data_dir, "directory")] == [
        ("bach/broken.mid", "invalid_midi")]
    assert datasets.load_vocab(data_dir, "directory").config.labels == ("bach", "game")
    meta = datasets.load_metadata(data_dir, "directory")
    assert sum(meta["examples"].values()) == 3
    assert len(datasets.data_source(data_dir, "directory", "train")) == meta["examples"]["train"]

    again = run_cli("--config=directory", f"--manual_dir={manual}/", f"--data_dir={data_dir}")
    assert again.returncode == 0 and "already built" in again.stdout
    # Other filters or another source must not pass for the old build.
    for other, change in (("--min_notes=5000", "filters.min_notes: 16 built, 5000 asked"),
                          (f"--manual_dir={manual / 'game'}", f"source: 'folder {manual}' built")):
        refused = run_cli("--config=directory", f"--manual_dir={manual}", f"--data_dir={data_dir}", other)
        assert refused.returncode == 2 and change in refused.stderr and "pass --overwrite" in refused.stderr
    # --overwrite replaces the build only once the new one is complete: a failing rebuild keeps the old one.
    build = datasets.dataset_dir(data_dir, "directory")
    before = {p.relative_to(build): p.read_bytes() for p in pathlib.Path(build).rglob("*") if p.is_file()}
    names = sorted(p.name for p in data_dir.iterdir())
    failing = run_cli("--config=directory", f"--manual_dir={manual}", f"--data_dir={data_dir}", "--overwrite",
                      "--min_notes=100000")  # every file rejected: the build fails
    assert failing.returncode == 1 and "no usable MIDI" in failing.stderr.strip().splitlines()[-1], failing.stderr
    assert {p.relative_to(build): p.read_bytes() for p in pathlib.Path(build).rglob("*") if p.is_file()} == before
    rebuilt = run_cli("--config=directory", f"--manual_dir={manual}", f"--data_dir={data_dir}", "--overwrite",
                      "--min_notes=20")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert datasets.load_metadata(data_dir, "directory")["filters"]["min_notes"] == 20
    assert len(datasets.data_source(data_dir, "directory", "train")) == meta["examples"]["train"]
    assert sorted(p.name for p in data_dir.iterdir()) == names  # no staging folder left behind


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_stops_a_build_like_ctrl_c_with_nothing_left_behind(tmp_path):
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "launch.build_data", "--config=default", f"--data_dir={data_dir}",
                             "--num_workers=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(data_dir.glob("musenet_midi/default/incomplete.*/spill.*")):  # converting
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert not list(data_dir.glob("musenet_midi/default/*")), list(data_dir.rglob("*"))


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["--config=lakh"], "--data_dir is required"),
    (["--config=lakh", "--data_dir=OUT"], "--config lakh needs --manual_dir"),
    (["--config=maestro", "--data_dir=OUT", "--manual_dir=MISSING"], "no such folder"),
    (["--config=lakh", "--data_dir=OUT", "--manual_dir=EMPTY"], "lmd_full.tar.gz not found"),
    (["--config=maestro", "--data_dir=OUT", "--manual_dir=EMPTY"], "no maestro-v*-midi.zip"),
    (["--config=default", "--data_dir=OUT", "--manual_dir=EMPTY"], "drop --manual_dir"),
    (["--config=directory", "--data_dir=OUT", "--manual_dir=EMPTY", "--min_notes=0"], "must be positive"),
    (["--config=nope", "--data_dir=OUT"], "one of <default|lakh|maestro|directory>"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    subst = {"OUT": tmp_path / "out", "MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty"}
    args = [f"{flag}={subst.get(value, value)}" for flag, value in (a.split("=", 1) for a in args)]
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_config_names_match_the_builder():
    # In a subprocess: CLI modules define absl flags at import, and other CLIs imported by other tests of this
    # pytest process define some of the same names.
    code = ("from data_pipeline.musenet_midi.musenet_midi_dataset_builder import Builder\n"
            "from launch import build_data\n"
            "assert build_data.CONFIGS == tuple(c.name for c in Builder.BUILDER_CONFIGS), build_data.CONFIGS\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
