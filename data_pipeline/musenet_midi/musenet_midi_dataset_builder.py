"""TFDS builder `musenet_midi`: MIDI collections -> MuseNet token records in ArrayRecord files.

Configs (see `sources.py` for each layout and label rule):
  default    the corpus bundled in the package (Freedoom + music21 scores); needs no download.
  lakh       `lmd_full.tar.gz` from --manual_dir.
  maestro    MAESTRO v3 MIDI zip + CSV from --manual_dir (composer labels, MAESTRO's split).
  directory  any folder of MIDI files / .zip / .tar.gz in --manual_dir (label: top folder, or CSV).

Splits: `maestro` uses MAESTRO's official train/validation/test split. Every other config splits
by content: the first 32 bits of the file's sha256 as a fraction x in [0, 1): train if
x < 0.90, validation if x < 0.95, else test (fractions set per config). Identical files
(same bytes) are kept once, so a file never sits in two splits.

Filters (per config, `convert.Filters`): fewer than 16 notes, more than 3600 s of music or more than
262,144 body tokens -> rejected. Every rejected file is listed in `rejected.tsv` (path, reason,
detail) next to the records, and counted per reason in the dataset metadata (`metadata.json`).
The dataset's vocabulary (label table included) is saved as `vocab.json` in the same folder; read
it with `data_pipeline.datasets.load_vocab`. The body-token count and prefix length of every record and
each split's token histogram are saved as `token_counts.npz` (`datasets.token_counts`, `prefix_lengths`,
`token_histogram`), so training can weigh pieces by length, lay out evaluation windows and compute its
unigram baseline without reading every record first.

Build (no TensorFlow needed): `musenet-build-data --config directory --manual_dir DIR --data_dir OUT`,
or in Python `Builder(config="default", data_dir=OUT, file_format="array_record").download_and_prepare()`.
Only ArrayRecord output works without TensorFlow; read it with `tfds.data_source` / Grain.

The `tfds build` command works too (`tfds build data_pipeline/musenet_midi --config directory
--manual_dir DIR --data_dir OUT --file_format array_record`), but TFDS 4.9's `tfds` program imports
TensorFlow, apache-beam and mlcroissant when it starts (for its other subcommands). Without them the
same build command runs as:

    python -c "import sys, simple_parsing; from tensorflow_datasets.scripts.cli import build; \
      simple_parsing.parse(build.Args, args=sys.argv[1:]).execute()" data_pipeline/musenet_midi \
      --config directory --manual_dir DIR --data_dir OUT --file_format array_record
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline import archives, outputs
from data_pipeline.datasets import HISTOGRAM_SUFFIX, PREFIX_LEN_SUFFIX, REPORT_FILE, TOKEN_COUNTS_FILE, VOCAB_FILE
from data_pipeline.musenet_midi import convert, sources
from data_pipeline.vocab import Vocab, VocabConfig

_INT_SEQ = functools.partial(tfds.features.Tensor, shape=(None,), dtype=np.int32,
                             encoding=tfds.features.Encoding.BYTES)  # raw bytes: fast to write and read


@dataclasses.dataclass(eq=False)
class MusenetMidiConfig(tfds.core.BuilderConfig):
    """A `musenet_midi` config.

    Attributes:
      source: `bundled`, `lakh`, `maestro` or `directory` (see `sources.py`).
      min_notes, max_duration_s, max_tokens: the filters (`convert.Filters`).
      validation_fraction, test_fraction: content-hash split fractions (not used by `maestro`).
      instrument_set: vocabulary instrument set (`musenet10` or `gm`).
      max_member_bytes: largest MIDI file read, in bytes.
      max_total_bytes: most bytes one build may read from the source (uncompressed).
    """

    source: str = "bundled"
    min_notes: int = 16
    max_duration_s: float = 3600.0
    max_tokens: int = 262_144
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    instrument_set: str = "musenet10"
    max_member_bytes: int = 64 << 20
    max_total_bytes: int = 256 << 30

    @property
    def filters(self) -> convert.Filters:
        return convert.Filters(self.min_notes, self.max_duration_s, self.max_tokens)


def _usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the whole machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


_MANUAL_INSTRUCTIONS = """\
default: nothing to download (the corpus ships with the package).
lakh: put lmd_full.tar.gz (https://colinraffel.com/projects/lmd/) in manual_dir.
maestro: put maestro-v3.0.0-midi.zip and maestro-v3.0.0.csv
  (https://magenta.tensorflow.org/datasets/maestro) in manual_dir.
directory: point manual_dir at a folder of MIDI files, sub-folders and .zip / .tar.gz archives;
  the top folder names are the labels (or give a labels.csv with path,label columns).
"""


class Builder(tfds.core.GeneratorBasedBuilder):
    """MuseNet token records from MIDI; see the module docstring."""

    # A version that changes what the records hold must also raise `datasets.CURRENT_ENCODING_VERSION`.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Body tokens + structural features, hash splits.",
        "1.1.0": "Encoding: within a track's channel a note-off releases its key (a note lasts until the key's next "
                 "attack or its first note-off after the attack, as synthesizers play it). Before, a key sounded "
                 "while any note on it sounded, so one unmatched note-on held its key for the rest of the piece "
                 "and made every later note on it legato: on the bundled corpus's train split 2.35% of pitched "
                 "notes lasted longer than 4 s (Beethoven 5.9%, one of 380 s), 0.54% now. Records of 1.0.0 builds "
                 "hold the old encoding; `datasets` refuses them unless their version is named: rebuild.",
    }
    BUILDER_CONFIGS: ClassVar[list[MusenetMidiConfig]] = [
        MusenetMidiConfig(name="default", source="bundled",
                          description="Bundled corpus: Freedoom game music (BSD-3) and music21 scores."),
        MusenetMidiConfig(name="lakh", source="lakh", description="Lakh MIDI Dataset, lmd_full."),
        MusenetMidiConfig(name="maestro", source="maestro", description="MAESTRO v3 piano performances."),
        MusenetMidiConfig(name="directory", source="directory",
                          description="Any folder / archive of MIDI files; labels from folders or CSV."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

    def __init__(self, *, num_workers: int | None = None, label_csv: str | None = None,
                 filters: convert.Filters | None = None, progress_stream=None, **kwargs):
        """Args beyond TFDS's own (data_dir, config, version, file_format, ...):

        num_workers: conversion processes (default: every core; 0 converts in this process).
        label_csv: a `path,label` manifest for `lakh` / `directory` (default: manual_dir/labels.csv).
        filters: replaces the config's filters for this build (TFDS does not allow a changed config
          under a config's name); the filters used are recorded in the metadata.
        progress_stream: where the progress line goes (default stderr).
        """
        self._num_workers = _usable_cores() if num_workers is None else num_workers
        self._label_csv = label_csv
        self._filters = filters
        self._progress_stream = progress_stream
        super().__init__(**kwargs)

    # TFDS derives this from the package with `importlib_resources`, a backport that is not installed
    # (and not needed on Python 3.11); the module file is what it is looking for.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "tokens": _INT_SEQ(doc="body token ids, after `start`, ending with `end`"),
            "timing": _INT_SEQ(doc="time of each token, in time units"),
            "chord": _INT_SEQ(doc="attacks before the token within its time step"),
            "part": _INT_SEQ(doc="which of num_parts equal spans of the piece"),
            "countdown": _INT_SEQ(doc="remaining time in countdown units, clipped"),
            "label": tfds.features.Text(doc="label name, in vocab.json's label table"),
            "instruments": _INT_SEQ(doc="instrument classes that play"),
            "path": tfds.features.Text(doc="path relative to the source root"),
            "content_hash": tfds.features.Text(doc="sha256 hex of the MIDI bytes"),
            "duration_s": tfds.features.Scalar(np.float32, doc="length of the music in seconds"),
            "num_notes": tfds.features.Scalar(np.int32, doc="notes (attacks) in the piece"),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=features,
            metadata=tfds.core.MetadataDict(),
        )

    def _download_and_prepare(self, dl_manager, download_config):
        self._spill_dir = tempfile.mkdtemp(prefix="spill.", dir=self.data_dir)
        try:
            super()._download_and_prepare(dl_manager, download_config)
            self._write_token_counts()
        finally:
            # The spill lives in TFDS's incomplete folder, which becomes the dataset folder on success.
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def _write_token_counts(self):
        """`token_counts.npz` (`datasets.token_counts`, `prefix_lengths`, `token_histogram`): per split, the
        body-token count and prefix length of each record in record order, and the body-token histogram.

        Read back from the written records: TFDS orders them by a hash of their keys as it writes.
        """
        vocab = Vocab.load(os.path.join(self.data_dir, VOCAB_FILE))
        stats = {}
        for split in self.info.splits:
            counts, prefix_lens, histogram = [], [], np.zeros(vocab.size, np.int64)
            for record in self.as_data_source(split):
                counts.append(len(record["tokens"]))
                label = record["label"].decode() if isinstance(record["label"], bytes) else record["label"]
                prefix_lens.append(len(vocab.prefix(label or None, record["instruments"])))
                histogram += np.bincount(record["tokens"], minlength=vocab.size)
            stats[split] = np.asarray(counts, np.int32)
            stats[split + PREFIX_LEN_SUFFIX] = np.asarray(prefix_lens, np.int32)
            stats[split + HISTOGRAM_SUFFIX] = histogram
        with open(os.path.join(self.data_dir, TOKEN_COUNTS_FILE), "wb") as f:
            np.savez(f, **stats)

    def _manual_dir(self, dl_manager) -> str | None:
        if self.builder_config.source == "bundled":
            return None
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS's "Manual directory X does not exist or is empty. Create it..."
            reason = str(e).split(". Create it")[0].split("\n")[0]
            raise sources.SourceError(f"{reason} (the {self.builder_config.name} config reads its files "
                                      "from the manual dir)") from None

    @property
    def filters(self) -> convert.Filters:
        return self._filters or self.builder_config.filters

    def make_source(self, manual_dir: str | None) -> sources.Source:
        """This config's source over `manual_dir`; raises `sources.SourceError` if it is unusable
        (so callers can check their input before anything is written)."""
        config = self.builder_config
        limits = archives.Limits(max_member_bytes=config.max_member_bytes,
                                 max_total_bytes=config.max_total_bytes)
        return sources.make_source(config.source, manual_dir=manual_dir, instrument_set=config.instrument_set,
                                   limits=limits, label_csv=self._label_csv)

    def _split_generators(self, dl_manager):
        config = self.builder_config
        source = self.make_source(self._manual_dir(dl_manager))
        labels = source.labels()
        vocab = Vocab(VocabConfig(instrument_set=config.instrument_set, labels=labels))
        split_fn = functools.partial(convert.split_for_hash, validation_fraction=config.validation_fraction,
                                     test_fraction=config.test_fraction)
        summary = convert.convert_all(
            source.items(), spill_dir=self._spill_dir, instrument_set=config.instrument_set,
            filters=self.filters, split_fn=split_fn, num_workers=self._num_workers,
            progress_name=f"musenet_midi/{config.name}", progress_stream=self._progress_stream)

        data_dir = epath.Path(self.data_dir)
        vocab.save(data_dir / VOCAB_FILE)
        outputs.write_atomic(data_dir / REPORT_FILE, summary.report_tsv())
        self.info.metadata.update({
            "source": source.description,
            "vocab_file": VOCAB_FILE,
            "labels": list(labels),
            "split_rule": source.split_rule,
            "split_fractions": ({"validation": config.validation_fraction, "test": config.test_fraction}
                                if source.split_rule == "content_hash" else None),
            "filters": dataclasses.asdict(self.filters),
            "files_seen": summary.files_seen,
            "bytes_read": summary.bytes_read,
            "examples": dict(summary.examples),
            "label_counts": dict(sorted(summary.label_counts.items())),
            "rejected": summary.reject_counts,
            "rejected_total": len(summary.rejected),
            "report_file": REPORT_FILE,
        })
        if not any(summary.examples.values()):
            raise sources.SourceError(
                f"no usable MIDI in {source.description}: {summary.files_seen} files, rejected "
                + (", ".join(f"{r}={n}" for r, n in summary.reject_counts.items()) or "none"))
        # TFDS cannot write an empty split; a tiny source may leave validation or test empty.
        return {split: convert.read_spill(convert.spill_path(self._spill_dir, split))
                for split, n in summary.examples.items() if n > 0}

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("records come from the spill files of _split_generators")
