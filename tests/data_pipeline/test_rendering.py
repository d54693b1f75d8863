"""MIDI -> WAV through fluidsynth, notes -> piano-roll PNG: audible output, clear errors, atomic files."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from data_pipeline import encoding, rendering
from data_pipeline.vocab import Vocab

HAVE_AUDIO = rendering.find_fluidsynth() is not None and rendering.find_soundfont() is not None
needs_audio = pytest.mark.skipif(not HAVE_AUDIO, reason="needs the fluidsynth program and a GM soundfont "
                                                        "(.ci/run installs them)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vocab():
    return Vocab()


def _clip(notes: encoding.Notes, units: int) -> encoding.Notes:
    keep = notes.start < units
    return encoding.Notes(notes.instrument[keep], notes.pitch[keep], notes.velocity[keep], notes.start[keep],
                          np.minimum(notes.end[keep], units))


@pytest.fixture(scope="module")
def short_midi(tmp_path_factory, midi_fixtures, vocab):
    """(path, notes): the first 4 s of a real piece (pitched instruments and drums), written by our writer."""
    piece = encoding.encode_midi(midi_fixtures / "freedoom1_D_E1M1.mid", vocab)
    notes, _ = encoding.decode_tokens(piece.body, vocab)
    notes = _clip(notes, 400)
    path = tmp_path_factory.mktemp("render") / "short.mid"
    encoding.notes_to_midi(notes, vocab, path)
    return path, notes


def _fake_program(folder, name: str, script: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n{script}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def _fake_soundfont(folder, name: str = "fake.sf2") -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"RIFF\x04\x00\x00\x00sfbk")
    return path


@needs_audio
def test_wav_of_a_real_piece_is_audible_with_its_duration(short_midi, tmp_path):
    midi, notes = short_midi
    wav = tmp_path / "out.wav"
    used = rendering.render_wav(midi, wav)
    assert used.endswith((".sf2", ".sf3"))
    samples, rate = rendering.read_wav(wav)
    assert rate == rendering.SAMPLE_RATE and samples.shape[1] == 2
    last_note_s = notes.end.max() / 100
    # fluidsynth renders past the last event (voices' release, then some silence); what is audible must end
    # shortly after the last note ends.
    audible = np.flatnonzero(np.abs(samples).max(axis=1) > 1e-3)
    assert len(samples) / rate >= last_note_s
    assert last_note_s - 0.05 <= audible[-1] / rate <= last_note_s + 2.0
    # Loud where the music plays: every half second of the first 3.5 s (notes throughout) has sound.
    half = rate // 2
    rms = [float(np.sqrt(np.mean(samples[i * half:(i + 1) * half] ** 2))) for i in range(7)]
    assert min(rms) > 1e-3, rms
    assert not list(tmp_path.glob("*.partial"))


@needs_audio
def test_sample_rate_is_passed_through(short_midi, tmp_path):
    rendering.render_wav(short_midi[0], tmp_path / "low.wav", sample_rate=22050)
    samples, rate = rendering.read_wav(tmp_path / "low.wav")
    assert rate == 22050 and float(np.sqrt(np.mean(samples ** 2))) > 1e-3


def test_missing_fluidsynth_is_a_clear_error(short_midi, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no fluidsynth on this PATH
    assert rendering.find_fluidsynth() is None
    wav = tmp_path / "out.wav"
    with pytest.raises(rendering.RenderError, match="fluidsynth program is not installed") as info:
        rendering.render_wav(short_midi[0], wav, soundfont=_fake_soundfont(tmp_path))
    assert "\n" not in str(info.value) and "apt-get install fluidsynth" in str(info.value)
    assert not wav.exists()


def test_missing_soundfont_is_a_clear_error(tmp_path):
    program = _fake_program(tmp_path, "fluidsynth", "exit 0")
    empty = tmp_path / "no_fonts"
    empty.mkdir()
    with pytest.raises(rendering.RenderError, match=r"no General MIDI soundfont .* pass --soundfont"):
        rendering.resolve_audio(fluidsynth=program, search_dirs=(str(empty), str(tmp_path / "absent")))
    not_a_font = tmp_path / "notes.sf2"
    not_a_font.write_text("hello")
    with pytest.raises(rendering.RenderError, match="not a SoundFont file"):
        rendering.resolve_audio(not_a_font, fluidsynth=program)
    with pytest.raises(rendering.RenderError, match="No such file"):
        rendering.resolve_audio(tmp_path / "absent.sf2", fluidsynth=program)


def test_soundfont_search_takes_the_first_folder_with_one(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "readme.txt").write_text("x")
    expected = _fake_soundfont(second, "b.sf3")
    _fake_soundfont(second, "c.sf2")
    assert rendering.find_soundfont((str(tmp_path / "absent"), str(first), str(second))) == expected
    preferred = _fake_soundfont(second, "default-GM.sf2")
    assert rendering.find_soundfont((str(first), str(second))) == preferred
    os.symlink(tmp_path / "gone.sf2", first / "broken.sf2")  # a dangling link is no soundfont
    assert rendering.find_soundfont((str(first), str(second))) == preferred


def test_failed_synthesis_reports_its_reason_and_leaves_nothing(short_midi, tmp_path):
    program = _fake_program(tmp_path, "fluidsynth", "echo 'fluidsynth: error: out of cheese' >&2\nexit 3")
    wav = tmp_path / "out.wav"
    with pytest.raises(rendering.RenderError, match="fluidsynth failed: fluidsynth: error: out of cheese"):
        rendering.render_wav(short_midi[0], wav, soundfont=_fake_soundfont(tmp_path), fluidsynth=program)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.sf2", "fluidsynth"]


def test_piano_roll_has_one_colour_per_instrument_and_a_drum_band(short_midi, tmp_path, vocab):
    _, notes = short_midi
    png = tmp_path / "roll.png"
    figure = rendering.piano_roll(notes, vocab, png, title="E1M1")
    playing = [vocab.instruments.names[i] for i in np.unique(notes.instrument)]
    assert "drums" in playing and len(playing) >= 3
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == playing
    # Colours: one per instrument, all different, and the bars of each instrument use its colour.
    colours = [rendering.instrument_colour(vocab.instruments.index(n), vocab) for n in playing]
    assert len(set(colours)) == len(playing)
    pitch_ax, drum_ax = figure.axes
    bar_colours = {tuple(np.round(p.get_facecolor()[:3], 4)) for p in pitch_ax.patches}
    assert bar_colours == {tuple(np.round(c[:3], 4)) for c, n in zip(colours, playing) if n != "drums"}
    assert len(drum_ax.collections) == 1  # the drum hits, as markers in their own axes
    hits = drum_ax.collections[0].get_offsets()
    assert len(hits) == np.count_nonzero(notes.instrument == vocab.drums_index)
    np.testing.assert_allclose(np.sort(hits[:, 0]), np.sort(notes.start[notes.instrument == vocab.drums_index]) / 100)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 0 and height > 0
    assert not list(tmp_path.glob("*.partial"))


def test_piano_roll_of_nothing_still_draws(tmp_path, vocab):
    figure = rendering.piano_roll(encoding.Notes.empty(), vocab, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE
    assert figure.axes[0].get_legend() is None


def test_png_write_is_atomic(tmp_path, vocab, short_midi):
    target = tmp_path / "missing_dir" / "roll.png"
    with pytest.raises(FileNotFoundError):
        rendering.piano_roll(short_midi[1], vocab, target)
    assert not (tmp_path / "missing_dir").exists()
