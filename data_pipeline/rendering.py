"""Listening to and looking at pieces: MIDI -> WAV through the `fluidsynth` program, notes -> piano-roll PNG.

    wav = render_wav("song.mid", "song.wav")                      # soundfont: first one found on the system
    figure = piano_roll(notes, vocab, "song.png", title="song")   # notes: `encoding.Notes` in time units

Audio is synthesised by the FluidSynth command-line program (Debian/Ubuntu package `fluidsynth`) with a
General MIDI SoundFont (e.g. package `timgm6mb-soundfont`, 6 MB), not by a Python binding: the program is a
stable, widely packaged interface, and nothing needs compiling. A missing program or soundfont is a
`RenderError` whose one-line message says what to install or pass.

Both writers are atomic: the output appears complete or not at all (temporary name, then rename).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave

import numpy as np

from data_pipeline import outputs
from data_pipeline.encoding import Notes
from data_pipeline.vocab import Vocab

SAMPLE_RATE = 44100
# Where distributions install SoundFonts (Debian/Ubuntu, Fedora/Arch, Homebrew, user folders).
SOUNDFONT_DIRS = (
    "/usr/share/sounds/sf2",
    "/usr/share/sounds/sf3",
    "/usr/share/soundfonts",
    "/usr/local/share/soundfonts",
    "/opt/homebrew/share/soundfonts",
    "~/.local/share/soundfonts",
)
SOUNDFONT_SUFFIXES = (".sf2", ".sf3")
INSTALL_HINT = "e.g. apt-get install fluidsynth timgm6mb-soundfont"


class RenderError(ValueError):
    """A WAV or PNG that cannot be produced (missing program or soundfont, synth failure); one-line message."""


# -- audio ------------------------------------------------------------------------------------------
def find_fluidsynth(path: str | None = None) -> str | None:
    """Absolute path of the `fluidsynth` program on `path` (default: $PATH), or None."""
    return shutil.which("fluidsynth", path=path)


def find_soundfont(dirs: tuple[str, ...] = SOUNDFONT_DIRS) -> str | None:
    """A *.sf2 / *.sf3 file from the first folder of `dirs` that has one.

    Within a folder, a `default*` file comes first (Debian's `default-GM.sf2` is the system's chosen General
    MIDI font, managed by update-alternatives), then name order. Broken links are skipped.
    """
    for folder in dirs:
        folder = os.path.expanduser(folder)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder), key=lambda n: (not n.lower().startswith("default"), n)):
            candidate = os.path.join(folder, name)
            if name.lower().endswith(SOUNDFONT_SUFFIXES) and os.path.isfile(candidate):
                return candidate
    return None


def check_soundfont(path: str | os.PathLike) -> str:
    """Returns `path` if it is a readable SoundFont (RIFF `sfbk`) file, else raises RenderError.

    fluidsynth itself only logs an unusable soundfont and then writes silence with exit code 0, so this
    is checked before synthesising.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise RenderError(f"{path}: {e.strerror or e} (soundfont)") from None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        raise RenderError(f"{path}: not a SoundFont file (.sf2/.sf3)")
    return path


def resolve_audio(soundfont: str | os.PathLike | None = None, fluidsynth: str | None = None,
                  search_dirs: tuple[str, ...] = SOUNDFONT_DIRS) -> tuple[str, str]:
    """(fluidsynth program, soundfont path) to render with, or RenderError saying what is missing.

    Args:
      soundfont: an .sf2/.sf3 file; None: the first found in `search_dirs`.
      fluidsynth: the program; None: `fluidsynth` on $PATH.
    """
    program = fluidsynth or find_fluidsynth()
    if program is None or not os.access(program, os.X_OK):
        raise RenderError(f"cannot write WAV: the fluidsynth program is not installed ({INSTALL_HINT})")
    if soundfont is None:
        soundfont = find_soundfont(search_dirs)
        if soundfont is None:
            raise RenderError(f"cannot write WAV: no General MIDI soundfont (.sf2/.sf3) found in "
                              f"{', '.join(search_dirs)}; pass --soundfont ({INSTALL_HINT})")
    return program, check_soundfont(soundfont)


