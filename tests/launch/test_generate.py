"""musenet-generate end to end on an export of a briefly trained model: determinism, instruments, primer,
length, WAV / PNG outputs, and one-line errors (with nothing written) for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import encoding, midi_io, rendering
from data_pipeline.vocab import Vocab

pytestmark = pytest.mark.e2e

HAVE_AUDIO = rendering.find_fluidsynth() is not None and rendering.find_soundfont() is not None
PRIMER = "bach_bwv1.6.mid"  # piano only
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def export_dir(trained_run) -> str:
    """The shared run's float32 export (tests/conftest.py): 10 steps at learning rate 1e-2 on the MIDI fixtures
    (labels `freedoom`, `classical`; max_len 64 tokens), enough for the model to learn that waits are frequent,
    so that low-temperature pieces reach their target length and end. Read-only."""
    return str(trained_run.export)


def generate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "launch.generate", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env=env)


def assert_one_line_error(res, code: int, *fragments: str):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def read_notes(path, vocab: Vocab) -> encoding.Notes:
    notes, _ = encoding.decode_tokens(encoding.encode_midi(path, vocab).body, vocab)
    return notes


def test_same_seed_same_midi_chosen_instruments_ended_length_and_renders(export_dir, tmp_path):
    vocab = Vocab.load(os.path.join(export_dir, "vocab.json"))
    common = ["--model", export_dir, "--genre", "Freedoom", "--instruments", "bass, piano ,drums", "--seconds", 1.0,
              "--temperature", 0.2, "--seed", 7, "--num_samples", 3, "--max_note_seconds", 0.3]
    first = generate(*common, "--out", tmp_path / "a.mid", "--pianoroll", tmp_path / "a.png",
                     *(["--wav", tmp_path / "a.wav"] if HAVE_AUDIO else []))
    assert first.returncode == 0, first.stderr
    second = generate(*common, "--out", tmp_path / "b.mid")
    assert second.returncode == 0, second.stderr
    summary = first.stdout.splitlines()
    assert len(summary) == 3 and summary[0].startswith(f"wrote {tmp_path / 'a-1.mid'}")

    ended = 0
    for k in (1, 2, 3):
        a, b = tmp_path / f"a-{k}.mid", tmp_path / f"b-{k}.mid"
        assert a.read_bytes() == b.read_bytes()  # same seed and flags: the same file, byte for byte
        score = midi_io.read_midi(a)
        assert score.num_notes > 0
        notes = read_notes(a, vocab)
        pitched = notes.instrument != vocab.drums_index
        assert (notes.end - notes.start)[pitched].max(initial=0) <= 30  # --max_note_seconds 0.3: 30 units
        classes = {"drums" if d else vocab.instruments.names[vocab.instruments.program_class[p]]
                   for p, d in zip(score.program.tolist(), score.is_drum.tolist())}
        assert classes <= {"piano", "bass", "drums"}
        line = summary[k - 1]
        if line.endswith(", ended"):
            ended += 1
            seconds = float(line.split(": ")[1].split(" s,")[0])
            # END is allowed only in the last 10% of the target, and time never passes it.
            assert 0.9 <= seconds <= 1.0
            assert notes.end.max() <= 100 + vocab.config.drum_duration_units
        else:
            assert line.endswith("ran out of token budget (open notes closed)")
        png = (tmp_path / f"a-{k}.png").read_bytes()
        assert png[:8] == PNG_SIGNATURE and len(png) > 1000
        if HAVE_AUDIO:
            samples, rate = rendering.read_wav(tmp_path / f"a-{k}.wav")
            assert rate == rendering.SAMPLE_RATE and float(np.sqrt(np.mean(samples ** 2))) > 1e-3
    assert ended >= 1, first.stdout
    # The rows of a batch draw from different random streams.
    assert (tmp_path / "a-1.mid").read_bytes() != (tmp_path / "a-2.mid").read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_primer_notes_open_the_piece_and_missing_fluidsynth_costs_only_the_wav(export_dir, midi_fixtures, tmp_path):
    vocab = Vocab.load(os.path.join(export_dir, "vocab.json"))
    out = tmp_path / "primed.mid"
    env = dict(os.environ, PATH=str(tmp_path / "empty_path"))  # no fluidsynth on PATH
    res = generate("--model", export_dir, "--genre", "classical", "--instruments", "piano,violin", "--seconds", 3,
                   "--primer", midi_fixtures / PRIMER, "--primer_seconds", 1.5, "--out", out,
                   "--wav", tmp_path / "primed.wav", env=env)
    # The MIDI file is written and reported, then the missing program is the (one-line) error.
    assert_one_line_error(res, 1, "fluidsynth program is not installed")
    assert res.stdout.startswith(f"wrote {out}:")
    assert not (tmp_path / "primed.wav").exists() and not list(tmp_path.glob("*.partial"))

    cut = 150  # time units
    primer = read_notes(midi_fixtures / PRIMER, vocab)
    keep = primer.start < cut
    expected = sorted(zip(primer.instrument[keep].tolist(), primer.pitch[keep].tolist(),
                          primer.velocity[keep].tolist(), primer.start[keep].tolist(),
                          np.minimum(primer.end[keep], cut).tolist()))
    assert len(expected) >= 5
    got = read_notes(out, vocab)
    early = got.start < cut
    # Notes attacked before the cut are exactly the primer's (released at the cut at the latest).
    assert sorted(zip(got.instrument[early].tolist(), got.pitch[early].tolist(), got.velocity[early].tolist(),
                      got.start[early].tolist(), got.end[early].tolist())) == expected
    assert set(np.unique(got.instrument).tolist()) <= {vocab.instruments.index("piano"),
                                                        vocab.instruments.index("violin")}


def test_primer_longer_than_the_context_is_kept_and_continued(export_dir, midi_fixtures, tmp_path):
    """A 10 s primer (161 tokens) does not fit the model's 64-token context: the piece is written in sliding
    windows, keeps the whole primer and runs on past it."""
    vocab = Vocab.load(os.path.join(export_dir, "vocab.json"))
    out = tmp_path / "long.mid"
    res = generate("--model", export_dir, "--genre", "classical", "--instruments", "piano", "--seconds", 12,
                   "--primer", midi_fixtures / PRIMER, "--primer_seconds", 10, "--temperature", 0.5, "--out", out)
    assert res.returncode == 0, res.stderr
    cut = 1000  # time units
    primer = read_notes(midi_fixtures / PRIMER, vocab)
    keep = primer.start < cut
    expected = sorted(zip(primer.pitch[keep].tolist(), primer.start[keep].tolist(),
                          np.minimum(primer.end[keep], cut).tolist()))
    got = read_notes(out, vocab)
    early = got.start < cut
    assert sorted(zip(got.pitch[early].tolist(), got.start[early].tolist(), got.end[early].tolist())) == expected
    seconds = float(res.stdout.split(": ")[1].split(" s,")[0])
    assert 10.0 < seconds <= 12.0


PRIMER_CUT_SCRIPT = """
import json, sys
from data_pipeline import encoding
from data_pipeline.vocab import Vocab
from launch.generate import primer_body
vocab = Vocab()
body, notes, units = primer_body(sys.argv[1], vocab, 1.5, ["piano"])
decoded, duration = encoding.decode_tokens(body, vocab)
whole, _, whole_units = primer_body(sys.argv[1], vocab, None, ["piano"])
print(json.dumps(dict(units=units, duration=duration, ends=notes.end.tolist(), starts=notes.start.tolist(),
                      decoded_starts=decoded.start.tolist(), decoded_ends=decoded.end.tolist(),
                      body_len=len(body), whole_len=len(whole), whole_units=whole_units)))
