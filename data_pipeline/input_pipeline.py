"""Grain input pipeline: random training windows with MuseNet's augmentations, and eval windows.

Records, pieces and the window rules (a prefix and a window packed as one example) are
`data_pipeline.windows`; the augmentations are `data_pipeline.augmentation`. This module draws them
and streams them with Grain.

Training windows start at a uniformly drawn body position, moved forward to the next time-step
start (the first event after a wait) so a window never opens in the middle of a chord; the last
window of a piece ends with `end` followed by padding, and a piece shorter than a window is taken
whole. How often a piece is drawn is `InputConfig.window_sampling`:

- 'tokens' (the default): a piece of T body tokens gives w = max(1, ceil(T / W)) examples per epoch,
  W = L + 1 - (the longest prefix) the body tokens a window holds: about one window per W tokens, so
  every body token is about equally likely to be trained on, as every one is scored once in
  evaluation. The token counts come from the dataset (`datasets.token_counts`), else from reading
  every record once.
- 'pieces': one example per piece per epoch, so a 400-token chorale weighs as much as a 30,000-token
  symphony, and a corpus of many short pieces dominates training beyond its share of the music.
  It suits held-out music made mostly of such short pieces: on the bundled corpus (359 chorales of
  457 pieces, a quarter of the tokens) 'pieces' scores the chorales better and every other style
  worse than 'tokens', and its training loss falls far below the validation loss.

Tasks. With `InputConfig.infill_rate` / `accompany_rate` > 0, that share of the examples is an infilling or an
accompaniment sequence instead of a plain window (`data_pipeline.infill`: a random span of the augmented piece,
its middle at most half the window, `before` and `context` sharing the rest); `hole` and `fill` are never
scored. Plain windows draw exactly as without the mix when it is off.

Evaluation windows (`make_eval_batches`) score every body token of every piece once, each with the
prefix (`windows.plan_windows`, the planner `musenet-eval` uses too).

Determinism. The training stream is ONE global sequence of examples, the same for any number of
processes: global example g (0, 1, 2, ...) is slot `order_e[g mod n]` of epoch e = g // n (n slots, one
per example of an epoch: record i fills w_i consecutive slots, `RepeatRecords`; a fresh permutation
`order_e` per epoch, `EpochShuffle`), and all its random draws (window start, augmentation) come from
a generator seeded by (seed, g) alone. Global batch k is examples
[k * G, (k + 1) * G) with G = batch_size * process_count; a last partial global batch is dropped.

Sharding. Process p of P reads only rows [p * B, (p + 1) * B) of each global batch (B = `batch_size`,
the per-process batch), i.e. global examples k * G + p * B + r for r < B. So the processes together see
exactly the batches one process with batch_size G would see, row for row, and the stream position is
"global batches consumed", the same number on every process. Restoring on a different process count
maps that position unchanged: `make_train_iterator(..., start_batch=k)` on every new process starts at
global batch k and reads its own rows of it, with the new P (`start_batch` is what the trainer stores
in its checkpoints; Grain's `get_state`/`set_state` also resumes exactly, but only on the same P).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline import encoding, infill
from data_pipeline.augmentation import (  # noqa: F401 (re-exported: their names were this module's)
    OUT_OF_RANGE_POLICIES,
    Augmentation,
    augment_notes,
    augment_window,
    piece_instruments,
    stretched_units,
    transpose_pitches,
)
from data_pipeline.vocab import Vocab
from data_pipeline.windows import (  # noqa: F401 (re-exported: their names were this module's)
    BATCH_KEYS,
    Piece,
    empty_example,
    max_prefix_len,
    pack_example,
    parse_record,
    plan_windows,
    record_from_piece,
    slice_window,
    snap_to_step_start,
    window_example,
)

WINDOW_SAMPLING = ("tokens", "pieces")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Input pipeline settings (field names match an ml_collections `config.data` block).

    Attributes:
      seq_len: L, the model's context in tokens (prefix included).
      batch_size: B, examples per batch on this process.
      seed: seeds the shuffle and every example's random draws (0 .. 2**32 - 1).
      shuffle: shuffle the epoch's examples (reshuffled every epoch).
      num_epochs: passes over the records (each record `w` times, see `window_sampling`); None
        repeats forever.
      window_sampling: 'tokens': a record gives one example per W of its body tokens each epoch;
        'pieces': one example per record (module docstring).
      worker_count: Grain worker processes (0: build batches in this process).
      worker_buffer_size: batches each worker keeps ready.
      read_threads: threads preparing examples in the process that builds batches (0: none, the
        caller's thread does the work when it asks for a batch).
      prefetch_buffer_size: examples those threads keep ready.
      transpose: switch for transposition; transpose_max: N, semitones (shift uniform in -N..N).
      out_of_range: what happens to notes transposed out of the pitch range: 'drop' or 'fold'.
      volume: switch for volume; volume_max_shift: M, velocity bins (shift uniform in -M..M).
      stretch: switch for timing stretch; stretch_min, stretch_max: range of the factor (uniform).
      infill_rate, accompany_rate: shares of the examples that are infilling / accompaniment tasks (module doc:
        tasks; `data_pipeline.infill.TaskMix`); 0 and 0: plain windows only.
    """

    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    window_sampling: str = "tokens"
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    prefetch_buffer_size: int = 64
    transpose: bool = True
    transpose_max: int = 3
    out_of_range: str = "drop"
    volume: bool = True
    volume_max_shift: int = 2
    stretch: bool = True
    stretch_min: float = 0.95
    stretch_max: float = 1.05
    infill_rate: float = 0.0
    accompany_rate: float = 0.0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        for name in ("batch_size", "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("worker_count", "read_threads", "prefetch_buffer_size", "transpose_max",
                     "volume_max_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if self.window_sampling not in WINDOW_SAMPLING:
            raise ValueError(f"window_sampling must be one of {WINDOW_SAMPLING}, got {self.window_sampling!r}")
        if self.out_of_range not in OUT_OF_RANGE_POLICIES:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE_POLICIES}, got {self.out_of_range!r}")
        if not 0 < self.stretch_min <= self.stretch_max:
            raise ValueError(f"need 0 < stretch_min <= stretch_max, got {self.stretch_min}, {self.stretch_max}")
        infill.TaskMix(infill_rate=self.infill_rate, accompany_rate=self.accompany_rate)  # checks the rates

    @property
    def task_mix(self) -> infill.TaskMix:
        return infill.TaskMix(infill_rate=self.infill_rate, accompany_rate=self.accompany_rate)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> InputConfig:
        """From a dict or an ml_collections ConfigDict (`.to_dict()`); unknown keys are an error."""
        d = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown input config fields: {sorted(unknown)}")
        return cls(**d)

    def without_augmentation(self) -> InputConfig:
        return dataclasses.replace(self, transpose=False, volume=False, stretch=False)


