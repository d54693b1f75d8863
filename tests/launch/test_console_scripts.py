"""The installed console scripts (setup.py's entry points) as a user types them: help and flag errors.

Other tests run the tools as `python -m launch.X`, where absl finds the module's help by itself; an installed
script's `__main__` is a generated wrapper, so these run the real scripts next to this Python.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

from launch import cli

pytestmark = pytest.mark.e2e

SCRIPTS = sorted((ep.name, ep.value.split(":")[0]) for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("musenet-"))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    path = pathlib.Path(sys.executable).parent / script
    assert path.exists(), f"{path}: not installed (pip install -e .)"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120)


def test_every_launch_module_is_installed_as_a_script():
    assert {module for _, module in SCRIPTS} >= {"launch.generate", "launch.train", "launch.evaluate",
                                                  "launch.export", "launch.build_data", "launch.pod"}


@pytest.mark.parametrize("script,module", SCRIPTS)
def test_help_shows_the_tools_docstring_and_flags_and_a_bad_flag_is_one_line(script, module):
    # Read from the source: the tools cannot all be imported into one process (they share flag names).
    source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
    doc = ast.get_docstring(ast.parse(source))
    names = re.findall(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"", source)
    res = _run(script, "--help")  # absl's --help exits 1
    assert doc.splitlines()[0] in res.stdout
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", res.stdout, re.M))
    assert names and set(names) <= listed, (names, res.stdout)
    bad = _run(script, "--no_such_flag=1")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["error: Unknown command line flag 'no_such_flag' (see --help)"]


@pytest.mark.parametrize("args,message", [
    (["--config.model.bogus=1"], "error: no such config field: bogus (see --help)"),
    (["--config.modle.d_model=8"], 'error: no such config field: modle Did you mean "model" instead of "modle"?'),
    (["--config.train.total_steps=0"], "error: config train.total_steps must be an integer >= 1, got 0"),
])
def test_train_config_errors_are_one_line(tmp_path, args, message):
    config = pathlib.Path(__file__).parents[2] / "configs" / "tiny.py"
    res = _run("musenet-train", f"--config={config}", f"--workdir={tmp_path / 'run'}",
               f"--data_dir={tmp_path}", *args)
    assert res.returncode in (1, 2) and res.stderr.splitlines()[-1].startswith(message), res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1, res.stderr


def test_a_train_config_file_that_cannot_be_loaded_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "raising.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    for name, message in (("broken.py", "SyntaxError: invalid syntax"), ("raising.py", "RuntimeError: boom"),
                          ("nope.py", "no such file")):
        res = _run("musenet-train", f"--config={tmp_path / name}", "--config.train.total_steps=1",
                   f"--workdir={tmp_path}", "--data_dir=x")
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and message in res.stderr, res.stderr


def test_a_missing_train_config_file_is_named(tmp_path):
    missing = _run("musenet-train", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path}", "--data_dir=x")
    assert (missing.returncode, missing.stderr.strip()) == (2, f"error: --config {tmp_path / 'nope.py'}: no such "
                                                               "file (see --help)")


def test_ctrl_c_is_one_line_with_the_shells_exit_code(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        cli.guarded(main)(["tool"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
