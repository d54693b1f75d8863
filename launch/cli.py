"""What every command-line entry point shares: one-line errors, exit codes and atomic output files."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from data_pipeline import outputs
from data_pipeline.midi_io import MidiError

# Errors a user can cause (bad files, bad flags, missing paths): reported in one line, exit code 1.
USER_ERRORS = (MidiError, ValueError, OSError, KeyError)


class UsageError(ValueError):
    """A wrong or missing flag or argument."""


def fail(message: str, code: int = 1):
    """Prints `error: message` on one line to stderr and exits."""
    first_line = " ".join(str(message).split("\n")[0].split())
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(code)


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps an absl `main` so that user errors exit with one line instead of a traceback."""

    def wrapper(argv):
        if not flags.FLAGS["verbosity"].present:
            # Library INFO logs (orbax, TFDS, grain) drown the tools' own output; -v 0 brings them back.
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except KeyboardInterrupt:
            fail("interrupted", code=130)  # 128 + SIGINT, as a shell reports it
        except UsageError as e:
            fail(f"{e} (see --help)", code=2)
        except USER_ERRORS as e:
            if isinstance(e, OSError) and e.filename and e.strerror:
                # Outputs are written under a temporary name and renamed: name the file the user asked for.
                fail(f"{outputs.output_name(str(e.filename))}: {e.strerror}")
            fail(str(e) or type(e).__name__)

    return wrapper


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (unknown flag, bad value) are one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (see --help)", code=2)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.a.b override naming no field
        detail = " ".join(str(e.args[0] if e.args else e).split()).replace("'", "")
        detail = detail if " " in detail else detail.strip('"')
        fail(f"no such config field: {detail} (see --help)", code=2)
    except Exception as e:  # a config file flag whose file cannot be loaded: broken, raising
        fail(f"cannot read the flags: {type(e).__name__}: {e} (see --help)", code=2)


def linked_fields(config) -> list[tuple[str, ...]]:
    """The dotted paths of an `ml_collections.ConfigDict`'s fields that share one `FieldReference` (setting one
    sets them all, e.g. data.seq_len and model.max_len), in groups of two or more, in the config's order."""
    from ml_collections import ConfigDict, FieldReference

    groups: dict[int, list[str]] = {}

    def walk(node, prefix: str) -> None:
        for key, field in node.items(preserve_field_references=True):
            if isinstance(field, ConfigDict):
                walk(field, f"{prefix}{key}.")
            elif isinstance(field, FieldReference):
                groups.setdefault(id(field), []).append(f"{prefix}{key}")

    walk(config, "")
    return [tuple(paths) for paths in groups.values() if len(paths) > 1]


def check_linked_overrides(config, overrides: dict) -> None:
    """UsageError when command-line overrides (`{"data.seq_len": 512}`, as `config_flags.get_override_values`
    gives them) set fields of one `linked_fields` group to different values: the last one would silently win.
    Overriding one field of a group sets them all (the config's FieldReference), as before."""
    for group in linked_fields(config):
        given = {path: overrides[path] for path in group if path in overrides}
        if len({repr(v) for v in given.values()}) > 1:
            flags_given = " and ".join(f"--config.{path}={value}" for path, value in given.items())
            raise UsageError(f"{flags_given} set one value: the config links {', '.join(group)}; give one of "
                             "them (the others follow) or the same value to each")


def run(main: Callable[[list[str]], None],
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
    """`absl.app.run` for a guarded main, with one-line flag errors and a `--help` that lists main's flags."""
    _help_from(sys.modules[main.__module__])
    app.run(guarded(main), flags_parser=flags_parser)


def _help_from(module) -> None:
    """Makes `--help` show `module`'s docstring and flags when it runs as an installed console script.

    absl's `--help` prints `__main__`'s docstring and the flags of the module named by `sys.argv[0]`;
    under a console script that is the generated wrapper, which has neither, so the help was empty.
    """
    main = sys.modules["__main__"]
    if main is module:  # `python -m launch.generate`: absl finds both itself
        return
    if not main.__doc__:
        main.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def prepare_output_file(path: str | None, flag: str = "--out") -> None:
    """Before a long run: the folder of output file `path` is created, and a path that is a folder or
    cannot be created is a usage error, so that the results are not lost at the end."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name (e.g. {os.path.join(path, 'results.json')})")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create its folder ({e.strerror or e})") from None


def prepare_output_dir(path: str, flag: str = "--out") -> None:
    """Before a long run: output folder `path` is created; a file there or no permission is a usage error."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; give a folder (the JSON goes inside it)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None