# -- examples --------------------------------------------------------------------------------------
def draw_augmentation(rng: np.random.Generator, config: InputConfig) -> Augmentation:
    """Draws every switched-on augmentation (always three draws, so switches do not shift the stream)."""
    shift = int(rng.integers(-config.transpose_max, config.transpose_max + 1))
    volume = int(rng.integers(-config.volume_max_shift, config.volume_max_shift + 1))
    stretch = float(rng.uniform(config.stretch_min, config.stretch_max))
    return Augmentation(shift=shift if config.transpose else 0, volume=volume if config.volume else 0,
                        stretch=stretch if config.stretch else 1.0, out_of_range=config.out_of_range)


def train_example(piece: Piece, vocab: Vocab, config: InputConfig,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random (augmented) window of `piece`; every random draw comes from `rng`."""
    aug = draw_augmentation(rng, config)
    if config.task_mix.active:
        example = task_example(piece, vocab, config, aug, rng)
        if example is not None:
            return example
    instruments = piece_instruments(piece, aug, vocab)
    prefix = vocab.prefix(piece.label, instruments)
    num_tokens = config.seq_len + 1 - len(prefix)
    latest = max(0, len(piece.tokens) - (config.seq_len + 1 - len(vocab.prefix(piece.label, piece.instruments))))
    start = snap_to_step_start(piece.tokens, int(rng.integers(0, latest + 1)), num_tokens, vocab)
    if aug.is_identity:
        body, feats = slice_window(piece, start, num_tokens)
    else:
        body, feats = augment_window(piece, start, num_tokens, aug, vocab)
    return pack_example(prefix, body, feats, config.seq_len)


def task_example(piece: Piece, vocab: Vocab, config: InputConfig, aug: Augmentation,
                 rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """An infilling / accompaniment example of the augmented piece (module doc: tasks), or None when the draw
    says a plain window (or the piece is too dense for even a one-unit span to fit). The piece is decoded only for a
    task: the draw needs only its (augmented) instruments and length."""
    instruments = piece_instruments(piece, aug, vocab)
    task = infill.draw_task(instruments, stretched_units(piece.duration_units, aug), config.task_mix, rng, vocab)
    if task is None:
        return None
    notes, duration = augment_notes(*encoding.decode_tokens(piece.body, vocab), aug, vocab)
    prefix = vocab.prefix(piece.label, instruments)
    seq = infill.task_sequence(notes, duration, *task, config.seq_len + 1 - len(prefix), vocab, rng)
    if seq is None:
        return None
    example = pack_example(prefix, seq.body, seq.features, config.seq_len)
    example["loss_mask"][len(prefix) - 1 + np.flatnonzero(~seq.scored)] = 0.0  # body token k: target p - 1 + k
    return example


class TrainWindows(grain.transforms.MapWithIndex):
    """Record -> training example; the global stream index g seeds the example's generator (picklable)."""

    def __init__(self, vocab: Vocab, config: InputConfig):
        self.vocab, self.config = vocab, config

    def map_with_index(self, index: int, record):
        rng = np.random.default_rng((self.config.seed, index))
        return train_example(parse_record(record, self.vocab), self.vocab, self.config, rng)


# -- datasets --------------------------------------------------------------------------------------
def count_tokens(source: Sequence) -> np.ndarray:
    """int64[n]: the body-token count of every record, read from the records themselves.

    Reads (and decodes) every record: a fraction of a millisecond each from ArrayRecord. A built
    dataset stores these counts (`datasets.token_counts`); this is the fallback.
    """
    return np.fromiter((len(source[i]["tokens"]) for i in range(len(source))), np.int64, len(source))


def record_windows(num_records: int, vocab: Vocab, config: InputConfig,
                   token_counts: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """int64[n]: examples each record gives per epoch under `config.window_sampling`.

    'tokens': max(1, ceil(T / W)) for a record of T body tokens, W = L + 1 - `max_prefix_len(vocab)`
    (`token_counts` required); 'pieces': 1 each (`token_counts` ignored).

    Raises:
      ValueError: counts missing, not one per record, or not all >= 1 (a body always has `end`).
    """
    if config.window_sampling == "pieces":
        return np.ones(num_records, np.int64)
    if token_counts is None:
        raise ValueError("window_sampling='tokens' needs the records' token counts")
    counts = np.asarray(token_counts, np.int64)
    if counts.shape != (num_records,):
        raise ValueError(f"token counts have shape {counts.shape}, the source has {num_records} records "
                         "(counts of another dataset or split?)")
    if num_records and counts.min() < 1:
        raise ValueError(f"token counts must be >= 1, got {counts.min()} for record {int(counts.argmin())}")
    per_window = config.seq_len + 1 - max_prefix_len(vocab)
    return np.maximum(1, -(-counts // per_window))


class RepeatRecords(grain.MapDataset):
    """Record i of its parent repeated `windows[i]` times, consecutively (slot j -> record `owner[j]`)."""

    def __init__(self, parent: grain.MapDataset, windows: np.ndarray):
        super().__init__(parent)
        if len(windows) != len(parent):
            raise ValueError(f"{len(windows)} window counts for {len(parent)} records")
        # int32: a pod's corpus has millions of slots, and workers each get a copy.
        self._owner = np.repeat(np.arange(len(parent), dtype=np.int32), windows)

    def __len__(self) -> int:
        return len(self._owner)

    def __str__(self) -> str:
        return f"RepeatRecords(records={len(self._parent)}, slots={len(self._owner)})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, slot = divmod(index, len(self._owner))
        return self._parent[int(self._owner[slot]) + epoch * len(self._parent)]


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults: the data pipeline itself does not need JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return process_index, process_count


class ProcessRows(grain.MapDataset):
    """This process's rows of each global batch of its parent (the global example stream).

    Local element i (row i mod B of local batch i // B) is global example
    (start_batch + i // B) * B * P + p * B + i mod B (see "Sharding" in the module docstring).
    """

    def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int, process_count: int,
                 start_batch: int = 0):
        super().__init__(parent)
        self._rows, self._process, self._global = batch_size, process_index, batch_size * process_count
        self._start = start_batch

    def __len__(self) -> int:
        return max(len(self._parent) // self._global - self._start, 0) * self._rows

    def __str__(self) -> str:
        return (f"ProcessRows(rows={self._rows}, process={self._process}, global_batch={self._global}, "
                f"start_batch={self._start})")

    def global_index(self, index: int) -> int:
        batch, row = divmod(index, self._rows)
        return (self._start + batch) * self._global + self._process * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.global_index(index)]


class EpochShuffle(grain.MapDataset):
    """Shuffles its parent with a fresh permutation each epoch (index // len), like
    `MapDataset.shuffle`, but at O(1) per element after one O(len) permutation per epoch.

    Why not Grain's own shuffle: its index_shuffle costs roughly 80 ms / len per element on this
    CPU (6 ms per element for 13 records, 0.15 ms for 1000), which dominates small datasets.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _shuffled_index(self, index: int) -> int:
        n = len(self._parent)
        epoch, rank = divmod(index, n)
        cached_epoch, order = self._cached  # one read: another thread may replace it meanwhile
        if cached_epoch != epoch:
            order = np.random.default_rng((self._seed, epoch)).permutation(n)
            self._cached = (epoch, order)
        return int(order[rank]) + epoch * n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._shuffled_index(index)]


def make_train_dataset(source: Sequence, vocab: Vocab, config: InputConfig, *,
                       token_counts: Sequence[int] | np.ndarray | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       start_batch: int = 0) -> grain.IterDataset:
    """The training stream as a Grain `IterDataset` of batches (see `make_train_iterator`)."""
    process_index, process_count = _process_shard(process_index, process_count)
    if config.seq_len <= max_prefix_len(vocab):
        raise ValueError(f"seq_len {config.seq_len} leaves no room after the longest prefix "
                         f"({max_prefix_len(vocab)} tokens)")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if config.task_mix.active and not vocab.config.infill:
        raise ValueError("data.infill_rate / data.accompany_rate need a vocabulary with infilling tokens; this "
                         "dataset's vocab.json is format v1 (before infilling): rebuild the dataset, or set both to 0")
    if config.window_sampling == "tokens" and token_counts is None:
        token_counts = count_tokens(source)
    windows = record_windows(len(source), vocab, config, token_counts)
    if windows.sum() < process_count:
        raise ValueError(f"{len(source)} records ({windows.sum()} examples per epoch) cannot be shared by "
                         f"{process_count} processes")
    ds = grain.MapDataset.source(source)
    if config.window_sampling != "pieces":
        ds = RepeatRecords(ds, windows)
    if config.shuffle:
        ds = EpochShuffle(ds, seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    # Windows are drawn on the global stream (index = global example g), before this process picks its rows.
    ds = ds.map_with_index(TrainWindows(vocab, config))
    ds = ProcessRows(ds, config.batch_size, process_index, process_count, start_batch)
    ds = ds.batch(config.batch_size, drop_remainder=True)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.prefetch_buffer_size))
    if config.worker_count:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return iter_ds


def make_train_iterator(source: Sequence, vocab: Vocab, config: InputConfig, *,
                        token_counts: Sequence[int] | np.ndarray | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        start_batch: int = 0) -> grain.DatasetIterator:
    """Shuffled, augmented, batched training batches for this process.

    Args:
      source: records (module docstring); anything with `__len__` and `__getitem__` that pickles if
        `config.worker_count > 0` (a list, a TFDS `ArrayRecordDataSource`).
      vocab: the vocabulary of the records' token ids.
      config: window length, per-process batch size B, seed, window sampling, augmentations.
      token_counts: int[n], the body-token count of each record (`datasets.token_counts`), for
        `window_sampling='tokens'`; None reads every record once to count them.
      process_index, process_count: p and P; this process reads rows [p * B, (p + 1) * B) of each
        global batch of B * P examples. Default `jax.process_index()` and `jax.process_count()`.
      start_batch: global batches already consumed (a resume position, valid for any P).
    Returns:
      A Grain iterator of batches (dicts of numpy arrays `BATCH_KEYS`, each [B, L]; with a finite
      `num_epochs` it stops after epochs * E // (B * P) batches, E the examples of an epoch
      (`record_windows(...).sum()`), dropping a last partial global batch) with `get_state()` /
      `set_state()` for exact resume on the same P; it also works with
      `grain.checkpoint.CheckpointSave` / `CheckpointRestore` in an orbax `CheckpointManager`.
      With `worker_count > 0` workers are spawned: call this under `if __name__ == "__main__"` with
      absl flags parsed.
    """
    return iter(make_train_dataset(source, vocab, config, token_counts=token_counts, process_index=process_index,
                                   process_count=process_count, start_batch=start_batch))


class _EvalBatch(grain.transforms.Map):
    """Batch number -> a batch of eval windows (picklable)."""

    def __init__(self, source, vocab: Vocab, seq_len: int, batches: list[list[tuple[int, int, int, int]]]):
        self.source, self.vocab, self.seq_len, self.batches = source, vocab, seq_len, batches

    def map(self, element):
        rows = []
        for record_index, *window in self.batches[element]:
            if record_index < 0:
                rows.append(empty_example(self.seq_len))
                continue
            rows.append(window_example(parse_record(self.source[record_index], self.vocab), window, self.seq_len))
        return {name: np.stack([row[name] for row in rows]) for name in BATCH_KEYS}


def make_eval_batches(source: Sequence, vocab: Vocab, seq_len: int, batch_size: int, *,
                      max_windows: int | None = None, token_counts: Sequence[int] | np.ndarray | None = None,
                      prefix_lengths: Sequence[int] | np.ndarray | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> grain.MapDataset:
    """Deterministic validation batches covering every body token of every record exactly once.

    Each piece is cut into windows of L + 1 - P body tokens (P its prefix length), each with the prefix, by
    `windows.plan_windows` at the stride of a whole window: every body token is a scored target exactly
    once, the last window of a piece ends at its end and scores only what the others left. With `max_windows`
    (over all processes), only that many windows are kept, evenly spaced over the whole list, so a
    quick evaluation samples every part of the split rather than its first pieces. Windows are batched
    in record order; the last batch is filled with empty rows (loss_mask 0). Batches are dealt to
    processes in turn (batch k to process k mod n), and each process gets the same number of
    batches (empty ones at the end where needed) so multi-host evaluation steps stay in lockstep.

    The windows are laid out from each record's body-token count and prefix length: given as
    `token_counts` and `prefix_lengths` (int[n], stored with the dataset: `datasets.token_counts`,
    `datasets.prefix_lengths`), no record is read here; without them every record is read once.
    Returns a Grain `MapDataset` of batches (iterate it, index it, or `.to_iter_dataset()` it for
    prefetching); a batch reads only its own records.
    """
    process_index, process_count = _process_shard(process_index, process_count)
    if seq_len <= max_prefix_len(vocab):
        raise ValueError(f"seq_len {seq_len} leaves no room after the longest prefix "
                         f"({max_prefix_len(vocab)} tokens)")
    if (token_counts is None) != (prefix_lengths is None):
        raise ValueError("give both token_counts and prefix_lengths, or neither")
    if token_counts is None:
        pieces = (parse_record(source[i], vocab) for i in range(len(source)))
        sizes = [(len(piece.tokens), len(vocab.prefix(piece.label, piece.instruments))) for piece in pieces]
    else:
        counts, prefixes = np.asarray(token_counts, np.int64), np.asarray(prefix_lengths, np.int64)
        if counts.shape != (len(source),) or prefixes.shape != (len(source),):
            raise ValueError(f"token counts {counts.shape} and prefix lengths {prefixes.shape} for a source of "
                             f"{len(source)} records (stats of another dataset or split?)")
        if len(source) and not (counts.min() >= 1 and 1 <= prefixes.min() and prefixes.max() <= max_prefix_len(vocab)):
            raise ValueError("token counts must be >= 1 and prefix lengths within 1.."
                             f"{max_prefix_len(vocab)} (stats of another vocabulary?)")
        sizes = zip(counts.tolist(), prefixes.tolist())
    windows = []
    for i, (num_tokens, prefix_len) in enumerate(sizes):
        plan = plan_windows(num_tokens, prefix_len, seq_len, seq_len + 1 - prefix_len)
        windows.extend((i, *map(int, row)) for row in plan)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        if len(windows) > max_windows:
            windows = [windows[k] for k in np.linspace(0, len(windows) - 1, max_windows).round().astype(int)]
    windows.extend([(-1, 0, 0, 0)] * (-len(windows) % batch_size))
    batches = [windows[k:k + batch_size] for k in range(0, len(windows), batch_size)]
    batches.extend([[(-1, 0, 0, 0)] * batch_size] * (-len(batches) % process_count))
    mine = batches[process_index::process_count]
    return grain.MapDataset.range(len(mine)).map(_EvalBatch(source, vocab, seq_len, mine))
