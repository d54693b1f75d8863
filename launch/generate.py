r"""musenet-generate: new music from an exported model, as MIDI (and optionally WAV and a piano-roll PNG).

    musenet-generate --model exports/tiny --genre bach --instruments piano,violin --seconds 30 --out song.mid
    musenet-generate --model exports/tiny --genre none --instruments piano,drums --seconds 60 \
        --primer start.mid --primer_seconds 8 --temperature 0.9 --top_p 0.95 --seed 3 --num_samples 4 \
        --out song.mid --wav song.wav --pianoroll song.png       # writes song-1.mid .. song-4.mid (+ .wav, .png)

--model is a `musenet-export` directory. --genre is one of the model's labels (normalised like the dataset's
folder names) or `none` for an unlabelled piece. --instruments are instrument-class names of the model's
vocabulary; only those can play. --seconds is the total length of the music, primer included.

Structured decoding (`musenet_jax.sampling`, module doc): the sampler knows which notes sound, so it writes
each time step in the encoding's order, releases only sounding notes, releases every note before the piece
ends, and keeps any note from sounding longer than --max_note_seconds (0: no limit; default
`musenet_jax.sampling.DEFAULT_MAX_NOTE_SECONDS`): time passes at most up to that limit, then the note ends.

Primer: the file is encoded with the model's vocabulary and its first --primer_seconds kept: notes that start
later are dropped, notes still sounding at the cut are released there, and trailing rest is kept up to the cut.
The kept notes are the start of every output piece, verbatim. A primer that plays an instrument not in
--instruments is refused (the message names them), so that the output never has instruments the user did not
choose.

Infilling and accompaniment (`musenet_jax.infilling`; the model must have been trained with the infilling mix,
i.e. have the vocabulary's `hole` / `fill` tokens):

    musenet-generate --model exports/tiny --genre bach --primer in.mid --infill_from 8 --infill_to 12 \
        [--infill_instruments piano] --out out.mid --pianoroll out.png
    musenet-generate --model exports/tiny --genre none --accompany melody.mid [--accompany_tracks piano] \
        --instruments bass,drums --out out.mid

--infill_from / --infill_to (seconds) regenerate the notes of the primer that start in that span (of every
instrument, or of --infill_instruments), keeping every other note verbatim, so the output is the primer with the
span rewritten, as long as the primer. --accompany keeps the file's parts named by --accompany_tracks (instrument
classes of the file's tracks, default all of them) and writes --instruments under them, for the file's length.
--seconds and --primer_seconds do not apply. A span outside the primer, an empty span, a track the file does not
have and an instrument the given parts already play are refused in one line.

Exit codes: 0 done; 2 a usage error (a missing or malformed flag, judged without the model); 1 bad input
(an unreadable model directory or primer, a genre / instrument the model does not know, --seconds beyond the
model's maximum) or a WAV that cannot be made. Bad input is found before anything is written; every file is
written to a temporary name and renamed. When --wav was asked for but fluidsynth or a soundfont is missing on
this system, the MIDI (and PNG) files are still written, then the tool exits 1 saying what to install.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import numpy as np
from absl import flags

from data_pipeline import encoding, infill, rendering
from data_pipeline.vocab import Vocab, normalize_label
from launch import cli

_MODEL = flags.DEFINE_string("model", None, "Export directory written by musenet-export (required).")
_GENRE = flags.DEFINE_string("genre", None, "Genre label of the model's vocabulary, or 'none' (required).")
_INSTRUMENTS = flags.DEFINE_list("instruments", None, "Comma-separated instrument names, e.g. piano,violin,drums.")
_SECONDS = flags.DEFINE_float("seconds", None, "Length of the music in seconds, primer included (required).")
_PRIMER = flags.DEFINE_string("primer", None, "MIDI file whose start the pieces continue.")
_PRIMER_SECONDS = flags.DEFINE_float("primer_seconds", None, "Keep only this many seconds of the primer.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the K most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed and flags give the same pieces.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Pieces to generate (as one batch).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Cap on body tokens per piece, primer included; longer "
                                    "pieces than the model's context are written in sliding windows "
                                    "(default: generous, musenet_jax.sampling.default_max_tokens).")
_MAX_NOTE_SECONDS = flags.DEFINE_float(
    "max_note_seconds", None, "Longest a note may sound, in seconds (0: no limit; default: "
    "musenet_jax.sampling.DEFAULT_MAX_NOTE_SECONDS).")
_OUT = flags.DEFINE_string("out", None, "Output MIDI file; with --num_samples N > 1: OUT-1.mid .. OUT-N.mid.")
_WAV = flags.DEFINE_string("wav", None, "Also render audio to this WAV file (needs the fluidsynth program).")
_SOUNDFONT = flags.DEFINE_string("soundfont", None, "SoundFont (.sf2/.sf3) for --wav; default: the first "
                                 "one found in the system's soundfont folders.")
_PIANOROLL = flags.DEFINE_string("pianoroll", None, "Also draw a piano roll to this PNG file.")
_INFILL_FROM = flags.DEFINE_float("infill_from", None, "Regenerate the --primer's span from this second ...")
_INFILL_TO = flags.DEFINE_float("infill_to", None, "... to this second (with --infill_from and --primer).")
_INFILL_INSTRUMENTS = flags.DEFINE_list("infill_instruments", None, "Regenerate only these instruments' notes in "
                                        "the span (default: every instrument).")
_ACCOMPANY = flags.DEFINE_string("accompany", None, "MIDI file whose parts are kept and accompanied by "
                                 "--instruments.")
_ACCOMPANY_TRACKS = flags.DEFINE_list("accompany_tracks", None, "The parts of --accompany to keep, by instrument "
                                      "class (default: all of them).")

NO_GENRE = "none"


def numbered(path: str | None, index: int, count: int) -> str | None:
    """`song.mid` -> `song-3.mid` for piece 3 of several; unchanged for a single piece."""
    if path is None or count == 1:
        return path
    stem, suffix = os.path.splitext(path)
    return f"{stem}-{index}{suffix}"


def task() -> str:
    """'infill', 'accompany' or 'continue', from the flags."""
    if _INFILL_FROM.value is not None or _INFILL_TO.value is not None or _INFILL_INSTRUMENTS.value is not None:
        return "infill"
    return "accompany" if _ACCOMPANY.value is not None or _ACCOMPANY_TRACKS.value is not None else "continue"


def check_task_flags() -> None:
    """Usage errors of --infill_* and --accompany*."""
    mode = task()
    if _INFILL_FROM.value is not None and (_ACCOMPANY.value is not None or _ACCOMPANY_TRACKS.value is not None):
        raise cli.UsageError("--infill_from and --accompany are two tasks; choose one")
    for flag in (_SECONDS, _PRIMER_SECONDS, _MAX_TOKENS):
        if flag.value is not None:
            other = "infill_from" if mode == "infill" else "accompany"
            raise cli.UsageError(f"--{flag.name} does not apply to --{other}: the piece keeps its file's length")
    if mode == "infill" and _INSTRUMENTS.value is not None:
        raise cli.UsageError("--instruments does not apply to --infill_from: the piece keeps the primer's "
                             "instruments (--infill_instruments chooses which of them are regenerated)")
    if mode == "infill":
        missing = [f"--{f.name}" for f in (_INFILL_FROM, _INFILL_TO, _PRIMER) if f.value is None]
        if missing:
            raise cli.UsageError(f"infilling needs {', '.join(missing)}")
        lo, hi = _INFILL_FROM.value, _INFILL_TO.value
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            raise cli.UsageError(f"the span --infill_from {lo:g} --infill_to {hi:g} is empty or negative; "
                                 f"need 0 <= from < to (seconds)")
        if _INFILL_INSTRUMENTS.value is not None and not [x for x in _INFILL_INSTRUMENTS.value if x.strip()]:
            raise cli.UsageError("--infill_instruments needs at least one instrument name")
    else:
        if _ACCOMPANY.value is None:
            raise cli.UsageError("--accompany_tracks needs --accompany")
        if _PRIMER.value is not None:
            raise cli.UsageError("--primer does not apply to --accompany (the file to accompany is the primer)")
        if _INSTRUMENTS.value is None or not [x for x in _INSTRUMENTS.value if x.strip()]:
            raise cli.UsageError("--accompany needs --instruments, the parts to write")
        if _ACCOMPANY_TRACKS.value is not None and not [x for x in _ACCOMPANY_TRACKS.value if x.strip()]:
            raise cli.UsageError("--accompany_tracks needs at least one instrument name")


def check_flags() -> None:
    """Usage errors: what can be judged from the flags alone, before loading anything."""
    needed = (_MODEL, _GENRE, _INSTRUMENTS, _SECONDS, _OUT) if task() == "continue" else (_MODEL, _GENRE, _OUT)
    missing = [f"--{f.name}" for f in needed if f.value is None]
    if missing:
        raise cli.UsageError(f"missing required flags: {', '.join(missing)}")
    if task() != "continue":
        check_task_flags()
    elif not [s for s in _INSTRUMENTS.value if s.strip()]:
        raise cli.UsageError("--instruments needs at least one instrument name")
    elif not math.isfinite(_SECONDS.value) or _SECONDS.value <= 0:
        raise cli.UsageError(f"--seconds must be > 0, got {_SECONDS.value}")
    if _PRIMER_SECONDS.value is not None:
        if _PRIMER.value is None:
            raise cli.UsageError("--primer_seconds needs --primer")
        if not math.isfinite(_PRIMER_SECONDS.value) or _PRIMER_SECONDS.value <= 0:
            raise cli.UsageError(f"--primer_seconds must be > 0, got {_PRIMER_SECONDS.value}")
    if not (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value > 0):
        raise cli.UsageError(f"--temperature must be > 0, got {_TEMPERATURE.value}")
    if _TOP_K.value < 0:
        raise cli.UsageError(f"--top_k must be >= 0, got {_TOP_K.value}")
    if not 0 < _TOP_P.value <= 1:
        raise cli.UsageError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
    if _NUM_SAMPLES.value < 1:
        raise cli.UsageError(f"--num_samples must be >= 1, got {_NUM_SAMPLES.value}")
    if _MAX_TOKENS.value is not None and _MAX_TOKENS.value < 1:
        raise cli.UsageError(f"--max_tokens must be >= 1, got {_MAX_TOKENS.value}")
    if _MAX_NOTE_SECONDS.value is not None and not (math.isfinite(_MAX_NOTE_SECONDS.value)
                                                     and _MAX_NOTE_SECONDS.value >= 0):
        raise cli.UsageError(f"--max_note_seconds must be >= 0 (0: no limit), got {_MAX_NOTE_SECONDS.value}")
    if _SOUNDFONT.value is not None and _WAV.value is None:
        raise cli.UsageError("--soundfont needs --wav")
    outputs = [p for p in (_OUT.value, _WAV.value, _PIANOROLL.value) if p is not None]
    if len({os.path.abspath(p) for p in outputs}) < len(outputs):
        raise cli.UsageError("--out, --wav and --pianoroll must be different files")
    for path in outputs:
        if os.path.isdir(path):
            raise cli.UsageError(f"{path} is a directory; give a file name")
    for flag in (_PRIMER, _ACCOMPANY):
        if flag.value is not None:
            source = os.path.realpath(flag.value)
            if any(os.path.realpath(path) == source for path in output_paths()):
                raise cli.UsageError(f"--{flag.name} {flag.value} is also an output file; write the piece elsewhere")


def output_paths() -> list[str]:
    """Every file the run will write: --out, --wav, --pianoroll, numbered per piece."""
    return [numbered(path, k, _NUM_SAMPLES.value) for path in (_OUT.value, _WAV.value, _PIANOROLL.value)
            if path is not None for k in range(1, _NUM_SAMPLES.value + 1)]


def check_outputs() -> None:
    """Bad input: an output that cannot be written is found before the model loads, not after a piece."""
    folders = {}
    for path in output_paths():
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory; give another --out / --wav / --pianoroll")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(parent):
            raise ValueError(f"{path}: output folder {parent} does not exist")
        if not os.path.isdir(parent):
            raise ValueError(f"{path}: {parent} is not a folder")
        folders.setdefault(parent, path)
    for parent, path in folders.items():
        try:  # Permissions alone do not tell (root, read-only mounts, special file systems): try.
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            raise ValueError(f"{path}: cannot write in {parent} ({e.strerror or e})") from None


def resolve_label(genre: str, vocab: Vocab) -> str | None:
    """--genre -> the vocab label (None for 'none'); ValueError listing the valid ones."""
    valid = [*vocab.config.labels, NO_GENRE]
    try:
        label = normalize_label(genre)
    except ValueError:
        label = genre
    if label == NO_GENRE:
        return None
    if label not in vocab.config.labels:
        raise ValueError(f"unknown genre {genre!r} for this model; valid: {', '.join(valid)}")
    return label


def resolve_instruments(names: list[str], vocab: Vocab) -> list[str]:
    """--instruments -> distinct instrument-class names in vocab order; ValueError listing the valid ones."""
    chosen = []
    for name in names:
        name = name.strip().lower()
        if name and name not in chosen:
            vocab.instruments.index(name)  # raises "unknown instrument 'x'; valid: ..."
            chosen.append(name)
    return sorted(chosen, key=vocab.instruments.index)


def primer_body(path: str, vocab: Vocab, seconds: float | None,
                instruments: list[str]) -> tuple[np.ndarray, encoding.Notes, int]:
    """`encoding.opening_body` of the --primer file, for --instruments (its Raises: MidiError, ValueError)."""
    return encoding.opening_body(path, vocab, seconds, instruments, names=("--primer_seconds", "--instruments"))


def read_vocab(model_dir: str) -> Vocab:
    """The export's vocabulary, read without JAX so that flag values are checked in a second."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir}: no such model directory (expected a musenet-export output)")
    for name in ("config.json", "vocab.json", "model.safetensors"):  # musenet_jax.export's file names
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ValueError(f"{model_dir}: not a musenet export (no {name})")
    try:
        return Vocab.load(os.path.join(model_dir, "vocab.json"))
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, wrong format, inconsistent fields
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{model_dir}/vocab.json: not a usable vocabulary ({detail})") from None