"""


def test_primer_cut_closes_notes_and_keeps_the_rest(midi_fixtures):
    # In a subprocess: importing launch.generate defines absl flags that other CLIs' tests define too.
    res = subprocess.run([sys.executable, "-c", PRIMER_CUT_SCRIPT, str(midi_fixtures / PRIMER)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["units"] == r["duration"] == 150  # the body lasts exactly up to the cut
    assert r["starts"] and max(r["starts"]) < 150 and max(r["ends"]) <= 150
    assert (r["decoded_starts"], r["decoded_ends"]) == (r["starts"], r["ends"])  # every note closed, none split
    assert r["whole_units"] > 150 and r["whole_len"] > r["body_len"]


@pytest.fixture
def broken_exports(export_dir, tmp_path):
    """Copies of the export with vocab.json removed, and with a vocab.json of another size."""
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(export_dir, no_vocab)
    (no_vocab / "vocab.json").unlink()
    other = tmp_path / "other_vocab"
    shutil.copytree(export_dir, other)
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["labels"].append("polka")
    vocab["size"] += 1
    (other / "vocab.json").write_text(json.dumps(vocab))
    bad_json = tmp_path / "bad_json"
    shutil.copytree(export_dir, bad_json)
    (bad_json / "config.json").write_text("{not json")
    bad_vocab = tmp_path / "bad_vocab"
    shutil.copytree(export_dir, bad_vocab)
    (bad_vocab / "vocab.json").write_text('{"format": "musenet-vocab-v1", "velocity_bins": 0}')
    return {"no_vocab": no_vocab, "other_vocab": other, "bad_json": bad_json, "bad_vocab": bad_vocab}


BAD_INPUTS = {
    # name: (extra / replaced flags, exit code, fragments of the one-line message)
    "unknown_genre": ({"--genre": "polka"}, 1, ("unknown genre 'polka'", "valid: classical, freedoom, none")),
    "unknown_instrument": ({"--instruments": "piano,kazoo"}, 1, ("unknown instrument 'kazoo'", "valid: piano,")),
    "too_long": ({"--seconds": 500}, 1, ("--seconds 500 is beyond this model's maximum of",)),
    "primer_corrupt": ({"--primer": "{tmp}/corrupt.mid"}, 1, ("corrupt.mid: unknown MIDI format",)),
    "primer_missing": ({"--primer": "{tmp}/absent.mid"}, 1, ("absent.mid",)),
    "primer_instruments": ({"--primer": "{fixtures}/freedoom1_D_E1M9.mid"}, 1,
                           ("freedoom1_D_E1M9.mid", "the primer plays bass, guitar, drums, not in --instruments")),
    "primer_too_long": ({"--primer": "{fixtures}/" + PRIMER, "--seconds": 2, "--primer_seconds": 5}, 1,
                        ("the primer lasts",)),
    "primer_over_cap": ({"--primer": "{fixtures}/" + PRIMER, "--seconds": 20, "--primer_seconds": 10,
                         "--max_tokens": 50}, 1, ("50-token cap", "shorter primer")),
    "model_missing": ({"--model": "{tmp}/nowhere"}, 1, ("nowhere: no such model directory",)),
    "model_no_vocab": ({"--model": "{broken}/no_vocab"}, 1, ("not a musenet export (no vocab.json)",)),
    "model_other_vocab": ({"--model": "{broken}/other_vocab"}, 1, ("its vocab.json has",)),
    "model_bad_json": ({"--model": "{broken}/bad_json"}, 1, ("config.json: not valid JSON",)),
    "model_bad_vocab": ({"--model": "{broken}/bad_vocab"}, 1, ("vocab.json: not a usable vocabulary",
                                                               "velocity_bins must be in 1..127")),
    "bad_soundfont": ({"--wav": "{tmp}/out.wav", "--soundfont": "{tmp}/corrupt.mid"}, 1,
                      ("corrupt.mid: not a SoundFont file",)),
    "out_folder_missing": ({"--out": "{tmp}/no/such/dir/out.mid"}, 1, ("output folder",)),
    "missing_flag": ({"--out": None}, 2, ("missing required flags: --out", "(see --help)")),
    "bad_temperature": ({"--temperature": 0}, 2, ("--temperature must be > 0",)),
    "negative_seconds": ({"--seconds": -1}, 2, ("--seconds must be > 0",)),
    "primer_seconds_alone": ({"--primer_seconds": 2}, 2, ("--primer_seconds needs --primer",)),
    "negative_max_note_seconds": ({"--max_note_seconds": -1}, 2, ("--max_note_seconds must be >= 0 (0: no limit)",)),
    "nan_max_note_seconds": ({"--max_note_seconds": "nan"}, 2, ("--max_note_seconds must be >= 0", "got nan")),
    "unknown_flag": ({"--colour": "blue"}, 2, ("Unknown command line flag 'colour'",)),
    "primer_is_out": ({"--primer": "{tmp}/corrupt.mid", "--out": "{tmp}/corrupt.mid"}, 2,
                      ("--primer {tmp}/corrupt.mid is also an output file",)),
    "primer_is_a_numbered_out": ({"--primer": "{tmp}/out-2.png", "--num_samples": 2}, 2,
                                 ("--primer {tmp}/out-2.png is also an output file",)),
    "numbered_out_is_a_folder": ({"--out": "{tmp}/taken.mid", "--num_samples": 2}, 1,
                                 ("taken-2.mid is a directory",)),
    "out_folder_is_a_file": ({"--out": "{tmp}/corrupt.mid/out.mid"}, 1, ("corrupt.mid is not a folder",)),
    "out_unwritable": ({"--pianoroll": "/proc/musenet-test.png", "--num_samples": 2}, 1,
                       ("/proc/musenet-test-1.png: cannot write in /proc",)),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, export_dir, broken_exports, midi_fixtures, tmp_path):
    changes, code, fragments = BAD_INPUTS[case]
    (tmp_path / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    (tmp_path / "taken-2.mid").mkdir()
    flags = {"--model": export_dir, "--genre": "freedoom", "--instruments": "piano", "--seconds": 3,
             "--out": f"{tmp_path}/out.mid", "--pianoroll": f"{tmp_path}/out.png"}
    flags.update(changes)
    where = {"tmp": tmp_path, "fixtures": midi_fixtures, "broken": os.path.dirname(broken_exports["no_vocab"])}
    args = [x for k, v in flags.items() if v is not None for x in (k, str(v).format(**where))]
    before = set(tmp_path.rglob("*"))
    res = generate(*args)
    assert_one_line_error(res, code, *(f.format(**where) for f in fragments))
    assert set(tmp_path.rglob("*")) == before  # no output, no temporary file


# -- infilling and accompaniment ---------------------------------------------------------------------------------
@pytest.fixture
def v1_export(export_dir, tmp_path):
    """The export as a model from before infilling would have written it: a format v1 vocab.json (no task tokens),
    the 5-entry token layout and a part table without the two task rows."""
    from safetensors.numpy import load_file, save_file

    from data_pipeline import vocab as vocab_lib

    old = tmp_path / "v1_export"
    shutil.copytree(export_dir, old)
    vocab = json.loads((old / "vocab.json").read_text())
    del vocab["infill"]
    vocab["format"], vocab["size"] = "musenet-vocab-v1", vocab["size"] - 2
    (old / "vocab.json").write_text(json.dumps(vocab))
    config = json.loads((old / "config.json").read_text())
    layout = config["model"]["token_layout"]
    rows = vocab_lib.token_parts(layout)[2]
    task_rows = 3 + layout[1] + 1 + np.arange(2)  # after the specials and the instrument-presence rows
    config["model"]["token_layout"], config["model"]["vocab_size"] = layout[:5], vocab["size"]
    (old / "config.json").write_text(json.dumps(config))
    params = load_file(old / "model.safetensors")
    params = {k: np.delete(v, task_rows, axis=0) if v.shape[:1] == (rows,) else v for k, v in params.items()}
    save_file(params, old / "model.safetensors", metadata={"format": "musenet-export-v1"})
    return old


def test_a_model_from_before_infilling_still_continues_and_refuses_to_infill(v1_export, midi_fixtures, tmp_path):
    res = generate("--model", v1_export, "--genre", "classical", "--instruments", "piano", "--seconds", 1,
                   "--temperature", 0.2, "--out", tmp_path / "old.mid")
    assert res.returncode == 0, res.stderr
    res = generate("--model", v1_export, "--genre", "classical", "--primer", midi_fixtures / PRIMER,
                   "--infill_from", 1, "--infill_to", 2, "--out", tmp_path / "infill.mid")
    assert_one_line_error(res, 1, "no infilling tokens (format v1", "it can only continue a piece")
    assert not (tmp_path / "infill.mid").exists()


def test_infill_rewrites_the_span_and_keeps_the_rest_verbatim(export_dir, midi_fixtures, tmp_path):
    vocab = Vocab.load(os.path.join(export_dir, "vocab.json"))
    out = tmp_path / "infill.mid"
    res = generate("--model", export_dir, "--genre", "classical", "--primer", midi_fixtures / PRIMER,
                   "--infill_from", 2.5, "--infill_to", 4.5, "--temperature", 0.8, "--seed", 3, "--out", out,
                   "--pianoroll", tmp_path / "infill.png")
    assert res.returncode == 0, res.stderr
    assert "span 2.5-4.5 s regenerated" in res.stdout and (tmp_path / "infill.png").read_bytes()[:8] == PNG_SIGNATURE
    source, result = read_notes(midi_fixtures / PRIMER, vocab), read_notes(out, vocab)

    def rows(notes, keep):
        return sorted(zip(*(getattr(notes, f)[keep].tolist() for f in ("instrument", "pitch", "start", "end")),
                          strict=True))

    inside = (result.start >= 250) & (result.start < 450)
    # Outside the span the piece is the primer's, note for note (a note held across its start too).
    assert rows(result, ~inside) == rows(source, ~((source.start >= 250) & (source.start < 450)))
    assert np.all(result.end[inside] <= 450)  # the written notes end by the span's end: none hangs
    assert int(encoding.decode_tokens(encoding.encode_midi(out, vocab).body, vocab)[1]) == int(
        encoding.decode_tokens(encoding.encode_midi(midi_fixtures / PRIMER, vocab).body, vocab)[1])


def test_accompany_keeps_the_chosen_tracks_and_adds_the_new_parts(export_dir, midi_fixtures, tmp_path):
    vocab = Vocab.load(os.path.join(export_dir, "vocab.json"))
    source = midi_fixtures / "freedoom1_D_E1M9.mid"  # bass, guitar, drums
    out = tmp_path / "acc.mid"
    res = generate("--model", export_dir, "--genre", "freedoom", "--accompany", source, "--accompany_tracks",
                   "bass,drums", "--instruments", "piano", "--temperature", 1.0, "--out", out)
    assert res.returncode == 0, res.stderr
    original, result = read_notes(source, vocab), read_notes(out, vocab)
    kept = np.isin(original.instrument, [vocab.instruments.index("bass"), vocab.drums_index])
    piano = result.instrument == vocab.instruments.index("piano")
    assert set(result.instrument[~piano].tolist()) <= {vocab.instruments.index("bass"), vocab.drums_index}
    assert len(result) - piano.sum() == kept.sum()  # the kept parts, every note; the guitar is gone
    assert "accompanied" in res.stdout


TASK_BAD_INPUTS = {
    # name: (flags replacing the infill defaults, exit code, fragments of the one-line message)
    "span_after_primer": ({"--infill_to": 500}, 1, ("the span ends at 500 s, after the primer's",)),
    "empty_span": ({"--infill_from": 2, "--infill_to": 2}, 2, ("is empty or negative",)),
    "negative_span": ({"--infill_from": -1}, 2, ("is empty or negative",)),
    "span_without_end": ({"--infill_to": None}, 2, ("infilling needs --infill_to",)),
    "span_without_primer": ({"--primer": None}, 2, ("infilling needs --primer",)),
    "span_with_seconds": ({"--seconds": 3}, 2, ("--seconds does not apply to --infill_from",)),
    "span_with_instruments": ({"--instruments": "piano"}, 2, ("--instruments does not apply to --infill_from",)),
    "unknown_infill_instrument": ({"--infill_instruments": "kazoo"}, 1, ("unknown instrument 'kazoo'",)),
    "absent_infill_instrument": ({"--infill_instruments": "drums"}, 1, ("the primer has no drums", "plays piano")),
    "corrupt_primer": ({"--primer": "{tmp}/corrupt.mid"}, 1, ("corrupt.mid: unknown MIDI format",)),
    "unknown_track": ({"--infill_from": None, "--infill_to": None, "--primer": None,
                       "--accompany": "{fixtures}/freedoom1_D_E1M9.mid", "--accompany_tracks": "violin",
                       "--instruments": "piano"}, 1, ("has no violin track", "its parts: bass, guitar, drums")),
    "track_clash": ({"--infill_from": None, "--infill_to": None, "--primer": None,
                     "--accompany": "{fixtures}/" + PRIMER, "--instruments": "piano"}, 1, ("already play piano",)),
    "accompany_nothing": ({"--infill_from": None, "--infill_to": None, "--primer": None,
                           "--accompany": "{fixtures}/" + PRIMER}, 2, ("--accompany needs --instruments",)),
    "two_tasks": ({"--accompany": "{fixtures}/" + PRIMER}, 2, ("two tasks; choose one",)),
}


@pytest.mark.parametrize("case", sorted(TASK_BAD_INPUTS))
def test_task_bad_input_is_one_line_and_writes_nothing(case, export_dir, midi_fixtures, tmp_path):
    changes, code, fragments = TASK_BAD_INPUTS[case]
    (tmp_path / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    flags = {"--model": export_dir, "--genre": "classical", "--primer": f"{midi_fixtures}/{PRIMER}",
             "--infill_from": 1, "--infill_to": 2, "--out": f"{tmp_path}/out.mid", "--pianoroll": f"{tmp_path}/o.png"}
    flags.update(changes)
    where = {"tmp": tmp_path, "fixtures": midi_fixtures}
    args = [x for k, v in flags.items() if v is not None for x in (k, str(v).format(**where))]
    before = set(tmp_path.rglob("*"))
    res = generate(*args)
    assert_one_line_error(res, code, *(f.format(**where) for f in fragments))
    assert set(tmp_path.rglob("*")) == before
