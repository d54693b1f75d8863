"""Checkpoint integrity and failures (`musenet_jax.checkpoints`): the manifest finds damage, a resume falls back
past a damaged checkpoint and continues exactly, a save that fails stops the run in one line, without a hang.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from musenet_jax import checkpoints, train
from tests.checkpoint_faults import DAMAGES, damage, largest_data_file
from tests.conftest import small_config
from tests.multihost.conftest import REPO, TIMEOUT_S, env, losses, train_args

HANG_GUARD_S = 60  # a failed save once hung 300 s (orbax's signal timeout); stopping takes seconds


def _config(async_save: bool = True) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"checkpoint": {"max_to_keep": 5, "async_save": async_save}})


def _state(seed: int) -> ocp.args.Composite:
    w = np.random.default_rng(seed).standard_normal(100_000).astype(np.float32)  # 400 KB: a file to damage
    return ocp.args.Composite(state=ocp.args.StandardSave({"w": w, "b": np.full(3, float(seed))}))


def _saved(tmp_path, steps=(1,), async_save: bool = True) -> checkpoints.Checkpoints:
    saves = checkpoints.Checkpoints(str(tmp_path), _config(async_save))
    for step in steps:
        saves.save(step, _state(step))
    saves.finish()
    return saves


def _restore(saves: checkpoints.Checkpoints):
    def restore(step: int):
        try:
            return saves.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        except Exception as e:
            raise checkpoints.DamagedCheckpoint(checkpoints.describe_error(e)) from None

    return restore


def _listing(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


# -- the manifest ----------------------------------------------------------------------------------
def test_the_manifest_finds_a_cut_overwritten_or_missing_file(tmp_path):
    saves = _saved(tmp_path / "run", async_save=False)
    step_dir = tmp_path / "run" / "checkpoints" / "1"
    part = json.loads((step_dir / "manifest.0-of-1.json").read_text())
    listed = checkpoints.list_files(saves.directory / "1")
    assert part["count"] == len(part["files"]) == len(listed) and sorted(part["files"]) == listed
    assert not [f for f in listed if "manifest" in f.split("/")[0]]
    rel = str(largest_data_file(step_dir).relative_to(step_dir))
    assert part["files"][rel]["bytes"] > 100_000
    assert checkpoints.check_checkpoint(saves.directory / "1") == (None, "")
    saves.close()

    def check(change):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(step_dir, copy)
        change(copy)
        return checkpoints.check_checkpoint(epath.Path(copy))

    problem, _ = check(lambda d: damage(d, "truncated"))
    size = part["files"][rel]["bytes"]
    assert problem == f"{rel}: {size // 2} bytes, the manifest says {size}"
    problem, _ = check(lambda d: damage(d, "random bytes"))
    assert problem.startswith(f"{rel}: contents differ from the manifest (CRC-32 ")
    problem, _ = check(lambda d: (d / rel).unlink())
    assert problem == f"{rel}: missing"
    problem, _ = check(lambda d: (d / "manifest.0-of-1.json").write_text("{not json"))
    assert problem.startswith("manifest.0-of-1.json: unreadable (")
    # Without a manifest (saved before manifests were written): no verdict, a note.
    problem, note = check(lambda d: (d / "manifest.0-of-1.json").unlink())
    assert problem is None and note.startswith("no manifest (saved before manifests were written")


def test_each_process_writes_and_checks_its_share_of_the_files(tmp_path):
    saves = _saved(tmp_path, async_save=False)
    step_dir = saves.directory / "1"
    saves.close()
    (tmp_path / "checkpoints" / "1" / "manifest.0-of-1.json").unlink()
    checkpoints.write_manifest(step_dir, 0, 2)  # process 1 of 2 has not written its part (yet)
    files, note = checkpoints.read_manifest(step_dir)
    assert files is None and note.startswith("an incomplete manifest (1 of 2 parts")
    checkpoints.write_manifest(step_dir, 1, 2)
    files, _ = checkpoints.read_manifest(step_dir)
    assert sorted(files) == checkpoints.list_files(step_dir)
    parts = [json.loads((tmp_path / "checkpoints" / "1" / f"manifest.{p}-of-2.json").read_text()) for p in (0, 1)]
    assert [sorted(p["files"]) for p in parts] == [sorted(files)[0::2], sorted(files)[1::2]]
    # Read by 3 processes: each checks every third file, and only the one holding the damaged file finds it.
    rel = str(largest_data_file(tmp_path / "checkpoints" / "1").relative_to(tmp_path / "checkpoints" / "1"))
    damage(tmp_path / "checkpoints" / "1", "random bytes")
    owner = sorted(files).index(rel) % 3
    found = [checkpoints.verify(step_dir, files, q, 3) for q in range(3)]
    assert [q for q in range(3) if found[q]] == [owner] and found[owner].startswith(f"{rel}: contents differ")


def test_describe_error_names_the_path_and_the_os_error():
    assert checkpoints.describe_error(OSError(errno.ENOSPC, "No space left on device", "/ck/6/x")) == (
        "/ck/6/x: No space left on device")
    tensorstore = ValueError('OUT_OF_RANGE: Error writing "w/0" in OCDBT database at local file "/ck/6/state/": '
                             'Failed writing: "/ck/6/state/d/ab12": Failed to write 42 bytes to file 14: File '
                             "too large [os_error_code='27']")
    assert checkpoints.describe_error(tensorstore) == "/ck/6/state/d/ab12: File too large"
    try:  # orbax wraps it in a bare Exception that prints a whole TensorStore spec
        try:
            raise tensorstore
        except ValueError as e:
            raise Exception("Encountered error while reading array index: (slice(0, 2, 1),). See full "
                            "TensorStore details: <bound method spec of TensorStore({ ... })>") from e
    except Exception as e:
        assert checkpoints.describe_error(e) == "/ck/6/state/d/ab12: File too large"


# -- fallback --------------------------------------------------------------------------------------
def test_restore_falls_back_past_damaged_checkpoints_and_sets_them_aside(tmp_path, capsys):
    saves = _saved(tmp_path, steps=(1, 2, 3))
    root = tmp_path / "checkpoints"
    before = {step: _listing(root / str(step)) for step in (2, 3)}
    damage(root / "3", "truncated")
    restore = _restore(saves)

    def restore_or_fail_2(step):  # orbax cannot read step 2 (its manifest checks out)
        if step == 2:
            raise checkpoints.DamagedCheckpoint("unreadable: DATA_LOSS: a stub")
        return restore(step)

    step, state = saves.restore_newest(restore_or_fail_2)
    assert step == 1 and float(state["b"][0]) == 1.0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("checkpoint at step 3 is damaged (state/") and "bytes, the manifest says" in err[0]
    assert err[0].endswith(f"): skipped, resuming from step 1; kept as {root / '3.damaged'}")
    assert err[1] == ("checkpoint at step 2 is damaged (unreadable: DATA_LOSS: a stub): skipped, resuming from step "
                      f"1; kept as {root / '2.damaged'}")
    assert len(err) == 2
    # Kept whole under another name, no longer a checkpoint; the run saves those steps again.
    assert _listing(root / "2.damaged") == before[2] and set(_listing(root / "3.damaged")) == set(before[3])
    assert saves.manager.all_steps() == [1] and saves.last_good() == "step 1"
    saves.save(2, _state(2))
    saves.finish()
    assert saves.manager.all_steps() == [1, 2] and saves.last_good() == "step 2"
    saves.close()

    # Damaged again at step 2: the second one set aside gets the next name.
    saves = checkpoints.Checkpoints(str(tmp_path), _config())
    damage(root / "2", "random bytes")
    assert saves.restore_newest(_restore(saves))[0] == 1
    assert "contents differ from the manifest" in capsys.readouterr().err
    assert (root / "2.damaged-2").is_dir() and (root / "2.damaged").is_dir()
    saves.close()


def test_no_restorable_checkpoint_is_one_line_and_renames_nothing(tmp_path):
    saves = _saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        damage(tmp_path / "checkpoints" / str(step), "truncated")
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint in .* can be restored \(step 2: state/.*; "
                                                          r"step 1: state/.*\); move them away to start over"):
        saves.restore_newest(_restore(saves))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    saves.close()
    # An error that is not damage (another model's checkpoint...) is the caller's: raised as it is.
    saves = _saved(tmp_path / "intact", steps=(1, 2))
    with pytest.raises(KeyError):
        saves.restore_newest(lambda step: {}["x"])
    assert saves.manager.all_steps() == [1, 2]
    saves.close()


# -- save failures ---------------------------------------------------------------------------------
def _wait_for_failure(saves: checkpoints.Checkpoints) -> str:
    deadline = time.monotonic() + HANG_GUARD_S
    while (line := saves.failure()) is None:
        assert time.monotonic() < deadline, "the failed save was not reported"
        time.sleep(0.05)
    return line


def test_a_save_that_cannot_write_its_manifest_is_reported_in_one_line(tmp_path, monkeypatch):
    saves = _saved(tmp_path, steps=(1,))

    def full(step_dir, index=0, count=1):
        raise OSError(errno.ENOSPC, "No space left on device", str(step_dir / "manifest.0-of-1.json"))

    monkeypatch.setattr(checkpoints, "write_manifest", full)
    saves.save(2, _state(2))
    line = _wait_for_failure(saves)
    assert line == ("checkpoint at step 2 could not be saved: "
                    f"{tmp_path / 'checkpoints' / '2' / 'manifest.0-of-1.json'}: No space left on device")
    with pytest.raises(checkpoints.CheckpointError, match="No space left on device"):
        saves.finish()
    assert saves.last_good() == "step 1"
    saves.close()  # reported already: not raised again


def test_an_async_write_that_fails_is_reported_at_once_without_orbax_tracebacks(tmp_path, caplog):
    saves = _saved(tmp_path, steps=(1,))
    # A file-size limit: what a full disk does to orbax's writes (EFBIG instead of ENOSPC), in this process only.
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))
    try:
        started = time.monotonic()
        saves.save(2, _state(2))
        line = _wait_for_failure(saves)
        elapsed = time.monotonic() - started
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    where = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    assert line.startswith(f"checkpoint at step 2 could not be saved: {where}")
    assert line.endswith(": File too large") and elapsed < HANG_GUARD_S
    with pytest.raises(checkpoints.CheckpointError):
        saves.finish()
    saves.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "orbax" in r.pathname], caplog.text
    assert saves.manager.all_steps() == [1]
    assert checkpoints.check_checkpoint(saves.directory / "1") == (None, "")


# -- the trainer -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """(uninterrupted 9-step run, the same run stopped after 6 steps), both checkpointing every 3 steps."""
    root = tmp_path_factory.mktemp("checkpoint_runs")
    train.train_and_evaluate(small_config(9), str(root / "full"), data_dir)
    train.train_and_evaluate(small_config(6), str(root / "part"), data_dir)
    return root / "full", root / "part"


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_resume_skips_a_damaged_checkpoint_and_continues_exactly(runs, data_dir, tmp_path, capsys, how):
    full, part = runs
    work = tmp_path / "work"
    shutil.copytree(part, work)
    checkpoint_dir = work / "checkpoints"
    damaged = damage(checkpoint_dir / "6", how)
    kept = _listing(checkpoint_dir / "6")
    capsys.readouterr()
    train.train_and_evaluate(small_config(9), str(work), data_dir)
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("checkpoint at step")]
    rel = damaged.relative_to(checkpoint_dir / "6")
    reason = "bytes, the manifest says" if how == "truncated" else "contents differ from the manifest"
    assert len(skipped) == 1 and skipped[0].startswith(f"checkpoint at step 6 is damaged ({rel}: ") and (
        reason in skipped[0] and skipped[0].endswith(f"resuming from step 3; kept as {checkpoint_dir / '6.damaged'}"))
    assert f"resumed from {work} at step 3 (data position: global batch 3, 1 processes)" in err
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["3", "6", "6.damaged", "9"]
    assert _listing(checkpoint_dir / "6.damaged") == kept  # left as it was, under another name
    resumed, reference = losses(work), losses(full)
    assert sorted(resumed) == list(range(1, 10))
    for step in range(4, 10):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


# -- the command line ------------------------------------------------------------------------------
# Runs a command with a file-size limit: writes past it fail with EFBIG, as on a full disk (SIGXFSZ ignored).
_LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
            "os.execv(sys.argv[2], sys.argv[2:])")


def _cli_train(workdir, steps: int, data_dir, *, file_size_limit: int | None = None, wrap=()):
    """Runs `python -m launch.train` (the multi-host tests' small config) to the end: (exit code, output,
    seconds from its first trained step to its exit)."""
    if file_size_limit:
        wrap = (sys.executable, "-c", _LIMITED, str(file_size_limit))
    command = [*wrap, *train_args(data_dir, workdir, steps=steps, checkpoint_every=3)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env(8))
    killer = threading.Timer(TIMEOUT_S, proc.kill)  # a hang fails the test instead of blocking the run
    killer.start()
    lines, first_step = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if first_step is None and line.startswith("step "):
                first_step = time.monotonic()
        code = proc.wait()
    finally:
        killer.cancel()
    return code, "".join(lines), time.monotonic() - (first_step or time.monotonic())


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output and "Event loop is closed" not in output, output
    assert not [line for line in output.splitlines() if line.startswith(("E1", "E0"))], output  # absl ERROR logs
    return errors[0]


def _read_only_mount_works(tmp_path) -> bool:
    probe = tmp_path / "ro_probe"
    probe.mkdir()
    try:
        res = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro '
                              '"$0" && ! touch "$0/x"', str(probe)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@pytest.mark.slow
@pytest.mark.e2e
def test_a_failed_save_stops_the_cli_in_one_line_and_a_rerun_resumes_exactly(data_dir, tmp_path):
    reference, work = tmp_path / "reference", tmp_path / "work"
    for workdir, steps in ((reference, 9), (work, 3)):
        code, output, _ = _cli_train(workdir, steps, data_dir)
        assert code == 0, output
    before = tmp_path / "at_step_3"
    shutil.copytree(work, before)

    # The storage fills up: the save of step 6 fails in orbax's background threads.
    code, output, seconds = _cli_train(work, 9, data_dir, file_size_limit=200_000)
    line = _one_error_line(output)
    assert code == 1 and seconds < HANG_GUARD_S, output
    assert line.startswith(f"error: checkpoint at step 6 could not be saved: {work / 'checkpoints'}/6.orbax-checkpoint"
                           "-tmp/") and ": File too large; stopped after step " in line, line
    assert line.endswith(", last good checkpoint: step 3"), line
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [3]

    # Read-only storage (a read-only bind mount; needs user namespaces): the same, without orbax's 300 s wait.
    if _read_only_mount_works(tmp_path):
        readonly = tmp_path / "readonly"
        shutil.copytree(before, readonly)
        mount = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && '
                 'exec "$@"', str(readonly / "checkpoints"), "--"]
        code, output, seconds = _cli_train(readonly, 9, data_dir, wrap=mount)
        line = _one_error_line(output)
        assert code == 1 and seconds < HANG_GUARD_S, output
        assert line.startswith(f"error: checkpoint at step 6 could not be saved: {readonly / 'checkpoints'}/6"), line
        assert ": Read-only file system; stopped after step 6, last good checkpoint: step 3" in line, line

    # Space again: the rerun resumes from step 3 and trains what the uninterrupted run did.
    code, output, _ = _cli_train(work, 9, data_dir)
    assert code == 0 and "resumed from" in output and "at step 3 " in output, output
    resumed, expected = losses(work), losses(reference)
    for step in range(4, 10):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert os.path.isdir(work / "checkpoints" / "9")
