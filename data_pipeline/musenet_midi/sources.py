"""Where each `musenet_midi` config reads its MIDI files from, and how files get their labels.

Every source lists its label table before any file is converted (`labels()`), then yields its files
in a deterministic order (`items()`), all read through `data_pipeline.archives` (no extraction, no
path traversal, bounded sizes).

- `bundled` (config `default`): `data_pipeline/corpus/default_corpus.zip`; label = top folder.
- `lakh`: `<manual_dir>/lmd_full.tar.gz` (members `lmd_full/<h>/<md5>.mid`); label `lakh`.
- `maestro`: `<manual_dir>/maestro-v3.0.0-midi.zip` (any `maestro-v*-midi.zip`, or the extracted
  `maestro-v*` folder) and its CSV (`<manual_dir>/maestro-v*.csv`, else the copy inside the zip);
  label = `canonical_composer`; split = the CSV's `split` column (MAESTRO's official split).
- `directory`: every MIDI file under `<manual_dir>`, archives in it (.zip, .tar[.gz|.bz2|.xz])
  read as folders. Label = the top folder under `manual_dir` (an archive at the top counts as a
  folder named after its stem; files directly in `manual_dir` take the name of `manual_dir`).

Label manifest (`lakh` and `directory`): a CSV with a header holding `path` and `label` columns, given
explicitly or found as `<manual_dir>/labels.csv`. A file whose path (relative to the source root, as
recorded in the dataset), file name, or file name without suffix (a Lakh md5) is listed takes that
label; other files keep the rule above.

Label names go through `vocab.normalize_label`; a name that would collide with a reserved token
(`pad`, `start`, `end`, `wait`, an instrument name) is prefixed with `label_`.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Iterator

from data_pipeline import archives
from data_pipeline import instruments as instruments_lib
from data_pipeline.musenet_midi import convert
from data_pipeline.musenet_midi.convert import SourceItem
from data_pipeline.vocab import SPECIAL_NAMES, normalize_label

CORPUS_ZIP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus",
                          "default_corpus.zip")
LABEL_MANIFEST = "labels.csv"
LAKH_ARCHIVE = "lmd_full.tar.gz"
LAKH_LABEL = "lakh"
MAESTRO_COLUMNS = ("canonical_composer", "split", "midi_filename")
MAESTRO_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


class SourceError(ValueError):
    """A source that cannot be used as given (missing files, bad CSV); one-line message."""


def label_name(text: str, instrument_set: str) -> str:
    """Free text -> a label token name that collides with no other token's name."""
    label = normalize_label(text)
    reserved = set(SPECIAL_NAMES) | {"wait"} | set(instruments_lib.get_instrument_set(instrument_set).names)
    return f"label_{label}" if label in reserved else label


def _try_label(text: str, instrument_set: str) -> str | None:
    try:
        return label_name(text, instrument_set)
    except ValueError:
        return None


