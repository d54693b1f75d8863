"""What a training run tells its user: TensorBoard scalars (also appended to `metrics.jsonl`, one JSON
object per report) and a one-line progress report with an ETA.

Only process 0 writes (every process may call these; others do nothing). The workdir may be local or on
object storage (`run_dir`): object stores cannot append, so there `metrics.jsonl` is rewritten whole at
each report (a few hundred bytes per report; reports come every `train.log_every` steps).
"""

from __future__ import annotations

import json
import os
import sys
import time

from musenet_jax import run_dir


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _row_step(line: str) -> int | None:
    """The step of a `metrics.jsonl` row; None for a line that is not one (torn by a crash)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class Reporter:
    """TensorBoard scalars under `workdir/tensorboard` and progress lines on stdout.

    Args:
      workdir: run directory.
      total_steps: the run length, for the ETA.
      enabled: whether this process writes (process 0 only).
      start_step: the checkpoint a training run starts from (0: none): what an earlier run logged after it
        (one stopped before its next checkpoint) is dropped from `metrics.jsonl` and hidden in TensorBoard,
        as those steps are trained again. None keeps everything.
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int, enabled: bool = True,
                 start_step: int | None = None):
        self.total_steps = total_steps
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        self._jsonl_path = run_dir.resolve(workdir) / "metrics.jsonl"
        self._jsonl_lines: list[str] | None = None  # the whole file, kept only for object storage
        if enabled:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the earlier events at steps >= it when it reads this file.
            self._writer = SummaryWriter(os.fspath(run_dir.resolve(workdir) / "tensorboard"), flush_secs=10,
                                         purge_step=None if start_step is None else start_step + 1)
            remote = run_dir.is_remote(self._jsonl_path)
            lines = []
            if (remote or start_step is not None) and self._jsonl_path.exists():
                lines = self._jsonl_path.read_text().splitlines(keepends=True)
            if start_step is not None:
                # Rows past the checkpoint were logged by a run that stopped before its next one: those steps
                # are trained again. A torn last line goes too, so that each step is in the file once.
                kept = [line for line in lines if (step := _row_step(line)) is not None and step <= start_step]
                if len(kept) < len(lines):
                    run_dir.write_text(self._jsonl_path, "".join(kept))
                lines = kept
            if remote:
                self._jsonl_lines = lines
            else:
                self._jsonl = open(self._jsonl_path, "a")
        self._t0 = None
        self._step0 = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self._writer:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)
        line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._jsonl_lines.append(line)
            run_dir.write_text(self._jsonl_path, "".join(self._jsonl_lines))

    def start(self, step: int) -> None:
        """Marks where timing for the ETA starts (after compilation, ideally)."""
        self._t0, self._step0 = time.perf_counter(), step

    def progress(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total_steps}"]
        for name, fmt in (("train/loss", "loss {:.3f}"), ("train/bits_per_token", "bits/token {:.3f}"),
                          ("eval/bits_per_token", "val bits/token {:.3f}"), ("train/learning_rate", "lr {:.2e}"),
                          ("train/grad_norm", "|g| {:.2f}")):
            if name in values:
                parts.append(fmt.format(values[name]))
        if "perf/tokens_per_second" in values:
            parts.append(f"{format_count(values['perf/tokens_per_second'])} tok/s")
        if "perf/mfu" in values:
            parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
        if self._t0 is not None and step > self._step0:
            rate = (time.perf_counter() - self._t0) / (step - self._step0)
            parts.append(f"ETA {format_duration(rate * (self.total_steps - step))}")
        print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._writer:
            self._writer.flush()
            self._writer.close()
            if self._jsonl is not None:
                self._jsonl.close()
            self._writer = None
