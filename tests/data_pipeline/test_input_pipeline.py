"""Tests of the Grain input pipeline: windows, masks, augmentations, determinism, resume, sharding."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from absl import flags
from hypothesis import example, given, settings
from hypothesis import strategies as st

from data_pipeline import encoding, features
from data_pipeline import input_pipeline as ip
from data_pipeline.vocab import END, PAD, START, TokenKind, Vocab, VocabConfig

SEQ_LEN = 256
# A narrow pitch range, so that transposition pushes real notes out of it.
NARROW = VocabConfig(pitch_min=40, pitch_max=80, labels=("doom", "classical"))


def _records(midi_dir, vocab):
    records = []
    for path in sorted(midi_dir.glob("*.mid")):
        label = "doom" if path.name.startswith("freedoom") else "classical"
        piece = encoding.encode_midi(path, vocab, label=label)
        records.append(ip.record_from_piece(piece, vocab, path=path.name, content_hash=path.stem))
    return records


@pytest.fixture(scope="module")
def vocab():
    return Vocab(NARROW)


@pytest.fixture(scope="module")
def records(midi_fixtures, vocab):
    return _records(midi_fixtures, vocab)


@pytest.fixture(scope="module")
def pieces(records, vocab):
    return [ip.parse_record(r, vocab) for r in records]


def _config(**kw):
    return ip.InputConfig(**{"seq_len": SEQ_LEN, "batch_size": 4, "read_threads": 0, **kw})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _reference(piece, aug, vocab):
    """The whole piece augmented the slow way: decode to notes, transform, encode again."""
    notes, _ = encoding.decode_tokens(piece.tokens, vocab)
    pitched = notes.instrument != vocab.drums_index
    moved, keep = ip.transpose_pitches(notes.pitch, aug.shift, aug.out_of_range, vocab)
    keep |= ~pitched
    vbin = np.clip(vocab.velocity_bin(notes.velocity) + aug.volume, 0, vocab.config.velocity_bins - 1)
    stretch = lambda t: np.floor(t * aug.stretch + 0.5).astype(np.int64)
    out = encoding.Notes(notes.instrument[keep], np.where(pitched, moved, notes.pitch)[keep].astype(np.int32),
                         vocab.bin_velocity(vbin)[keep], stretch(notes.start[keep]), stretch(notes.end[keep]))
    encoded = encoding.encode_notes(out, vocab)
    return encoded.body, encoded.instruments


class LoggingSource:
    """A list of records that remembers which indices were read."""

    def __init__(self, records):
        self.records, self.seen = records, []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.records[i]


# -- records ---------------------------------------------------------------------------------------
def test_record_from_piece_round_trips_through_parse(records, pieces, vocab):
    record, piece = records[0], pieces[0]
    assert record["tokens"][-1] == END and record["tokens"].dtype == np.int32
    assert piece.label == record["label"] in NARROW.labels
    assert piece.duration_units == round(float(record["duration_s"]) * 1000 / NARROW.time_unit_ms)
    bytes_record = {**record, "label": record["label"].encode(), "path": b"x.mid"}
    assert ip.parse_record(bytes_record, vocab).label == piece.label


@pytest.mark.parametrize("change, message", [
    ({"label": "jazz"}, "label 'jazz'"),
    ({"chord": np.zeros(3, np.int32)}, "feature chord"),
    ({"tokens": np.array([], np.int32)}, "non-empty"),
    ({"instruments": np.array([99], np.int32)}, "instrument index"),
])
def test_parse_record_rejects_bad_records(records, vocab, change, message):
    with pytest.raises(ValueError, match=message):
        ip.parse_record({**records[0], **change}, vocab)


@pytest.mark.parametrize("field, value", [("seq_len", 1), ("batch_size", 0), ("num_epochs", 0),
                                          ("out_of_range", "wrap"), ("stretch_min", 0.0), ("seed", -1),
                                          ("window_sampling", "bars")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ip.InputConfig(**{field: value})


def test_config_from_mapping():
    assert ip.InputConfig.from_mapping({"seq_len": 64, "stretch": False}) == ip.InputConfig(seq_len=64, stretch=False)
    with pytest.raises(ValueError, match="unknown"):
        ip.InputConfig.from_mapping({"context": 64})


# -- examples: shapes and masks --------------------------------------------------------------------
def test_batches_shapes_masks_and_prefix(records, pieces, vocab):
    config = _config(num_epochs=1, shuffle=False, window_sampling="pieces")
    batches = list(ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1))
    assert len(batches) == len(records) // 4
    for k, batch in enumerate(batches):
        assert set(batch) == set(ip.BATCH_KEYS)
        for name, value in batch.items():
            assert value.shape == (4, SEQ_LEN)
            assert value.dtype == (np.float32 if name == "loss_mask" else np.int32)
        for row in range(4):
            piece = pieces[4 * k + row]
            inputs, targets, mask = batch["inputs"][row], batch["targets"][row], batch["loss_mask"][row]
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            p = list(inputs).index(START) + 1
            prefix = inputs[:p]
            assert prefix[0] == vocab.label_token(piece.label)
            assert all(vocab.kind[prefix[1:-1]] == TokenKind.INSTRUMENT)
            # Scored exactly where the target is a body token: from START's target to the last token.
            scored = np.flatnonzero(mask)
            assert scored[0] == p - 1 and np.all(np.diff(scored) == 1) and set(mask) <= {0.0, 1.0}
            assert np.all(targets[mask == 0][p - 1:] == PAD)
            assert not np.any(targets[scored] == PAD)
            # Prefix features: timing and chord 0, part and countdown of the first body token.
            assert not batch["timing"][row, :p].any() and not batch["chord"][row, :p].any()
            for name in ("part", "countdown"):
                assert np.all(batch[name][row, :p] == batch[name][row, p])


def test_short_piece_is_taken_whole_and_padded(records, pieces, vocab):
    index = min(range(len(pieces)), key=lambda i: len(pieces[i].tokens))
    piece, seq_len = pieces[index], len(pieces[index].tokens) + 64
    ex = ip.train_example(piece, vocab, _config(seq_len=seq_len).without_augmentation(),
                          np.random.default_rng(0))
    p = len(vocab.prefix(piece.label, piece.instruments))
    np.testing.assert_array_equal(ex["targets"][p - 1:p - 1 + len(piece.tokens)], piece.tokens)
    assert ex["loss_mask"].sum() == len(piece.tokens) and not ex["inputs"][p + len(piece.tokens):].any()
    np.testing.assert_array_equal(ex["timing"][p:p + len(piece.tokens)], piece.timing)


def test_unaugmented_window_is_a_slice_of_the_piece_at_a_time_step_start(pieces, vocab):
    config = _config().without_augmentation()
    for seed in range(20):
        piece = pieces[seed % len(pieces)]
        ex = ip.train_example(piece, vocab, config, np.random.default_rng(seed))
        p = int(np.argmax(ex["inputs"] == START)) + 1
        body = ex["targets"][ex["loss_mask"] > 0]
        starts = [s for s in np.flatnonzero((piece.tokens == body[0]) & (piece.timing == ex["timing"][p]))
                  if np.array_equal(piece.tokens[s:s + len(body)], body)]  # (music repeats: match times)
        assert starts, "the window is not a slice of the body"
        s = starts[0]
        assert s == 0 or (vocab.wait_units[piece.tokens[s - 1]] > 0 and vocab.wait_units[piece.tokens[s]] == 0)
        m = min(len(body), SEQ_LEN - p)
        for name in features.FEATURE_NAMES:
            np.testing.assert_array_equal(ex[name][p:p + m], getattr(piece, name)[s:s + m])


# -- augmentation -----------------------------------------------------------------------------------
def test_identity_augmentation_reproduces_stored_tokens_and_features(pieces, vocab):
    rng = np.random.default_rng(0)
    for piece in pieces:
        for position in [0, len(piece.tokens) - 1, *rng.integers(0, len(piece.tokens), 8)]:
            start = ip.snap_to_step_start(piece.tokens, int(position), 300, vocab)
            for n in (1, 200, 10**6):
                a, fa = ip.slice_window(piece, start, n)
                b, fb = ip.augment_window(piece, start, n, ip.Augmentation(), vocab)
                np.testing.assert_array_equal(a, b)
                for name in features.FEATURE_NAMES:
                    np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name), err_msg=name)


augmentations = st.builds(ip.Augmentation, shift=st.integers(-14, 14), volume=st.integers(-4, 4),
                          stretch=st.sampled_from([1.0, 0.6, 0.95, 1.03, 1.5]),
                          out_of_range=st.sampled_from(ip.OUT_OF_RANGE_POLICIES))


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 12), aug=augmentations)
def test_augmented_piece_equals_encoding_the_augmented_notes(pieces, vocab, index, aug):
    piece = pieces[index % len(pieces)]
    expected_tokens, expected_instruments = _reference(piece, aug, vocab)
    tokens, feats = ip.augment_window(piece, 0, 10**7, aug, vocab)
    np.testing.assert_array_equal(tokens, expected_tokens)
    assert ip.piece_instruments(piece, aug, vocab) == expected_instruments
    duration = int(np.floor(piece.duration_units * aug.stretch + 0.5))
    expected = features.compute_features(expected_tokens, vocab, duration)
    for name in features.FEATURE_NAMES:
        np.testing.assert_array_equal(getattr(feats, name), getattr(expected, name), err_msg=name)


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 12), aug=augmentations, position=st.floats(0, 1), n=st.integers(1, 3000))
# Found by this test: a note folded onto a key whose note was held across the window's start, with no
# event of that key in the window (`input_pipeline._held_notes`).
@example(index=9, aug=ip.Augmentation(shift=5, volume=0, stretch=1.0, out_of_range="fold"), position=0.900390625,
         n=7)
@example(index=9, aug=ip.Augmentation(shift=10, volume=0, stretch=1.0, out_of_range="fold"),
         position=0.900390625, n=96)
def test_augmented_window_is_an_excerpt_of_the_augmented_piece(pieces, vocab, index, aug, position, n):
    """A window equals the whole augmented piece from the window's first time step on (only that
    step may differ, where a stretch merged it with the step before)."""
    piece = pieces[index % len(pieces)]
    start = ip.snap_to_step_start(piece.tokens, int(position * (len(piece.tokens) - 1)), 300, vocab)
    tokens, feats = ip.augment_window(piece, start, n, aug, vocab)
    assert 1 <= len(tokens) <= n
    full, full_feats = ip.augment_window(piece, 0, 10**7, aug, vocab)
    later, full_later = feats.timing > feats.timing[0], full_feats.timing > feats.timing[0]
    k = int(later.sum())
    np.testing.assert_array_equal(tokens[later], full[full_later][:k])
    for name in features.FEATURE_NAMES:
        np.testing.assert_array_equal(getattr(feats, name)[later], getattr(full_feats, name)[full_later][:k])
    if len(tokens) < n:  # only the end of the piece makes a window short
        assert tokens[-1] == END and k == full_later.sum()


def _events(tokens, vocab):
    kind = vocab.kind[tokens]
    return {k: tokens[kind == k] for k in (TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM)}


@pytest.mark.parametrize("shift", [-12, -5, 7, 13])
def test_transposition_moves_pitched_notes_keeps_drums_and_stays_in_range(pieces, vocab, shift):
    lo, hi = NARROW.pitch_min, NARROW.pitch_max
    dropped = folded = 0
    for piece in pieces:
        before = _events(piece.tokens, vocab)
        for policy in ip.OUT_OF_RANGE_POLICIES:
            tokens, _ = ip.augment_window(piece, 0, 10**7, ip.Augmentation(shift=shift, out_of_range=policy), vocab)
            after = _events(tokens, vocab)
            np.testing.assert_array_equal(after[TokenKind.DRUM], before[TokenKind.DRUM])
            for kind in (TokenKind.NOTE_ON, TokenKind.NOTE_OFF):
                pitch = vocab.pitch[after[kind]]
                assert pitch.min(initial=lo) >= lo and pitch.max(initial=hi) <= hi
            old, new = vocab.pitch[before[TokenKind.NOTE_ON]] + shift, vocab.pitch[after[TokenKind.NOTE_ON]]
            in_range = (old >= lo) & (old <= hi)
            if policy == "drop":
                assert len(new) == in_range.sum()
                np.testing.assert_array_equal(np.sort(new), np.sort(old[in_range]))
                dropped += int((~in_range).sum())
            else:  # every note kept (unless it merged with another on its key) and octave-equivalent
                assert len(new) <= len(old) and len(new) >= in_range.sum()
                np.testing.assert_array_equal(np.unique(new % 12), np.unique(old % 12))
                folded += int((~in_range).sum())
    assert dropped > 0 and folded > 0, "the fixtures should push some notes out of range"


def test_instrument_whose_notes_all_drop_leaves_the_prefix(vocab):
    # Bass only above the range top after +5; piano well inside; drums.
    notes = encoding.Notes(instrument=np.array([0, 3, 3, vocab.drums_index], np.int32),
                           pitch=np.array([60, 78, 79, 36], np.int32), velocity=np.full(4, 80, np.int32),
                           start=np.array([0, 10, 20, 5]), end=np.array([40, 15, 30, 15]))
    piece = ip.parse_record(ip.record_from_piece(encoding.encode_notes(notes, vocab), vocab), vocab)
    assert piece.instruments == (0, 3, vocab.drums_index)
    assert ip.piece_instruments(piece, ip.Augmentation(shift=5), vocab) == (0, vocab.drums_index)
    assert ip.piece_instruments(piece, ip.Augmentation(shift=5, out_of_range="fold"), vocab) == piece.instruments
    assert ip.piece_instruments(piece, ip.Augmentation(shift=-5), vocab) == piece.instruments
    config = _config(seq_len=64, transpose_max=5, volume=False, stretch=False)
    with_bass = []
    for seed in range(40):  # the window is the whole piece: the prefix names bass iff a bass note is left
        ex = ip.train_example(piece, vocab, config, np.random.default_rng(seed))
        with_bass.append(vocab.instrument_token(3) in ex["inputs"])
        body = ex["targets"][ex["loss_mask"] > 0]
        assert with_bass[-1] == np.any(vocab.instrument[body[vocab.kind[body] == TokenKind.NOTE_ON]] == 3)
    assert any(with_bass) and not all(with_bass)


@pytest.mark.parametrize("volume", [-3, 2])
def test_volume_shifts_velocity_bins_within_range(pieces, vocab, volume):
    top = NARROW.velocity_bins - 1
    for piece in pieces:
        tokens, _ = ip.augment_window(piece, 0, 10**7, ip.Augmentation(volume=volume), vocab)
        for kind in (TokenKind.NOTE_ON, TokenKind.DRUM):
            before = vocab.velocity_bin_of[_events(piece.tokens, vocab)[kind]]
            after = vocab.velocity_bin_of[_events(tokens, vocab)[kind]]
            np.testing.assert_array_equal(after, np.clip(before + volume, 0, top))


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_stretch_rescales_time_and_keeps_events(pieces, vocab, factor):
    for piece in pieces:
        tokens, feats = ip.augment_window(piece, 0, 10**7, ip.Augmentation(stretch=factor), vocab)
        assert tokens[-1] == END
        assert abs(feats.timing[-1] - factor * piece.duration_units) <= 1
        attacks = lambda t: np.isin(vocab.kind[t], [TokenKind.NOTE_ON, TokenKind.DRUM]).sum()
        if factor > 1:  # no two times merge, so every attack survives
            assert attacks(tokens) == attacks(piece.tokens)
        duration = int(np.floor(factor * piece.duration_units + 0.5))
        assert feats.countdown[0] == min(duration * NARROW.time_unit_ms
                                         // NARROW.countdown_unit_ms, NARROW.countdown_max)


# -- determinism, resume, sharding -----------------------------------------------------------------
def test_same_seed_same_batches_and_augmentation_on(records, vocab):
    config = _config()
    a = _take(ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1), 6)
    b = _take(ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1), 6)
    _assert_batches_equal(a, b)
    c = _take(ip.make_train_iterator(records, vocab, dataclasses.replace(config, seed=1),
                                     process_index=0, process_count=1), 6)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    plain = _take(ip.make_train_iterator(records, vocab, config.without_augmentation(),
                                         process_index=0, process_count=1), 6)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, plain))


@pytest.mark.parametrize("read_threads", [0, 2])
def test_resume_mid_epoch_is_exact(records, vocab, read_threads):
    config = _config(read_threads=read_threads)  # 13 records, 3 batches per epoch: crosses epochs
    it = ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 5)
    resumed = ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 5), expected)


def test_epochs_reshuffle_and_end(records, vocab):
    source = LoggingSource(records)
    config = _config(batch_size=1, num_epochs=2, window_sampling="pieces")
    batches = list(ip.make_train_iterator(source, vocab, config, process_index=0, process_count=1))
    assert len(batches) == 2 * len(records)
    first, second = source.seen[:len(records)], source.seen[len(records):]
    assert sorted(first) == sorted(second) == list(range(len(records))) and first != second


def test_processes_see_disjoint_shards(records, vocab):
    seen = []
    for process_index in range(2):
        source = LoggingSource(records)
        config = _config(batch_size=2, num_epochs=1, window_sampling="pieces")
        batches = list(ip.make_train_iterator(source, vocab, config, process_index=process_index,
                                              process_count=2))
        assert len(batches) == (len(records) // 2) // 2
        seen.append(set(source.seen))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 4 * (len(records) // 4)  # 3 global batches of 2 x 2 distinct records
    with pytest.raises(ValueError, match="cannot be shared"):
        ip.make_train_iterator(records[:1], vocab, _config(window_sampling="pieces"), process_index=0,
                               process_count=2)


def test_seq_len_must_leave_room_after_the_prefix(records, vocab):
    with pytest.raises(ValueError, match="no room"):
        ip.make_train_iterator(records, vocab, _config(seq_len=ip.max_prefix_len(vocab)),
                               process_index=0, process_count=1)


@pytest.mark.slow
def test_orbax_checkpoint_saves_and_restores_the_iterator(records, vocab, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    config = _config()
    it = ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 3)
    resumed = ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_batches_equal(_take(resumed, 3), expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_worker_processes_give_the_same_batches_and_resume(records, vocab):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    config = _config()
    expected = _take(ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1), 6)
    it = ip.make_train_iterator(records, vocab, dataclasses.replace(config, worker_count=2),
                                process_index=0, process_count=1)
    _assert_batches_equal(_take(it, 3), expected[:3])
    state = it.get_state()
    resumed = ip.make_train_iterator(records, vocab, dataclasses.replace(config, worker_count=2),
                                     process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected[3:])


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from data_pipeline import encoding, input_pipeline as ip
    from data_pipeline.vocab import Vocab
    vocab = Vocab()
    paths = sorted(pathlib.Path(sys.argv[3]).glob("*.mid"))
    records = [ip.record_from_piece(encoding.encode_midi(p, vocab), vocab, path=p.name) for p in paths]
    seen = []
    class Source:
        def __len__(self): return len(records)
        def __getitem__(self, i): seen.append(i); return records[i]
    config = ip.InputConfig(seq_len=128, batch_size=1, num_epochs=1, read_threads=0, window_sampling="pieces")
    n = sum(1 for _ in ip.make_train_iterator(Source(), vocab, config))
    print("SEEN", jax.process_index(), n, json.dumps(sorted(seen)))
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_jax_processes_read_disjoint_shards_by_default(midi_fixtures):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, address, str(i), str(midi_fixtures)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    seen = {}
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        line = next(x for x in out.splitlines() if x.startswith("SEEN"))
        _, index, n, indices = line.split(" ", 3)
        seen[int(index)] = set(json.loads(indices))
        assert int(n) == len(seen[int(index)])
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 2 * (13 // 2)


# -- window sampling -------------------------------------------------------------------------------
def test_record_windows_is_one_per_window_of_body_tokens(vocab):
    per_window = SEQ_LEN + 1 - ip.max_prefix_len(vocab)
    counts = [1, per_window, per_window + 1, 10 * per_window - 1]
    np.testing.assert_array_equal(ip.record_windows(4, vocab, _config(), counts), [1, 1, 2, 10])
    np.testing.assert_array_equal(ip.record_windows(4, vocab, _config(window_sampling="pieces")), [1, 1, 1, 1])
    for counts, message in [(None, "needs the records' token counts"), ([5, 5], "source has 4 records"),
                            ([5, 0, 5, 5], "must be >= 1, got 0 for record 1")]:
        with pytest.raises(ValueError, match=message):
            ip.record_windows(4, vocab, _config(), counts)


def test_token_sampling_draws_each_piece_once_per_window_every_epoch(records, vocab):
    counts = ip.count_tokens(records)
    np.testing.assert_array_equal(counts, [len(r["tokens"]) for r in records])
    config = _config(seq_len=1024, batch_size=1, num_epochs=2)
    windows = ip.record_windows(len(records), vocab, config, counts)
    assert windows.min() == 1 and windows.max() >= 10  # the fixtures mix short and long pieces
    source = LoggingSource(records)
    batches = list(ip.make_train_iterator(source, vocab, config, token_counts=counts, process_index=0,
                                          process_count=1))
    assert len(batches) == 2 * windows.sum() == len(source.seen)  # the counts given: no record read to count
    first, second = source.seen[:windows.sum()], source.seen[windows.sum():]
    for epoch in (first, second):
        np.testing.assert_array_equal(np.bincount(epoch, minlength=len(records)), windows)
    assert first != second
    # Every draw of the same piece is a window of its own (start and augmentation drawn per example).
    longest = int(np.argmax(windows))
    rows = [b["inputs"][0] for b, i in zip(batches, source.seen) if i == longest]
    assert len({row.tobytes() for row in rows}) == len(rows)


def test_token_counts_are_read_from_the_records_when_not_given(records, vocab):
    config = _config()
    given = _take(ip.make_train_iterator(records, vocab, config, token_counts=ip.count_tokens(records),
                                         process_index=0, process_count=1), 4)
    counted = _take(ip.make_train_iterator(records, vocab, config, process_index=0, process_count=1), 4)
    _assert_batches_equal(counted, given)
    with pytest.raises(ValueError, match="source has 13 records"):
        ip.make_train_iterator(records, vocab, config, token_counts=[100] * 12, process_index=0, process_count=1)


def test_pieces_sampling_is_the_stream_without_repeats(records, vocab):
    # With one window per piece, 'tokens' equals 'pieces' (the same slots, the same draws).
    short = [1] * len(records)
    _assert_batches_equal(
        _take(ip.make_train_iterator(records, vocab, _config(), token_counts=short, process_index=0,
                                     process_count=1), 5),
        _take(ip.make_train_iterator(records, vocab, _config(window_sampling="pieces"), process_index=0,
                                     process_count=1), 5))


# -- evaluation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_batches_score_every_body_token_once(records, pieces, vocab, process_count):
    per_process = [ip.make_eval_batches(records, vocab, SEQ_LEN, 5, process_index=i, process_count=process_count)
                   for i in range(process_count)]
    assert len({len(ds) for ds in per_process}) == 1  # lockstep across processes
    # Deal the batches back into global order and collect each record's scored targets.
    ordered = [per_process[k % process_count][k // process_count] for k in range(sum(map(len, per_process)))]
    scored = {}
    for batch in ordered:
        assert batch["inputs"].shape == (5, SEQ_LEN)
        for row in range(5):
            if not batch["loss_mask"][row].any():
                assert not batch["inputs"][row].any()
                continue
            p = int(np.argmax(batch["inputs"][row] == START)) + 1
            label = vocab.config.labels[batch["inputs"][row, 0] - vocab.label_base]
            key = (label, tuple(batch["inputs"][row, 1:p - 1]))
            scored.setdefault(key, []).append(batch["targets"][row][batch["loss_mask"][row] > 0])
    expected = {}
    for piece in pieces:
        key = (piece.label, tuple(vocab.instrument_token(np.array(piece.instruments))))
        expected.setdefault(key, []).append(piece.tokens)
    assert {k: np.concatenate(v).tolist() for k, v in scored.items()} == \
        {k: np.concatenate(v).tolist() for k, v in expected.items()}
    again = ip.make_eval_batches(records, vocab, SEQ_LEN, 5, process_index=0, process_count=process_count)
    _assert_batches_equal(list(again), list(per_process[0]))


def _scored_rows(batches):
    return [batch["inputs"][row].tobytes() for batch in batches for row in range(len(batch["inputs"]))
            if batch["loss_mask"][row].any()]


def test_eval_max_windows_keeps_windows_spread_over_the_split(records, vocab):
    every = _scored_rows(ip.make_eval_batches(records, vocab, SEQ_LEN, 5, process_index=0, process_count=1))
    assert len(every) > 20
    kept = _scored_rows(ip.make_eval_batches(records, vocab, SEQ_LEN, 5, max_windows=7, process_index=0,
                                             process_count=1))
    assert kept == [every[k] for k in np.linspace(0, len(every) - 1, 7).round().astype(int)]
    assert kept[0] == every[0] and kept[-1] == every[-1]  # from the first piece to the last
    # Over processes: the same windows, dealt in batches.
    dealt = [ip.make_eval_batches(records, vocab, SEQ_LEN, 2, max_windows=7, process_index=p, process_count=2)
             for p in range(2)]
    assert len(dealt[0]) == len(dealt[1]) == 2
    assert sorted(_scored_rows(dealt[0]) + _scored_rows(dealt[1])) == sorted(kept)
    assert _scored_rows(ip.make_eval_batches(records, vocab, SEQ_LEN, 5, max_windows=10**6, process_index=0,
                                             process_count=1)) == every
    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        ip.make_eval_batches(records, vocab, SEQ_LEN, 5, max_windows=0, process_index=0, process_count=1)


class _CountingSource:
    """A list of records that counts reads."""

    def __init__(self, records):
        self.records, self.reads = records, 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.reads += 1
        return self.records[i]


def test_eval_windows_laid_out_from_stored_stats_read_no_record(records, pieces, vocab):
    counts = [len(piece.tokens) for piece in pieces]
    prefix_lens = [len(vocab.prefix(piece.label, piece.instruments)) for piece in pieces]
    for process_count, max_windows in ((1, None), (2, 7)):
        source = _CountingSource(records)
        given = ip.make_eval_batches(source, vocab, SEQ_LEN, 5, max_windows=max_windows, token_counts=counts,
                                     prefix_lengths=prefix_lens, process_index=0, process_count=process_count)
        assert source.reads == 0
        read = ip.make_eval_batches(records, vocab, SEQ_LEN, 5, max_windows=max_windows, process_index=0,
                                    process_count=process_count)
        given = list(given)
        _assert_batches_equal(given, list(read))
        assert source.reads == len(_scored_rows(given))  # a batch reads one record per window, and only those
    with pytest.raises(ValueError, match="give both token_counts and prefix_lengths"):
        ip.make_eval_batches(records, vocab, SEQ_LEN, 5, token_counts=counts, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="another dataset or split"):
        ip.make_eval_batches(records, vocab, SEQ_LEN, 5, token_counts=counts[1:], prefix_lengths=prefix_lens[1:],
                             process_index=0, process_count=1)
    with pytest.raises(ValueError, match="another vocabulary"):
        ip.make_eval_batches(records, vocab, SEQ_LEN, 5, token_counts=counts,
                             prefix_lengths=[ip.max_prefix_len(vocab) + 1] * len(records), process_index=0,
                             process_count=1)


# -- global stream sharding ------------------------------------------------------------------------
def _global_batches(records, vocab, process_count, n, start_batch=0, **kw):
    """n global batches read by `process_count` processes, their rows concatenated in process order."""
    per_process = [_take(ip.make_train_iterator(records, vocab, _config(batch_size=4 // process_count, **kw),
                                                process_index=p, process_count=process_count,
                                                start_batch=start_batch), n)
                   for p in range(process_count)]
    return [{k: np.concatenate([rows[i][k] for rows in per_process]) for k in ip.BATCH_KEYS} for i in range(n)]


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(records, vocab, process_count):
    # 13 records, global batch 4: 5 batches cross an epoch boundary; augmentation on.
    expected = _global_batches(records, vocab, 1, 5)
    _assert_batches_equal(_global_batches(records, vocab, process_count, 5), expected)


def test_start_batch_resumes_the_global_stream_on_another_process_count(records, vocab):
    expected = _global_batches(records, vocab, 1, 6)
    _assert_batches_equal(_global_batches(records, vocab, 2, 3, start_batch=3), expected[3:])
    _assert_batches_equal(_global_batches(records, vocab, 4, 2, start_batch=4), expected[4:])
    # A finite stream ends after the same number of global batches on any process count.
    examples = ip.record_windows(len(records), vocab, _config(), ip.count_tokens(records)).sum()
    for process_count in (1, 2):
        it = ip.make_train_iterator(records, vocab, _config(batch_size=4 // process_count, num_epochs=1),
                                    process_index=0, process_count=process_count, start_batch=1)
        assert len(list(it)) == examples // 4 - 1


def test_task_examples_are_infilling_sequences_with_the_sentinels_unscored(pieces, vocab):
    """With the mix on, about its share of the examples are infilling / accompaniment sequences (`hole` ... `fill`
    ... `end`), laid out like windows (prefix, then the sequence, padding) with `hole` and `fill` never scored and
    the features of `data_pipeline.infill`; the rest are the windows the mix-free stream gives."""
    config = _config(infill_rate=0.4, accompany_rate=0.2, transpose=True, volume=True, stretch=True)
    plain = _config(transpose=True, volume=True, stretch=True)
    tasks, same = 0, 0
    for index in range(120):
        piece = pieces[index % len(pieces)]
        example = ip.train_example(piece, vocab, config, np.random.default_rng((0, index)))
        seq = np.concatenate([example["inputs"], example["targets"][-1:]])
        assert len(example["inputs"]) == SEQ_LEN
        if vocab.hole not in seq:
            continue
        tasks += 1
        hole, fill = int(np.flatnonzero(seq == vocab.hole)[0]), int(np.flatnonzero(seq == vocab.fill)[0])
        assert hole < fill and (seq == vocab.hole).sum() == (seq == vocab.fill).sum() == 1
        assert START in seq[:hole]  # the prefix (and `before`) come first
        assert example["loss_mask"][hole - 1] == example["loss_mask"][fill - 1] == 0  # never targets
        ends = np.flatnonzero(seq == END)
        assert len(ends) == 1 and ends[0] > fill and example["loss_mask"][ends[0] - 1] == 1
        assert example["timing"][hole] == 0 and example["timing"][fill] == 0 and example["sounding"][fill] == 0
        mid = slice(fill + 1, ends[0])
        assert np.all(np.isin(vocab.kind[seq[mid]], (TokenKind.WAIT, TokenKind.NOTE_ON, TokenKind.NOTE_OFF,
                                                     TokenKind.DRUM)))
        assert np.all(np.diff(example["timing"][fill:ends[0]]) >= 0)  # the middle's time restarts at S
    assert 0.4 * 120 <= tasks <= 0.8 * 120
    # Mix off: the stream is exactly the mix-free one (the task draws are not made at all).
    for index in range(5):
        a = ip.train_example(pieces[index], vocab, plain, np.random.default_rng((0, index)))
        b = ip.train_example(pieces[index], vocab, _config(transpose=True, volume=True, stretch=True,
                                                           infill_rate=0.0), np.random.default_rng((0, index)))
        same += all(np.array_equal(a[k], b[k]) for k in a)
    assert same == 5


def test_the_mix_needs_a_vocabulary_with_infilling_tokens(records):
    old = Vocab(dataclasses.replace(NARROW, infill=False))
    with pytest.raises(ValueError, match=r"format v1.*rebuild the dataset, or set both to 0"):
        ip.make_train_dataset(records, old, _config(infill_rate=0.3))
    with pytest.raises(ValueError, match=r"infill_rate \+ accompany_rate must be <= 1"):
        _config(infill_rate=0.7, accompany_rate=0.4)