def read_label_csv(path: str, instrument_set: str) -> dict[str, str]:
    """`path,label` manifest -> {path / file name / stem: label name}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            fields = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read label manifest ({e})") from None
    if rows and not {"path", "label"} <= fields:
        raise SourceError(f"{path}: label manifest needs 'path' and 'label' columns, has {sorted(fields)}")
    table: dict[str, str] = {}
    for i, row in enumerate(rows, 2):
        try:
            table[(row["path"] or "").strip()] = label_name(row["label"] or "", instrument_set)
        except ValueError as e:
            raise SourceError(f"{path}:{i}: {e}") from None
    return table


def _manifest_lookup(table: dict[str, str], path: str) -> str | None:
    if not table:
        return None
    name = path.rsplit("/", 1)[-1]
    for key in (path, name, name.rsplit(".", 1)[0]):
        if key in table:
            return table[key]
    return None


def _member_items(members: Iterator[archives.Member], label_of) -> Iterator[SourceItem]:
    """Archive members -> SourceItems; `label_of(path)` gives (label, split, reason, detail)."""
    for m in members:
        if m.skipped == archives.NOT_SELECTED:
            yield SourceItem(m.path, None, rejected=convert.NOT_MIDI_NAME, detail="not a MIDI file name")
        elif m.skipped is not None:
            yield SourceItem(m.path, None, rejected=m.skipped, detail=m.detail)
        else:
            label, split, reason, detail = label_of(m.path)
            if reason is not None:
                yield SourceItem(m.path, None, rejected=reason, detail=detail)
            else:
                yield SourceItem(m.path, m.data, label=label, split=split)


class Source:
    """Base: `labels()` (sorted label table) and `items()` (files in order)."""

    split_rule = "content_hash"

    def __init__(self, instrument_set: str, limits: archives.Limits):
        self.instrument_set = instrument_set
        self.limits = limits

    def labels(self) -> tuple[str, ...]:
        raise NotImplementedError

    def items(self) -> Iterator[SourceItem]:
        raise NotImplementedError


class BundledSource(Source):
    """The corpus zip shipped in the package; label = top folder."""

    def __init__(self, instrument_set: str, limits: archives.Limits, path: str = CORPUS_ZIP):
        super().__init__(instrument_set, limits)
        if not os.path.isfile(path):
            raise SourceError(f"{path}: bundled corpus missing (regenerate it with "
                              "data_pipeline/corpus/make_corpus.py)")
        self.path = path
        self.description = f"bundled corpus {os.path.basename(path)}"

    def _label(self, path: str):
        top = path.split("/", 1)[0] if "/" in path else None
        label = top and _try_label(top, self.instrument_set)
        if label is None:
            return None, None, convert.BAD_LABEL, "corpus files must sit in a label folder"
        return label, None, None, ""

    def labels(self):
        names = [m.path for m in archives.iter_members(self.path, limits=self.limits, select=lambda p: False)]
        return tuple(sorted({self._label(p)[0] for p in names if convert.is_midi_name(p)} - {None}))

    def items(self):
        members = archives.iter_members(self.path, limits=self.limits, select=convert.is_midi_name)
        return _member_items(members, self._label)


class LakhSource(Source):
    """`lmd_full.tar.gz` of the Lakh MIDI dataset; label `lakh` unless a manifest says otherwise."""

    def __init__(self, manual_dir: str, instrument_set: str, limits: archives.Limits,
                 label_csv: str | None = None):
        super().__init__(instrument_set, limits)
        self.path = os.path.join(manual_dir, LAKH_ARCHIVE)
        if not os.path.isfile(self.path):
            raise SourceError(f"{self.path} not found: download lmd_full.tar.gz from "
                              "https://colinraffel.com/projects/lmd/ into --manual_dir")
        label_csv = label_csv or _default_manifest(manual_dir)
        self.manifest = read_label_csv(label_csv, instrument_set) if label_csv else {}
        self.description = f"Lakh MIDI {self.path}"

    def _label(self, path: str):
        return _manifest_lookup(self.manifest, path) or LAKH_LABEL, None, None, ""

    def labels(self):
        return tuple(sorted({LAKH_LABEL, *self.manifest.values()}))

    def items(self):
        members = archives.iter_members(self.path, limits=self.limits, select=convert.is_midi_name)
        return _member_items(members, self._label)


class MaestroSource(Source):
    """MAESTRO v2/v3 MIDI zip (or extracted folder) + its CSV: composer labels, official splits."""

    split_rule = "maestro_official"

    def __init__(self, manual_dir: str, instrument_set: str, limits: archives.Limits):
        super().__init__(instrument_set, limits)
        zips = sorted(glob.glob(os.path.join(glob.escape(manual_dir), "maestro-v*-midi.zip")))
        folders = sorted(p for p in glob.glob(os.path.join(glob.escape(manual_dir), "maestro-v*"))
                         if os.path.isdir(p))
        if zips:
            self.path = zips[-1]
        elif folders:
            self.path = folders[-1]
        else:
            raise SourceError(f"no maestro-v*-midi.zip (or extracted maestro-v* folder) in {manual_dir}: "
                              "download it from https://magenta.tensorflow.org/datasets/maestro")
        csvs = sorted(glob.glob(os.path.join(glob.escape(manual_dir), "maestro-v*.csv")))
        if csvs:
            self.csv_name = csvs[-1]
            try:
                with open(self.csv_name, encoding="utf-8-sig") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise SourceError(f"{self.csv_name}: {e}") from None
        else:
            self.csv_name, text = self._csv_from_source()
        self.rows = self._parse_csv(text)
        self.description = f"MAESTRO {self.path} with {os.path.basename(self.csv_name)}"

    def _csv_from_source(self) -> tuple[str, str]:
        found = [m for m in archives.iter_members(
            self.path, limits=self.limits, select=lambda p: p.lower().endswith(".csv"))
            if m.data is not None and os.path.basename(m.path).startswith("maestro-v")]
        if not found:
            raise SourceError(f"no maestro-v*.csv next to or inside {self.path}")
        try:
            return f"{self.path}/{found[-1].path}", found[-1].data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SourceError(f"{self.path}/{found[-1].path}: {e}") from None

    def _parse_csv(self, text: str) -> dict[str, tuple[str, str]]:
        reader = csv.DictReader(io.StringIO(text))
        missing = set(MAESTRO_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise SourceError(f"{self.csv_name}: missing MAESTRO columns {sorted(missing)}")
        rows = {}
        for i, row in enumerate(reader, 2):
            short = [column for column in MAESTRO_COLUMNS if row.get(column) is None]
            if short:  # csv.DictReader fills the columns a short row lacks with None
                raise SourceError(f"{self.csv_name}:{i}: the row has no {', '.join(short)}")
            split = MAESTRO_SPLITS.get((row["split"] or "").strip())
            if split is None:
                raise SourceError(f"{self.csv_name}:{i}: unknown split {row['split']!r}")
            try:
                label = label_name(row["canonical_composer"] or "", self.instrument_set)
            except ValueError as e:
                raise SourceError(f"{self.csv_name}:{i}: {e}") from None
            rows[row["midi_filename"].strip().replace("\\", "/")] = (label, split)
        return rows

    def _label(self, path: str):
        # Members are `maestro-v3.0.0/2004/x.midi`; the CSV names `2004/x.midi`.
        candidates = (path, path.split("/", 1)[1] if "/" in path else path)
        for key in candidates:
            if key in self.rows:
                label, split = self.rows[key]
                return label, split, None, ""
        return None, None, convert.NO_LABEL, f"not listed in {os.path.basename(self.csv_name)}"

    def labels(self):
        return tuple(sorted({label for label, _ in self.rows.values()}))

    def items(self):
        members = archives.iter_members(self.path, limits=self.limits, select=convert.is_midi_name)
        return _member_items(members, self._label)


class DirectorySource(Source):
    """Any folder of MIDI files and archives; label = top folder (see module docstring)."""

    def __init__(self, manual_dir: str, instrument_set: str, limits: archives.Limits,
                 label_csv: str | None = None):
        super().__init__(instrument_set, limits)
        if not os.path.isdir(manual_dir):
            raise SourceError(f"{manual_dir}: not a folder")
        self.root = manual_dir
        self.root_label = os.path.basename(os.path.abspath(manual_dir))
        label_csv = label_csv or _default_manifest(manual_dir)
        self.manifest_path = os.path.abspath(label_csv) if label_csv else None
        self.manifest = read_label_csv(label_csv, instrument_set) if label_csv else {}
        self.description = f"folder {os.path.normpath(manual_dir)}"

    def _label(self, path: str):
        listed = _manifest_lookup(self.manifest, path)
        if listed is not None:
            return listed, None, None, ""
        top = path.split("/", 1)[0] if "/" in path else self.root_label
        label = _try_label(archives.archive_stem(top), self.instrument_set)
        if label is None:
            return None, None, convert.BAD_LABEL, f"folder name {top!r} has no letters or digits"
        return label, None, None, ""

    def _select(self, path: str) -> bool:
        return convert.is_midi_name(path) and not self._is_manifest(path)

    def _is_manifest(self, path: str) -> bool:
        if self.manifest_path is None:
            return False
        return os.path.abspath(os.path.join(self.root, path)) == self.manifest_path

    def labels(self):
        # A names-only pass (nothing is read; tar archives are decompressed once to list them).
        names = [m.path for m in archives.iter_members(self.root, limits=self.limits,
                                                       select=lambda p: False, open_archives=True)
                 if m.skipped == archives.NOT_SELECTED and self._select(m.path)]
        return tuple(sorted({self._label(p)[0] for p in names} - {None}))

    def items(self):
        members = archives.iter_members(self.root, limits=self.limits, select=self._select,
                                        open_archives=True)
        for item in _member_items(members, self._label):
            if not (item.rejected == convert.NOT_MIDI_NAME and self._is_manifest(item.path)):
                yield item


def _default_manifest(manual_dir: str) -> str | None:
    path = os.path.join(manual_dir, LABEL_MANIFEST)
    return path if os.path.isfile(path) else None


def make_source(kind: str, *, manual_dir: str | None, instrument_set: str, limits: archives.Limits,
                label_csv: str | None = None) -> Source:
    """The `Source` of a config's `source` field."""
    if kind == "bundled":
        return BundledSource(instrument_set, limits)
    if not manual_dir:
        raise SourceError(f"the {kind!r} source reads from --manual_dir, which was not given")
    if not os.path.isdir(manual_dir):
        raise SourceError(f"--manual_dir {manual_dir}: not a folder")
    if label_csv and not os.path.isfile(label_csv):
        raise SourceError(f"{label_csv}: label manifest not found")
    if kind == "lakh":
        return LakhSource(manual_dir, instrument_set, limits, label_csv)
    if kind == "maestro":
        if label_csv:
            raise SourceError("maestro takes its labels from the MAESTRO CSV; drop --label_csv")
        return MaestroSource(manual_dir, instrument_set, limits)
    if kind == "directory":
        return DirectorySource(manual_dir, instrument_set, limits, label_csv)
    raise SourceError(f"unknown source {kind!r}")
