"""The `musenet_midi` TFDS builder: default corpus, directory / lakh / maestro layouts, reports, splits."""

import collections
import csv
import hashlib
import io
import os
import shutil
import signal
import tarfile
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import datasets, encoding, features
from data_pipeline.musenet_midi import convert, sources
from data_pipeline.musenet_midi.musenet_midi_dataset_builder import Builder, MusenetMidiConfig
from data_pipeline.vocab import END, Vocab

FIELDS = {"tokens", "timing", "chord", "part", "countdown", "label", "instruments", "path",
          "content_hash", "duration_s", "num_notes"}


def build(config, data_dir, manual_dir=None, num_workers=0, label_csv=None, filters=None):
    builder = Builder(config=config, data_dir=str(data_dir), num_workers=num_workers, label_csv=label_csv,
                      filters=filters, file_format="array_record", progress_stream=io.StringIO())
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else str(manual_dir)))
    return builder


def read_split(data_dir, config, split):
    src = tfds.data_source(f"musenet_midi/{config}", split=split, data_dir=str(data_dir))
    return [src[i] for i in range(len(src))]


def check_record(record, vocab, midi_bytes):
    """A record equals what the encoder and feature code give for its MIDI bytes."""
    assert set(record) == FIELDS
    piece = encoding.encode_midi(midi_bytes, Vocab(), path=record["path"])
    np.testing.assert_array_equal(record["tokens"], piece.body)
    assert record["tokens"].dtype == np.int32 and record["tokens"][-1] == END
    feats = features.compute_features(piece.tokens, Vocab())
    for name in features.STORED_FEATURE_NAMES:  # sounding is derived when a record is read
        np.testing.assert_array_equal(record[name], getattr(feats, name)[piece.prefix_len:])
    np.testing.assert_array_equal(record["instruments"], piece.instruments)
    assert record["content_hash"].decode() == hashlib.sha256(midi_bytes).hexdigest()
    assert record["num_notes"] == piece.num_notes
    assert record["duration_s"] == pytest.approx(piece.duration_units * vocab.config.time_unit_ms / 1000)
    assert record["label"].decode() in vocab.config.labels


# -- a folder of real MIDI with damaged files --------------------------------------------------------
@pytest.fixture(scope="module")
def messy_dir(tmp_path_factory, midi_fixtures):
    """Two label folders of real MIDI, plus every kind of bad file the report must name."""
    root = tmp_path_factory.mktemp("messy") / "collection"
    (root / "game").mkdir(parents=True)
    (root / "classical").mkdir()
    for name in ("freedoom1_D_E1M1.mid", "freedoom1_D_INTRO.mid", "freedoom2_D_ADRIAN.mid",
                 "freedoom1_D_BUNNY.mid", "freedoom1_D_E3M9.mid"):
        shutil.copy(midi_fixtures / name, root / "game" / name)
    for name in ("bach_bwv1.6.mid", "mozart_k525short_pedal.mid", "miditoolkit_1390.mid"):
        shutil.copy(midi_fixtures / name, root / "classical" / name)
    shutil.copy(midi_fixtures / "bach_bwv1.6.mid", root / "classical" / "bach_copy.mid")  # duplicate
    (root / "classical" / "not_midi.mid").write_text("this is a text file, not MIDI\n")
    (root / "game" / "truncated.mid").write_bytes((midi_fixtures / "freedoom1_D_E1M6.mid").read_bytes()[:300])
    (root / "game" / "empty.mid").write_bytes(b"")
    (root / "README.txt").write_text("notes")
    os.symlink(midi_fixtures / "freedoom1_D_E1M9.mid", root / "game" / "link.mid")
    with zipfile.ZipFile(root / "extra.zip", "w") as zf:  # an archive at the top: label "extra"
        zf.write(midi_fixtures / "freedoom1_D_E3M8.mid", "songs/e3m8.mid")
        zf.writestr("../escape.mid", (midi_fixtures / "freedoom1_D_E1M6.mid").read_bytes())
    return root


EXPECTED_REJECTS = {
    "classical/bach_copy.mid": convert.DUPLICATE,
    "classical/not_midi.mid": convert.INVALID_MIDI,
    "game/truncated.mid": convert.INVALID_MIDI,
    "game/empty.mid": convert.INVALID_MIDI,
    "README.txt": convert.NOT_MIDI_NAME,
    "game/link.mid": "symlink",
    "extra.zip/../escape.mid": "unsafe_path",
}
KEPT = 9  # 5 game + 3 classical + 1 in the zip