def read_model_config(model_dir: str):
    """The export's ModelConfig, checked against its vocab; ExportError with a one-line message."""
    from musenet_jax import export

    try:
        _, config, _ = export.read_export_config(model_dir)
    except export.ExportError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # a config.json that parses but is not a model config
        detail = " ".join(str(e).split()) or type(e).__name__
        raise export.ExportError(f"{model_dir}/config.json: not a usable model config ({detail})") from None
    return config


def read_piece(path: str, vocab: Vocab) -> tuple[encoding.Notes, int]:
    """The notes of a whole MIDI file under the model's vocabulary, and its length (units)."""
    notes, duration = encoding.decode_tokens(encoding.encode_midi(path, vocab).body, vocab)
    if len(notes) == 0:
        raise ValueError(f"{path}: no notes the model's vocabulary can hold")
    return notes, duration


def task_span(vocab: Vocab, notes: encoding.Notes, duration: int):
    """(notes given to the model, the span to write, accompaniment?) for --infill_* / --accompany*, checked
    against the file (one-line ValueErrors: a span outside it, a track it does not have, a clash)."""
    unit_s = vocab.config.time_unit_ms / 1000.0
    present = [vocab.instruments.names[i] for i in np.unique(notes.instrument).tolist()]
    if task() == "infill":
        lo, hi = round(_INFILL_FROM.value / unit_s), round(_INFILL_TO.value / unit_s)
        if hi > duration:
            raise ValueError(f"the span ends at {_INFILL_TO.value:g} s, after the primer's {duration * unit_s:g} s")
        if lo >= hi:
            raise ValueError(f"the span {_INFILL_FROM.value:g}..{_INFILL_TO.value:g} s is shorter than one time unit")
        chosen = None
        if _INFILL_INSTRUMENTS.value is not None:
            names = resolve_instruments(_INFILL_INSTRUMENTS.value, vocab)
            absent = [n for n in names if n not in present]
            if absent:
                raise ValueError(f"the primer has no {', '.join(absent)} to regenerate; it plays {', '.join(present)}")
            chosen = tuple(vocab.instruments.index(n) for n in names)
        return notes, infill.Span(lo, hi, chosen), False
    tracks = present if _ACCOMPANY_TRACKS.value is None else resolve_instruments(_ACCOMPANY_TRACKS.value, vocab)
    unknown = [t for t in tracks if t not in present]
    if unknown:
        raise ValueError(f"{_ACCOMPANY.value} has no {', '.join(unknown)} track; its parts: {', '.join(present)}")
    given = notes.take(np.isin(notes.instrument, [vocab.instruments.index(t) for t in tracks]))
    write = [vocab.instruments.index(n) for n in resolve_instruments(_INSTRUMENTS.value, vocab)]
    return given, infill.accompaniment_span(given, duration, write, vocab), True


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    check_outputs()
    if task() != "continue":
        return main_task()
    seconds, num_samples = _SECONDS.value, _NUM_SAMPLES.value

    vocab = read_vocab(_MODEL.value)
    label = resolve_label(_GENRE.value, vocab)
    instruments = resolve_instruments(_INSTRUMENTS.value, vocab)
    primer = None
    if _PRIMER.value is not None:
        primer, _, primer_units = primer_body(_PRIMER.value, vocab, _PRIMER_SECONDS.value, instruments)
        primer_seconds = primer_units * vocab.config.time_unit_ms / 1000
        if primer_seconds >= seconds:
            raise ValueError(f"the primer lasts {primer_seconds:.1f} s, not less than --seconds {seconds:g}; "
                             f"raise --seconds or pass a shorter --primer_seconds")

    audio_problem = check_audio()
    from musenet_jax import export, sampling  # only now: importing JAX takes seconds

    config = read_model_config(_MODEL.value)
    limit = sampling.max_seconds(config, vocab)
    if seconds > limit:
        raise ValueError(f"--seconds {seconds:g} is beyond this model's maximum of {limit:.1f} s")
    model, _ = export.load_export(_MODEL.value, vocab=vocab)
    sampling_config = sampling.SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                              top_p=_TOP_P.value)
    max_note_seconds = sampling.DEFAULT_MAX_NOTE_SECONDS if _MAX_NOTE_SECONDS.value is None else _MAX_NOTE_SECONDS.value
    pieces = sampling.generate(model, vocab, label=label, instruments=instruments, seconds=seconds, primer=primer,
                               sampling=sampling_config, seed=_SEED.value, num_samples=num_samples,
                               max_tokens=_MAX_TOKENS.value, max_note_seconds=max_note_seconds)

    for k, piece in enumerate(pieces, start=1):
        midi_path = numbered(_OUT.value, k, num_samples)
        notes = encoding.tokens_to_midi(piece.tokens, vocab, midi_path)
        status = "ended" if piece.ended else "ran out of token budget (open notes closed)"
        write_outputs(k, notes, vocab, audio_problem, f"{piece.seconds:.{1 if piece.seconds >= 1 else 2}f} s", status)
    finish(audio_problem)


