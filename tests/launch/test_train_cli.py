"""musenet-train as an operator meets it: linked config fields on the command line, two trainers on one workdir.

The lease itself is tested in tests/musenet_jax/test_lease.py.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from launch import cli
from tests.multihost.conftest import Running, run, train_args

# ml_collections loads config files with the deprecated `load_module()`, as musenet-train does.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ("tiny", "small", "base", "musenet_72l")


def _parse(*overrides: str):
    """(config, override values) as musenet-train's flags give them, parsed into a fresh set of flags."""
    argv = ["musenet-train", f"--config={REPO / 'configs' / 'tiny.py'}", *overrides]
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return config.value, config_flags.get_override_values(values["config"])


@pytest.mark.parametrize("name", CONFIGS)
def test_data_seq_len_and_model_max_len_are_linked_in_every_config(name):
    argv = ["x", f"--config={REPO / 'configs' / f'{name}.py'}"]
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    assert cli.linked_fields(config.value) == [("data.seq_len", "model.max_len")]


@pytest.mark.parametrize("overrides", [("--config.data.seq_len=512",), ("--config.model.max_len=512",),
                                       ("--config.data.seq_len=512", "--config.model.max_len=512")])
def test_one_override_of_a_linked_field_moves_both(overrides):
    config, given = _parse(*overrides)
    cli.check_linked_overrides(config, given)
    assert config.data.seq_len == config.model.max_len == 512


def test_linked_fields_given_different_values_are_refused():
    config, given = _parse("--config.data.seq_len=512", "--config.train.batch_size=4", "--config.model.max_len=256")
    with pytest.raises(cli.UsageError, match=r"^--config\.data\.seq_len=512 and --config\.model\.max_len=256 set "
                                             r"one value: the config links data\.seq_len, model\.max_len; give one"):
        cli.check_linked_overrides(config, given)


@pytest.mark.e2e
def test_linked_fields_given_different_values_are_a_one_line_usage_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "launch.train", f"--config={REPO / 'configs' / 'tiny.py'}",
                          "--config.data.seq_len=512", "--config.model.max_len=256", f"--workdir={tmp_path / 'run'}",
                          f"--data_dir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2 and res.stderr == (
        "error: --config.data.seq_len=512 and --config.model.max_len=256 set one value: the config links "
        "data.seq_len, model.max_len; give one of them (the others follow) or the same value to each (see --help)\n")
    assert not (tmp_path / "run").exists()


def _last_step(running: Running) -> int:
    steps = [int(m.group(1)) for line in list(running.lines) if (m := re.match(r"step (\d+)/", line))]
    return max(steps, default=0)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_second_trainer_on_a_workdir_refuses_naming_the_first_which_goes_on_unharmed(data_dir, tmp_path):
    workdir = tmp_path / "run"
    # Long enough to be running when the second one starts; SIGTERM ends it with a checkpoint.
    args = train_args(data_dir, workdir, steps=100_000, mesh=(1, 1, 1), checkpoint_every=100_000)
    first = Running(args, devices=1)
    try:
        first.wait_for(lambda line: line.startswith("step 1/"))
        second = run(args, devices=1)
        assert second.returncode == 1, second.stderr[-3000:]
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr[-3000:]
        assert re.fullmatch(rf"error: workdir {re.escape(str(workdir))} is in use by another trainer \(host \S+, pid "
                            rf"{first.proc.pid}, job [^,]+, started \S+Z, renewed \d+ s ago\); stop it or use another "
                            r"--workdir \(if it is gone, delete .*lease\.json: a lease not renewed for 300 s is taken "
                            r"over\)", lines[0]), lines[0]
        refused_at = _last_step(first)
        first.wait_for(lambda line: (m := re.match(r"step (\d+)/", line)) is not None and int(m.group(1)) > refused_at)
        first.kill(signal.SIGTERM)
        assert first.finish() == 0, first.output[-3000:]
    finally:
        first.kill()
    stopped = int(re.search(r"^preempted: stopped after step (\d+)", first.output, re.M).group(1))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, stopped + 1))  # each step once
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(stopped)]
    assert not (workdir / "lease.json").exists()  # released on the SIGTERM exit
    # --config.data.seq_len=64 alone (train_args) moved model.max_len with it.
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["seq_len"] == config["model"]["max_len"] == 64
