r"""musenet-build-data: build the `musenet_midi` dataset (ArrayRecord, no TensorFlow needed).

    musenet-build-data --data_dir ~/data                              # bundled corpus
    musenet-build-data --config directory --manual_dir ~/midi --data_dir ~/data
    musenet-build-data --config lakh --manual_dir ~/downloads --data_dir ~/data   # lmd_full.tar.gz
    musenet-build-data --config maestro --manual_dir ~/downloads --data_dir ~/data

The dataset lands in `<data_dir>/musenet_midi/<config>/<version>/` with `vocab.json`,
`rejected.tsv` (every file left out, and why) and `token_counts.npz` (each record's length and prefix
length in tokens, each split's token histogram). The same command again leaves an existing build alone;
asked for with other filters or another source it is refused. --overwrite rebuilds it beside the old
one, which it replaces only once the new build is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import sys
import tempfile

from absl import flags, logging

from launch import cli

# The builder's config names; TFDS and the builder are imported only once the flags are checked, so
# that a wrong flag is answered at once.
CONFIGS = ("default", "lakh", "maestro", "directory")
_CONFIG = flags.DEFINE_enum("config", "default", CONFIGS, "Dataset config.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the source files (not for default).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where datasets are written (TFDS data_dir).")
_LABEL_CSV = flags.DEFINE_string("label_csv", None, "path,label manifest (lakh, directory); "
                                 "default: <manual_dir>/labels.csv when present.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Conversion processes (default: all cores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset is already built (the old build "
                                "is replaced once the new one is complete).")
_MIN_NOTES = flags.DEFINE_integer("min_notes", None, "Override the config's minimum notes per piece.")
_MAX_DURATION_S = flags.DEFINE_float("max_duration_s", None, "Override the config's longest piece, seconds.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Override the config's most body tokens per piece.")


def _filter_overrides() -> dict:
    """{filter field: value} of the filter flags given."""
    flag_of = {"min_notes": _MIN_NOTES, "max_duration_s": _MAX_DURATION_S, "max_tokens": _MAX_TOKENS}
    overrides = {name: flag.value for name, flag in flag_of.items() if flag.value is not None}
    for name, value in overrides.items():
        if value <= 0:
            raise cli.UsageError(f"--{name} must be positive, got {value}")
    return overrides


def _interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _DATA_DIR.value:
        raise cli.UsageError("--data_dir is required")
    if _CONFIG.value == "default":
        if _MANUAL_DIR.value or _LABEL_CSV.value:
            raise cli.UsageError("--config default reads the bundled corpus; drop --manual_dir / --label_csv")
    elif not _MANUAL_DIR.value:
        raise cli.UsageError(f"--config {_CONFIG.value} needs --manual_dir")
    elif not os.path.isdir(_MANUAL_DIR.value):
        raise FileNotFoundError(f"--manual_dir {_MANUAL_DIR.value}: no such folder")
    if _NUM_WORKERS.value is not None and _NUM_WORKERS.value < 0:
        raise cli.UsageError("--num_workers must be >= 0")
    overrides = _filter_overrides()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # TFDS's info and warning lines are noise here

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # the conversion reports its own progress (convert._Progress)

    from data_pipeline import datasets
    from data_pipeline.musenet_midi import convert
    from data_pipeline.musenet_midi.musenet_midi_dataset_builder import Builder

    filters = None
    if overrides:
        config = next(c for c in Builder.BUILDER_CONFIGS if c.name == _CONFIG.value)
        filters = dataclasses.replace(config.filters, **overrides)

    # The file format goes to the constructor: TFDS refuses to change it on a builder that found an
    # existing build.
    make_builder = functools.partial(Builder, config=_CONFIG.value, num_workers=_NUM_WORKERS.value,
                                     label_csv=_LABEL_CSV.value, filters=filters, file_format="array_record")
    builder = make_builder(data_dir=_DATA_DIR.value)
    source = builder.make_source(_MANUAL_DIR.value)  # fail on a bad source before TFDS creates any folder
    if builder.is_prepared() and not _OVERWRITE.value:
        # The same command again is a no-op; other sources or filters must not pass for the old build.
        built = datasets.load_metadata(_DATA_DIR.value, _CONFIG.value)
        asked = {"source": source.description, **{f"filters.{k}": v for k, v in
                                                   dataclasses.asdict(builder.filters).items()}}
        source_was = str(built.get("source"))  # builds before descriptions were normalised: `folder dir/`
        source_was = f"folder {os.path.normpath(source_was[7:])}" if source_was.startswith("folder ") else source_was
        had = {"source": source_was, **{f"filters.{k}": v for k, v in (built.get("filters") or {}).items()}}
        changed = [f"{k}: {had.get(k)!r} built, {v!r} asked" for k, v in asked.items() if had.get(k) != v]
        if changed:
            raise cli.UsageError(f"{builder.data_dir} was built from other settings ({'; '.join(changed)}); "
                                 "pass --overwrite to rebuild it, or use another --data_dir")
        print(f"{builder.data_dir}: already built (pass --overwrite to rebuild)")
        return
    # SIGTERM (a job scheduler, `kill`) stops the build as Ctrl-C does: workers stopped, no half-built folder.
    signal.signal(signal.SIGTERM, _interrupt)
    download_config = tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value)
    # --overwrite builds beside the old build and replaces it only once the new one is complete: a rebuild
    # that fails (a bad source, an interrupt) leaves the old one as it was.
    staging = tempfile.mkdtemp(prefix=".rebuild-", dir=_DATA_DIR.value) if builder.is_prepared() else None
    try:
        staged = builder if staging is None else make_builder(data_dir=staging)
        with contextlib.redirect_stdout(sys.stderr):  # TFDS's own "Downloading and preparing..." lines
            staged.download_and_prepare(download_config=download_config)
        if staging is not None:
            old = tempfile.mkdtemp(prefix=".replaced-", dir=_DATA_DIR.value)
            os.replace(builder.data_dir, os.path.join(old, "build"))
            os.replace(staged.data_dir, builder.data_dir)
            shutil.rmtree(old)
    except convert.ConversionError as e:
        cli.fail(str(e))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    meta = datasets.load_metadata(_DATA_DIR.value, _CONFIG.value)
    examples = ", ".join(f"{split} {n}" for split, n in meta["examples"].items())
    rejected = ", ".join(f"{reason} {n}" for reason, n in meta["rejected"].items()) or "none"
    print(f"{builder.data_dir}: {examples} examples; rejected {meta['rejected_total']} ({rejected}); "
          f"report: {os.path.join(builder.data_dir, datasets.REPORT_FILE)}")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