def check_audio() -> str | None:
    """Audio: a bad --soundfont is bad input (raises now); a system without fluidsynth or any soundfont only costs
    the WAV: returns why (the MIDI is still written, then exit 1)."""
    if _WAV.value is None:
        return None
    if _SOUNDFONT.value is not None:
        rendering.check_soundfont(_SOUNDFONT.value)
    try:
        rendering.resolve_audio(_SOUNDFONT.value)
    except rendering.RenderError as e:
        return str(e)
    return None


def write_outputs(k: int, notes: encoding.Notes, vocab: Vocab, audio_problem: str | None, length: str, status: str,
                  span: tuple[int, int] | None = None) -> None:
    """Piece k's piano roll and WAV beside its MIDI (already written), and its one-line report."""
    midi_path = numbered(_OUT.value, k, _NUM_SAMPLES.value)
    written = [midi_path]
    if _PIANOROLL.value is not None:
        png_path = numbered(_PIANOROLL.value, k, _NUM_SAMPLES.value)
        rendering.piano_roll(notes, vocab, png_path, title=os.path.basename(midi_path), span=span)
        written.append(png_path)
    if _WAV.value is not None and audio_problem is None:
        wav_path = numbered(_WAV.value, k, _NUM_SAMPLES.value)
        rendering.render_wav(midi_path, wav_path, soundfont=_SOUNDFONT.value)
        written.append(wav_path)
    played = ",".join(vocab.instruments.names[i] for i in np.unique(notes.instrument).tolist()) or "silence"
    print(f"wrote {' + '.join(written)}: {length}, {len(notes)} note{'' if len(notes) == 1 else 's'}, {played}, "
          f"{status}")