@pytest.fixture(scope="module")
def messy_build(messy_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("messy_build")
    build("directory", data_dir, messy_dir, num_workers=0)
    return data_dir


def test_directory_build_reports_every_rejected_file(messy_build):
    report = datasets.load_report(messy_build, "directory")
    assert {p: r for p, r, _ in report} == EXPECTED_REJECTS
    details = {p: d for p, _, d in report}
    assert details["game/empty.mid"] == "empty file"
    assert details["classical/bach_copy.mid"] == "same bytes as classical/bach_bwv1.6.mid"
    meta = datasets.load_metadata(messy_build, "directory")
    assert meta["rejected"] == dict(collections.Counter(EXPECTED_REJECTS.values()))
    assert meta["rejected_total"] == len(EXPECTED_REJECTS)
    assert meta["files_seen"] == KEPT + len(EXPECTED_REJECTS)
    assert sum(meta["examples"].values()) == KEPT
    assert meta["label_counts"] == {"classical": 3, "extra": 1, "game": 5}


def test_directory_records_read_back_through_tfds(messy_build, messy_dir):
    vocab = datasets.load_vocab(messy_build, "directory")
    assert vocab.config.labels == ("classical", "extra", "game")
    meta = datasets.load_metadata(messy_build, "directory")
    zip_bytes = zipfile.ZipFile(messy_dir / "extra.zip").read("songs/e3m8.mid")
    seen = 0
    for split, n in meta["examples"].items():
        if not n:
            continue
        records = read_split(messy_build, "directory", split)
        assert len(records) == n == len(datasets.data_source(messy_build, "directory", split))
        for record in records:
            path = record["path"].decode()
            data = zip_bytes if path == "extra.zip/songs/e3m8.mid" else (messy_dir / path).read_bytes()
            check_record(record, vocab, data)
            label = "extra" if path.startswith("extra.zip") else path.split("/")[0]
            assert record["label"].decode() == label
            assert convert.split_for_hash(record["content_hash"].decode(), 0.05, 0.05) == split
            seen += 1
    assert seen == KEPT


def test_stored_stats_match_the_records_of_every_split_and_slice(messy_build, tmp_path):
    vocab = datasets.load_vocab(messy_build, "directory")
    meta = datasets.load_metadata(messy_build, "directory")
    splits = [split for split, n in meta["examples"].items() if n]
    specs = [*splits, f"{splits[0]}[1:]+{splits[-1]}[:1]", f"{splits[0]}[:50%]", "+".join(splits)]
    for spec in specs:
        source = datasets.data_source(messy_build, "directory", spec)
        records = [source[i] for i in range(len(source))]
        counts = datasets.token_counts(messy_build, "directory", spec)
        assert counts.dtype == np.int32
        np.testing.assert_array_equal(counts, [len(r["tokens"]) for r in records], err_msg=spec)
        prefix_lens = datasets.prefix_lengths(messy_build, "directory", spec)
        assert prefix_lens.dtype == np.int32
        np.testing.assert_array_equal(
            prefix_lens, [len(vocab.prefix(r["label"].decode() or None, r["instruments"])) for r in records],
            err_msg=spec)
        histogram = datasets.token_histogram(messy_build, "directory", spec)
        if "[" in spec:  # a slice of a split has none
            assert histogram is None
        else:
            expected = np.bincount(np.concatenate([r["tokens"] for r in records]), minlength=vocab.size)
            np.testing.assert_array_equal(histogram, expected, err_msg=spec)
    # A dataset built before the stats were stored has none; one whose stats disagree is refused.
    copy = tmp_path / "copy"
    shutil.copytree(messy_build, copy)
    counts_path = os.path.join(datasets.dataset_dir(copy, "directory"), datasets.TOKEN_COUNTS_FILE)
    np.savez(counts_path, **{split: np.ones(1000, np.int32) for split in splits})
    with pytest.raises(ValueError, match=f"1000 counts for split '{splits[0]}'"):
        datasets.token_counts(copy, "directory", splits[0])
    np.savez(counts_path, **{split: datasets.token_counts(messy_build, "directory", split) for split in splits})
    assert datasets.token_counts(copy, "directory", splits[0]) is not None  # counts only: an older build
    assert datasets.prefix_lengths(copy, "directory", splits[0]) is None
    assert datasets.token_histogram(copy, "directory", splits[0]) is None
    os.remove(counts_path)
    assert datasets.token_counts(copy, "directory", splits[0]) is None
    assert datasets.prefix_lengths(copy, "directory", splits[0]) is None


@pytest.mark.multiprocess
def test_parallel_build_is_identical_and_splits_are_deterministic(messy_build, messy_dir, tmp_path):
    build("directory", tmp_path, messy_dir, num_workers=2)
    meta_a = datasets.load_metadata(messy_build, "directory")
    meta_b = datasets.load_metadata(tmp_path, "directory")
    assert meta_a["examples"] == meta_b["examples"] and meta_a["rejected"] == meta_b["rejected"]
    assert datasets.load_report(messy_build, "directory") == datasets.load_report(tmp_path, "directory")
    for split, n in meta_a["examples"].items():
        if not n:
            continue
        a = {r["content_hash"]: r for r in read_split(messy_build, "directory", split)}
        b = {r["content_hash"]: r for r in read_split(tmp_path, "directory", split)}
        assert a.keys() == b.keys()
        for key in a:
            for field in FIELDS:
                np.testing.assert_array_equal(a[key][field], b[key][field])


def test_split_for_hash_is_deterministic_with_documented_fractions():
    rng = np.random.default_rng(0)
    hashes = [hashlib.sha256(rng.bytes(16)).hexdigest() for _ in range(20_000)]
    splits = [convert.split_for_hash(h, 0.05, 0.05) for h in hashes]
    assert splits == [convert.split_for_hash(h, 0.05, 0.05) for h in hashes]
    counts = collections.Counter(splits)
    assert counts["train"] / len(hashes) == pytest.approx(0.90, abs=0.01)
    assert counts["validation"] / len(hashes) == pytest.approx(0.05, abs=0.006)
    assert counts["test"] / len(hashes) == pytest.approx(0.05, abs=0.006)
    assert convert.split_for_hash("00000000" + "f" * 56, 0.05, 0.05) == "train"
    assert convert.split_for_hash("f" * 64, 0.05, 0.05) == "test"


def test_all_rejected_fails_cleanly(tmp_path):
    manual = tmp_path / "junk"
    (manual / "a").mkdir(parents=True)
    (manual / "a" / "x.mid").write_bytes(b"nope")
    with pytest.raises(sources.SourceError, match=r"no usable MIDI.*invalid_midi=1"):
        build("directory", tmp_path / "data", manual)
    assert not list((tmp_path / "data" / "musenet_midi" / "directory").glob("*/dataset_info.json"))


# -- filters ---------------------------------------------------------------------------------------
def test_filters_reject_with_reasons(midi_fixtures):
    data = (midi_fixtures / "freedoom1_D_E1M1.mid").read_bytes()
    piece = encoding.encode_midi(data, Vocab())
    seconds = piece.duration_units * Vocab().config.time_unit_ms / 1000
    args = ("x.mid", data, "game", "0" * 64, "musenet10")
    assert isinstance(convert.convert_one(*args, convert.Filters()), dict)
    reason, _ = convert.convert_one(*args, convert.Filters(min_notes=piece.num_notes + 1))
    assert reason == convert.TOO_FEW_NOTES
    reason, detail = convert.convert_one(*args, convert.Filters(max_duration_s=seconds - 1))
    assert reason == convert.TOO_LONG and "s >" in detail
    reason, _ = convert.convert_one(*args, convert.Filters(max_tokens=len(piece.body) - 1))
    assert reason == convert.TOO_MANY_TOKENS
    assert isinstance(convert.convert_one(*args, convert.Filters(min_notes=piece.num_notes,
                                                                 max_tokens=len(piece.body))), dict)


def test_config_filters_apply_in_a_build(tmp_path, midi_fixtures):
    manual = tmp_path / "m" / "game"
    manual.mkdir(parents=True)
    for name in ("freedoom1_D_E1M1.mid", "freedoom1_D_INTRO.mid"):
        shutil.copy(midi_fixtures / name, manual / name)
    intro = encoding.encode_midi(manual / "freedoom1_D_INTRO.mid", Vocab())
    build("directory", tmp_path / "d", manual.parent,
          filters=convert.Filters(max_duration_s=intro.duration_units / 100 + 1))
    report = datasets.load_report(tmp_path / "d", "directory")
    assert [(p, r) for p, r, _ in report] == [("game/freedoom1_D_E1M1.mid", convert.TOO_LONG)]
    assert datasets.load_metadata(tmp_path / "d", "directory")["filters"]["max_duration_s"] == pytest.approx(
        intro.duration_units / 100 + 1)


def test_file_names_that_are_not_utf8_or_hold_control_characters_are_kept_escaped(tmp_path, midi_fixtures):
    manual = tmp_path / "m" / "game"
    manual.mkdir(parents=True)
    # Any bytes but / and NUL make a Linux file name: a Latin-1 name, a tab and a newline.
    shutil.copy(midi_fixtures / "freedoom1_D_INTRO.mid", os.path.join(os.fsencode(manual), b"caf\xe9.mid"))
    shutil.copy(midi_fixtures / "freedoom1_D_E1M1.mid", manual / "two  spaces.mid")
    (manual / "bad\tname\n.mid").write_text("not MIDI")
    with tarfile.open(manual.parent / "t.tar", "w") as tf:  # a tar member name in Latin-1
        info = tarfile.TarInfo("latin/\udcfcber.mid")
        data = (midi_fixtures / "freedoom1_D_E1M6.mid").read_bytes()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    build("directory", tmp_path / "d", manual.parent)
    paths = sorted(r["path"].decode() for split in ("train", "validation", "test")
                   for r in (read_split(tmp_path / "d", "directory", split)
                             if datasets.load_metadata(tmp_path / "d", "directory")["examples"][split] else []))
    assert paths == ["game/caf\\xe9.mid", "game/two  spaces.mid", "t.tar/latin/\\xfcber.mid"]
    assert [(p, r) for p, r, _ in datasets.load_report(tmp_path / "d", "directory")] == [
        ("game/bad\\tname\\n.mid", convert.INVALID_MIDI)]


# -- label manifest ----------------------------------------------------------------------------------
def test_label_manifest_overrides_folder_labels(tmp_path, midi_fixtures):
    manual = tmp_path / "m"
    (manual / "misc").mkdir(parents=True)
    for name in ("freedoom1_D_E1M1.mid", "bach_bwv1.6.mid"):
        shutil.copy(midi_fixtures / name, manual / "misc" / name)
    (manual / "labels.csv").write_text("path,label\nmisc/bach_bwv1.6.mid,J.S. Bach\nfreedoom1_D_E1M1,Piano\n")
    build("directory", tmp_path / "d", manual)
    vocab = datasets.load_vocab(tmp_path / "d", "directory")
    # "Piano" would collide with the piano instrument token, so it is prefixed.
    assert vocab.config.labels == ("j_s_bach", "label_piano")
    records = [r for s in ("train", "validation", "test")
               if s in datasets.load_metadata(tmp_path / "d", "directory")["examples"]
               and datasets.load_metadata(tmp_path / "d", "directory")["examples"][s]
               for r in read_split(tmp_path / "d", "directory", s)]
    assert {r["path"].decode(): r["label"].decode() for r in records} == {
        "misc/bach_bwv1.6.mid": "j_s_bach", "misc/freedoom1_D_E1M1.mid": "label_piano"}
    assert datasets.load_report(tmp_path / "d", "directory") == []  # the manifest is not reported


def test_bad_manifest_and_missing_sources_are_one_line_errors(tmp_path):
    limits = sources.archives.Limits()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,genre\na.mid,rock\n")
    (tmp_path / "m").mkdir()
    cases = [
        dict(kind="directory", manual_dir=str(tmp_path / "m"), label_csv=str(bad)),
        dict(kind="lakh", manual_dir=str(tmp_path / "m")),
        dict(kind="maestro", manual_dir=str(tmp_path / "m")),
        dict(kind="directory", manual_dir=str(tmp_path / "nope")),
        dict(kind="lakh", manual_dir=None),
    ]
    for case in cases:
        with pytest.raises(sources.SourceError) as exc:
            sources.make_source(instrument_set="musenet10", limits=limits, **case)
        assert "\n" not in str(exc.value)


# -- Lakh and MAESTRO layouts ------------------------------------------------------------------------
LAKH_FILES = ("freedoom1_D_E1M1.mid", "freedoom1_D_INTRO.mid", "bach_bwv1.6.mid",
              "mozart_k525short_pedal.mid")


def test_lakh_layout(tmp_path, midi_fixtures):
    manual = tmp_path / "downloads"
    manual.mkdir()
    md5s = {}
    with tarfile.open(manual / "lmd_full.tar.gz", "w:gz") as tf:
        for name in LAKH_FILES:
            data = (midi_fixtures / name).read_bytes()
            md5 = hashlib.md5(data).hexdigest()
            md5s[name] = md5
            info = tarfile.TarInfo(f"lmd_full/{md5[0]}/{md5}.mid")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with open(manual / "labels.csv", "w", newline="") as f:  # a genre manifest keyed by md5
        csv.writer(f).writerows([("path", "label"), (md5s["bach_bwv1.6.mid"], "Classical")])
    build("lakh", tmp_path / "d", manual)
    vocab = datasets.load_vocab(tmp_path / "d", "lakh")
    assert vocab.config.labels == ("classical", "lakh")
    meta = datasets.load_metadata(tmp_path / "d", "lakh")
    assert sum(meta["examples"].values()) == len(LAKH_FILES) and meta["rejected_total"] == 0
    records = [r for s, n in meta["examples"].items() if n for r in read_split(tmp_path / "d", "lakh", s)]
    by_path = {r["path"].decode(): r for r in records}
    for name, md5 in md5s.items():
        record = by_path[f"lmd_full/{md5[0]}/{md5}.mid"]
        check_record(record, vocab, (midi_fixtures / name).read_bytes())
        assert record["label"].decode() == ("classical" if name == "bach_bwv1.6.mid" else "lakh")


MAESTRO_ROWS = [  # (fixture, midi_filename, composer, split)
    ("bach_bwv1.6.mid", "2004/MIDI-Unprocessed_01.midi", "Johann Sebastian Bach", "train"),
    ("mozart_k525short_pedal.mid", "2006/MIDI-Unprocessed_02.midi", "Wolfgang Amadeus Mozart", "validation"),
    ("freedoom1_D_INTRO.mid", "2008/MIDI-Unprocessed_03.midi", "Franz Schubert / Franz Liszt", "test"),
    ("miditoolkit_1390.mid", "2008/MIDI-Unprocessed_04.midi", "Johann Sebastian Bach", "train"),
]


def _maestro_csv(rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["canonical_composer", "canonical_title", "split", "year", "midi_filename",
                     "audio_filename", "duration"])
    for _, midi, composer, split in rows:
        writer.writerow([composer, "Some Title, Op. 1", split, midi[:4], midi, midi[:-5] + ".wav", "123.4"])
    return out.getvalue()


@pytest.mark.parametrize("csv_inside_zip", [False, True])
def test_maestro_layout_uses_official_split_and_composers(tmp_path, midi_fixtures, csv_inside_zip):
    manual = tmp_path / "downloads"
    manual.mkdir()
    with zipfile.ZipFile(manual / "maestro-v3.0.0-midi.zip", "w") as zf:
        for fixture, midi, _, _ in MAESTRO_ROWS:
            zf.write(midi_fixtures / fixture, f"maestro-v3.0.0/{midi}")
        zf.write(midi_fixtures / "freedoom1_D_E1M1.mid", "maestro-v3.0.0/2009/unlisted.midi")
        zf.writestr("maestro-v3.0.0/LICENSE", "CC BY-NC-SA 4.0")
        if csv_inside_zip:
            zf.writestr("maestro-v3.0.0/maestro-v3.0.0.csv", _maestro_csv(MAESTRO_ROWS))
    if not csv_inside_zip:
        (manual / "maestro-v3.0.0.csv").write_text(_maestro_csv(MAESTRO_ROWS))
    build("maestro", tmp_path / "d", manual)
    vocab = datasets.load_vocab(tmp_path / "d", "maestro")
    assert vocab.config.labels == ("franz_schubert_franz_liszt", "johann_sebastian_bach",
                                   "wolfgang_amadeus_mozart")
    meta = datasets.load_metadata(tmp_path / "d", "maestro")
    assert meta["split_rule"] == "maestro_official"
    assert meta["examples"] == {"train": 2, "validation": 1, "test": 1}
    for fixture, midi, composer, split in MAESTRO_ROWS:
        [record] = [r for r in read_split(tmp_path / "d", "maestro", split)
                    if r["path"].decode() == f"maestro-v3.0.0/{midi}"]
        assert record["label"].decode() == sources.label_name(composer, "musenet10")
        check_record(record, vocab, (midi_fixtures / fixture).read_bytes())
    reasons = {p: r for p, r, _ in datasets.load_report(tmp_path / "d", "maestro")}
    assert reasons["maestro-v3.0.0/2009/unlisted.midi"] == convert.NO_LABEL
    assert reasons["maestro-v3.0.0/LICENSE"] == convert.NOT_MIDI_NAME


def test_maestro_csv_without_required_columns(tmp_path, midi_fixtures):
    manual = tmp_path / "downloads"
    manual.mkdir()
    with zipfile.ZipFile(manual / "maestro-v3.0.0-midi.zip", "w") as zf:
        zf.write(midi_fixtures / "bach_bwv1.6.mid", "maestro-v3.0.0/2004/a.midi")
    (manual / "maestro-v3.0.0.csv").write_text("composer,file\nBach,2004/a.midi\n")
    with pytest.raises(sources.SourceError, match="missing MAESTRO columns"):
        sources.make_source("maestro", manual_dir=str(manual), instrument_set="musenet10",
                            limits=sources.archives.Limits())
    (manual / "maestro-v3.0.0.csv").write_text("canonical_composer,split,year,midi_filename\nBach,train,2004\n")
    with pytest.raises(sources.SourceError, match=r"maestro-v3.0.0.csv:2: the row has no midi_filename"):
        sources.make_source("maestro", manual_dir=str(manual), instrument_set="musenet10",
                            limits=sources.archives.Limits())


def test_malicious_archive_in_directory_is_skipped_safely(tmp_path, midi_fixtures):
    manual = tmp_path / "m"
    manual.mkdir()
    good = (midi_fixtures / "freedoom1_D_E1M1.mid").read_bytes()
    with tarfile.open(manual / "pack.tar.gz", "w:gz") as tf:
        for name, kind, data in (("ok/a.mid", tarfile.REGTYPE, good),
                                 ("../../evil.mid", tarfile.REGTYPE, good),
                                 ("ok/sym.mid", tarfile.SYMTYPE, b""),
                                 ("ok/hard.mid", tarfile.LNKTYPE, b""),
                                 ("ok/bomb.mid", tarfile.REGTYPE, bytes(3 << 20))):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    # A config of our own (TFDS's custom-config route) with a 1 MiB member limit.
    config = MusenetMidiConfig(name="small_members", source="directory", max_member_bytes=1 << 20)
    build(config, tmp_path / "d", manual)
    reasons = {p: r for p, r, _ in datasets.load_report(tmp_path / "d", "small_members")}
    assert reasons == {"pack.tar.gz/../../evil.mid": "unsafe_path", "pack.tar.gz/ok/sym.mid": "symlink",
                       "pack.tar.gz/ok/hard.mid": "hardlink", "pack.tar.gz/ok/bomb.mid": "too_large"}
    assert datasets.load_vocab(tmp_path / "d", "small_members").config.labels == ("pack",)
    assert not (tmp_path / "evil.mid").exists()


# -- worker crash isolation --------------------------------------------------------------------------
def crashing_convert_batch(batch, instrument_set, filters):
    """Stands in for `convert._convert_batch`: a worker that dies on one particular file."""
    if any(path == "crash.mid" for path, *_ in batch):
        os._exit(1)
    return [("ok", path) for path, *_ in batch]


@pytest.mark.multiprocess
def test_a_file_that_kills_its_worker_costs_that_file_only():
    workers = convert._Workers(2, "musenet10", convert.Filters(), fn=crashing_convert_batch)
    try:
        batch = [(name, b"", "x", "0" * 64) for name in ("a.mid", "crash.mid", "b.mid")]
        results = workers.result(workers.submit(batch), batch)
        assert results[0] == ("ok", "a.mid") and results[2] == ("ok", "b.mid")
        assert results[1][0] == convert.ERROR
        later = [("c.mid", b"", "x", "0" * 64)]
        assert workers.result(workers.submit(later), later) == [("ok", "c.mid")]
    finally:
        workers.close()


def test_an_interrupt_while_a_worker_spawns_waits_for_the_spawn_then_stops_the_build():
    # A SIGTERM handled half-way through writing a worker's start-up data leaves the worker a cut pickle
    # (an EOFError traceback on the build's stderr); submit holds the signal until the spawn is whole.
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with convert._interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("spawn finished")
        assert steps == ["spawn finished"]
        assert signal.getsignal(signal.SIGTERM) is interrupt
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with convert._interrupts_deferred():  # no signal: nothing is raised
            steps.append("again")
        assert steps == ["spawn finished", "again"]
    finally:
        signal.signal(signal.SIGTERM, before)


# -- the bundled corpus ------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_build_default_from_scratch(tmp_path):
    build("default", tmp_path, num_workers=2)
    vocab = datasets.load_vocab(tmp_path, "default")
    assert vocab.config.labels == ("bach", "beethoven", "freedoom", "haydn", "mozart")
    meta = datasets.load_metadata(tmp_path, "default")
    assert meta["examples"]["train"] > 400
    assert meta["examples"]["validation"] > 10 and meta["examples"]["test"] > 10
    assert set(meta["label_counts"]) == set(vocab.config.labels)
    corpus = zipfile.ZipFile(sources.CORPUS_ZIP)
    assert meta["files_seen"] == len(corpus.namelist())
    assert sum(meta["examples"].values()) + meta["rejected_total"] == meta["files_seen"]
    for split, n in meta["examples"].items():
        src = datasets.data_source(tmp_path, "default", split)
        assert len(src) == n
        for i in range(0, n, max(1, n // 10)):  # a sample of every split, checked against the encoder
            record = src[i]
            check_record(record, vocab, corpus.read(record["path"].decode()))
            assert record["label"].decode() == record["path"].decode().split("/")[0]
            assert convert.split_for_hash(record["content_hash"].decode(), 0.05, 0.05) == split


def test_dataset_helpers_on_missing_builds(tmp_path, messy_build):
    with pytest.raises(FileNotFoundError, match="no built musenet_midi/lakh dataset"):
        datasets.load_vocab(tmp_path, "lakh")
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        datasets.dataset_dir(messy_build, "directory", version="9.9.9")
    assert datasets.dataset_dir(messy_build, "directory").endswith(os.path.join("directory", str(Builder.VERSION)))


def test_builds_of_an_older_encoding_are_refused_with_the_rebuild_command(tmp_path, messy_build):
    # The builder's version and the oldest version `datasets` reads by default move together.
    assert str(Builder.VERSION) == datasets.CURRENT_ENCODING_VERSION
    assert "1.1.0" in Builder.RELEASE_NOTES and "note-off" in Builder.RELEASE_NOTES["1.1.0"]
    # A data_dir holding only a 1.0.0 build (the old encoding): every helper refuses it in one line that names
    # the build command; naming the version reads it anyway.
    old = tmp_path / "musenet_midi" / "directory" / "1.0.0"
    shutil.copytree(datasets.dataset_dir(messy_build, "directory"), old)
    for helper in (datasets.load_vocab, datasets.load_metadata, datasets.data_source, datasets.token_counts):
        with pytest.raises(FileNotFoundError) as exc:
            helper(tmp_path, "directory")
        message = str(exc.value)
        assert "\n" not in message and "version 1.0.0" in message
        command = f"musenet-build-data --config directory --manual_dir DIR --data_dir {tmp_path}"
        assert f"rebuild it with {command} " in message
    assert datasets.load_vocab(tmp_path, "directory", version="1.0.0") == datasets.load_vocab(messy_build, "directory")
    # Beside a current build the newest is read.
    shutil.copytree(datasets.dataset_dir(messy_build, "directory"), old.parent / str(Builder.VERSION))
    assert datasets.dataset_dir(tmp_path, "directory").endswith(str(Builder.VERSION))


def test_manual_configs_without_manual_dir_fail_with_one_line(tmp_path):
    with pytest.raises(sources.SourceError, match=r"does not exist or is empty.*lakh config") as exc:
        build("lakh", tmp_path)
    assert "\n" not in str(exc.value)