def render_wav(midi_path: str | os.PathLike, wav_path: str | os.PathLike, soundfont: str | os.PathLike | None = None,
               sample_rate: int = SAMPLE_RATE, fluidsynth: str | None = None, timeout_s: float = 600.0) -> str:
    """Synthesises a MIDI file to a 16-bit stereo WAV file with fluidsynth.

    Args:
      midi_path: the MIDI file.
      wav_path: output; written under a temporary name and renamed (`outputs.atomic_path`): complete or absent.
      soundfont: .sf2/.sf3 file; None: the first found in `SOUNDFONT_DIRS`.
      sample_rate: samples per second.
      fluidsynth: the program to run; None: `fluidsynth` on $PATH.
      timeout_s: wall-clock limit for the synthesis, in seconds.
    Returns:
      The soundfont used.
    Raises:
      RenderError: no program, no (valid) soundfont, or the synthesis failed.
    """
    program, soundfont = resolve_audio(soundfont, fluidsynth)
    midi_path, wav_path = os.fspath(midi_path), os.fspath(wav_path)
    if not os.path.isfile(midi_path):
        raise RenderError(f"{midi_path}: no such MIDI file")
    with outputs.atomic_path(wav_path) as tmp:
        # -n/-i: no MIDI input driver, no shell; -q: no banner; -T wav: the type, as the temporary name has no
        # .wav suffix to guess it from; -F renders as fast as possible instead of in real time.
        cmd = [program, "-n", "-i", "-q", "-T", "wav", "-O", "s16", "-r", str(int(sample_rate)), "-F", tmp,
               soundfont, midi_path]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RenderError(f"{wav_path}: fluidsynth did not finish within {timeout_s:.0f} s") from None
        except OSError as e:
            raise RenderError(f"cannot run {program}: {e.strerror or e}") from None
        if res.returncode != 0 or not os.path.exists(tmp) or (os.path.isfile(tmp) and os.path.getsize(tmp) <= 44):
            lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit code {res.returncode}, no audio written"
            raise RenderError(f"{wav_path}: fluidsynth failed: {why}")
    return soundfont


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32[S, C] samples in -1..1, sample rate) of a 16-bit PCM WAV file (S samples, C channels)."""
    with wave.open(os.fspath(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise RenderError(f"{path}: only 16-bit WAV is supported (got {8 * w.getsampwidth()}-bit)")
        frames = w.readframes(w.getnframes())
        channels, rate = w.getnchannels(), w.getframerate()
    samples = np.frombuffer(frames, "<i2").reshape(-1, channels)
    return samples.astype(np.float32) / 32768.0, rate


# -- piano roll -------------------------------------------------------------------------------------
def piano_roll(notes: Notes, vocab: Vocab, path: str | os.PathLike | None = None, title: str | None = None,
               dpi: int = 100, span: tuple[int, int] | None = None):
    """Draws `notes` as a piano roll; saves a PNG if `path` is given.

    Pitched notes are bars (x: seconds, y: MIDI pitch), one colour per instrument class; drum hits are
    markers in their own band below (y: GM percussion key). Colours are fixed per instrument class, so the
    same instrument looks the same in every picture. Uses matplotlib's Agg canvas directly (no pyplot), so it
    needs no display and leaves no global figure state behind.

    Args:
      notes: `encoding.Notes` in time units (`vocab.config.time_unit_ms`).
      vocab: the vocabulary the notes belong to (instrument names, time unit, drums class).
      path: PNG file to write (atomically), or None.
      title: figure title.
      span: (start, end) time units of a regenerated span, shaded grey with dashed edges.
    Returns:
      The matplotlib `Figure`; its legend labels are the instrument names drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    seconds_per_unit = vocab.config.time_unit_ms / 1000.0
    drums = notes.instrument == vocab.drums_index
    has_drums, has_pitched = bool(drums.any()), bool((~drums).any())
    figure = Figure(figsize=(12, 6 if has_drums and has_pitched else 4.5), dpi=dpi)
    FigureCanvasAgg(figure)
    if has_drums and has_pitched:
        pitch_ax, drum_ax = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    elif has_drums:
        pitch_ax, drum_ax = None, figure.subplots()
    else:
        pitch_ax, drum_ax = figure.subplots(), None

    handles = []
    for i in np.unique(notes.instrument).tolist():
        sel = notes.instrument == i
        name = vocab.instruments.names[i]
        colour = instrument_colour(i, vocab)
        start = notes.start[sel] * seconds_per_unit
        if i == vocab.drums_index:
            drum_ax.scatter(start, notes.pitch[sel], s=10, marker="x", color=colour, linewidths=1)
            handles.append(Line2D([], [], marker="x", linestyle="", color=colour, label=name))
        else:
            length = (notes.end[sel] - notes.start[sel]) * seconds_per_unit
            pitch_ax.barh(notes.pitch[sel], length, left=start, height=0.8, color=colour, alpha=0.8,
                          linewidth=0)
            handles.append(Patch(color=colour, label=name))

    if span is not None:
        for ax in (pitch_ax, drum_ax):
            if ax is not None:
                ax.axvspan(span[0] * seconds_per_unit, span[1] * seconds_per_unit, color="0.5", alpha=0.12,
                           linewidth=0)
                for edge in span:
                    ax.axvline(edge * seconds_per_unit, color="0.3", linestyle="--", linewidth=1)
    bottom = drum_ax if drum_ax is not None else pitch_ax
    bottom.set_xlabel("time (s)")
    if pitch_ax is not None:
        pitch_ax.set_ylabel("pitch (MIDI)")
        pitch_ax.grid(axis="y", alpha=0.3)
    if drum_ax is not None:
        drum_ax.set_ylabel("drums (GM key)")
        drum_ax.grid(axis="y", alpha=0.3)
    top = pitch_ax if pitch_ax is not None else drum_ax
    if len(notes):
        # Outside the axes, to the right, so that it hides no notes.
        top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small",
                   frameon=False)
    else:
        top.text(0.5, 0.5, "no notes", transform=top.transAxes, ha="center", va="center")
    if title:
        top.set_title(title)
    figure.tight_layout()
    if path is not None:
        save_png(figure, path)
    return figure


def instrument_colour(instrument: int, vocab: Vocab) -> tuple[float, float, float, float]:
    """RGBA colour of an instrument class: tab10 for up to 10 classes, tab20 cycled for larger sets."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if vocab.instruments.num_classes <= 10 else "tab20"]
    return cmap(int(instrument) % cmap.N)


def save_png(figure, path: str | os.PathLike) -> None:
    """Saves a figure as PNG atomically (temporary name, then rename)."""
    with outputs.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