def finish(audio_problem: str | None) -> None:
    sys.stdout.flush()
    if audio_problem is not None:
        raise rendering.RenderError(audio_problem)


def main_task() -> None:
    """--infill_* / --accompany*: the file with a span rewritten, or with new parts under its own."""
    vocab = read_vocab(_MODEL.value)
    if not vocab.config.infill:
        raise ValueError(f"{_MODEL.value}: this model's vocabulary has no infilling tokens (format v1, from before "
                         f"infilling): it can only continue a piece; retrain it to infill or accompany")
    label = resolve_label(_GENRE.value, vocab)
    notes, duration = read_piece(_PRIMER.value if task() == "infill" else _ACCOMPANY.value, vocab)
    given, span, accompany = task_span(vocab, notes, duration)
    audio_problem = check_audio()
    from musenet_jax import export, infilling, sampling  # only now: importing JAX takes seconds

    read_model_config(_MODEL.value)
    model, _ = export.load_export(_MODEL.value, vocab=vocab)
    sampling_config = sampling.SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                              top_p=_TOP_P.value)
    max_note_seconds = sampling.DEFAULT_MAX_NOTE_SECONDS if _MAX_NOTE_SECONDS.value is None else _MAX_NOTE_SECONDS.value
    unit_s = vocab.config.time_unit_ms / 1000.0
    for k in range(1, _NUM_SAMPLES.value + 1):
        result = infilling.complete(model, vocab, given, duration, span, label=label, sampling_config=sampling_config,
                                    seed=_SEED.value, sample=k - 1, max_note_seconds=max_note_seconds,
                                    accompany=accompany)
        encoding.notes_to_midi(result.notes, vocab, numbered(_OUT.value, k, _NUM_SAMPLES.value),
                               duration_units=duration)
        what = "accompanied" if accompany else f"span {span.start * unit_s:g}-{span.end * unit_s:g} s regenerated"
        write_outputs(k, result.notes, vocab, audio_problem, f"{duration * unit_s:.1f} s", f"{what}: "
                      f"{len(result.written)} new notes, {len(result.given)} kept", (span.start, span.end))
    finish(audio_problem)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
