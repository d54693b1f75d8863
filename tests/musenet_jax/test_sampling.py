"""Sampling (`musenet_jax.sampling`): determinism, instrument constraints, primer, length control, features, and
sliding-window continuation past the model's context.

Two small random-init models share one small vocabulary: `model` (max_len 96) writes short pieces in one
window, `short_model` (max_len 32) writes pieces of many windows. Every call uses a batch of 3, and the
short model's calls the same token cap, so each model's window loop compiles once for the module. The
vocabulary is narrow (pitches C3..B4, two velocity bins, waits up to 16 units) so that waits are a good share
of the allowed tokens and a random model's pieces reach their target length.

Structured decoding (`musenet_jax.decode_rules`) is checked on the random models' pieces and on stand-in models
with fixed, adversarial logits (`FixedLogits`: uniform, only note-ons, only the longest rest, releases and END
early) that continue a primer leaving notes sounding: well-formed bodies, no note longer than the guard, every
note released before END, pieces that end by their target, and the loop's state against `sounding_state`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import encoding, features, input_pipeline
from data_pipeline.vocab import END, TokenKind, Vocab, VocabConfig
from musenet_jax import decode_rules, draws, sampling, window_loop
from musenet_jax import model as model_lib

BATCH, MAX_LEN, SECONDS = 3, 96, 0.5
SHORT_LEN, SHORT_CAP = 32, 600  # the short model's context and the token cap of its pieces
HOT = sampling.SamplingConfig(temperature=20.0)  # flattens the random model's opinions: waits come often


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    # max_chord=3: chords of the random model grow past it, so the loop's clipping is checked too.
    return Vocab(VocabConfig(labels=("bach", "jazz_fusion"), velocity_bins=2, pitch_min=48, pitch_max=71,
                             max_wait=16, max_chord=3))


def _model(vocab: Vocab, max_len: int) -> model_lib.MuseNet:
    config = model_lib.ModelConfig(
        vocab_size=vocab.size, d_model=32, num_heads=2, head_dim=16, mlp_dim=48, num_layers=3, max_len=max_len,
        attention_pattern="strided", attention_stride=8, attention_combination="interleaved",
        dtype="float32", remat_policy="off", init_std=0.2,  # a large init makes the random model opinionated
    )
    return model_lib.MuseNet(config, rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def model(vocab) -> model_lib.MuseNet:
    return _model(vocab, MAX_LEN)


@pytest.fixture(scope="module")
def short_model(vocab) -> model_lib.MuseNet:
    return _model(vocab, SHORT_LEN)


def run(model, vocab, **kwargs):
    args = dict(label="bach", instruments=["piano", "violin"], seconds=SECONDS, num_samples=BATCH, seed=0)
    args.update(kwargs)
    return sampling.generate(model, vocab, **args)


def run_long(short_model, vocab, **kwargs):
    return run(short_model, vocab, **{"seconds": 1.5, "max_tokens": SHORT_CAP, **kwargs})


def check_windows(out: sampling.DecodeArrays, vocab: Vocab, window: int) -> None:
    """Every window fed exactly the training window (`input_pipeline.pack_example`) of the final piece that
    starts at its start: the prefix, then body tokens with their absolute features (`compute_features` of the
    whole piece with the target length); and each window starts where training's snapping puts it."""
    p = out.prefix_len
    keep = sampling.carried_tokens(window, p)
    for row in range(out.tokens.shape[0]):
        tokens = out.tokens[row, : out.lengths[row]]
        assert (out.tokens[row, out.lengths[row]:] == 0).all()
        expected = features.compute_features(tokens, vocab, duration_units=out.duration_units)
        length_so_far = p + out.primer_len
        for k, w in enumerate(out.windows):
            fed, start = int(w.fed[row]), int(w.start[row])
            if fed == 0:  # the row had stopped before this window
                continue
            # Where the window starts: the body's start if the prompt fits, else about `keep` tokens before the
            # end of the piece so far, snapped to a time-step start as training windows are.
            if k == 0 and length_so_far <= window:
                assert start == p
            else:
                body = tokens[p:length_so_far]
                assert start == p + input_pipeline.snap_to_step_start(body, len(body) - keep, keep, vocab)
                assert 1 <= length_so_far - start <= window - p
            body = tokens[start: start + window + 1 - p]
            feats = features.Features(*(getattr(expected, name)[start: start + len(body)]
                                        for name in features.FEATURE_NAMES))
            example = input_pipeline.pack_example(tokens[:p], body, feats, window)
            np.testing.assert_array_equal(w.tokens[row, :fed], example["inputs"][:fed])
            for name in features.FEATURE_NAMES:
                np.testing.assert_array_equal(w.features[name][row, :fed], example[name][:fed], name)
            length_so_far = start + fed - p + 1  # the last fed position wrote the token after it
        assert length_so_far == len(tokens)


def test_same_seed_same_tokens_other_seed_differs(model, vocab):
    a, b, c = run(model, vocab, seed=3), run(model, vocab, seed=3), run(model, vocab, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    assert any(len(x.tokens) != len(z.tokens) or (x.tokens != z.tokens).any() for x, z in zip(a, c, strict=True))
    # The rows of a batch are distinct samples, not copies.
    assert len({tuple(p.tokens.tolist()) for p in a}) == BATCH


def test_a_batch_of_different_requests_gives_each_the_tokens_it_gets_alone(short_model, vocab):
    """`generate_batch` decodes requests with other labels, instruments (prefix lengths), lengths, sampling and
    seeds as rows of one batch (the server's batching); each row equals `generate`'s row `sample` of its own."""
    piano = vocab.instruments.index("piano")
    primer = encoding.encode_notes(encoding.Notes(np.full(2, piano, np.int32), np.array([60, 64], np.int32),
                                                  np.full(2, 80, np.int32), np.array([0, 3]), np.array([6, 9])),
                                   vocab).body[:-1]
    requests = [
        sampling.Request("bach", ("bass", "drums"), 1.5, sampling=sampling.SamplingConfig(1.5), seed=5, sample=0,
                         max_tokens=SHORT_CAP),
        sampling.Request("jazz_fusion", ("piano", "violin", "cello"), 1.0, primer=primer, sampling=HOT, seed=2,
                         sample=1, max_tokens=SHORT_CAP),
        sampling.Request(None, ("piano",), 1.2, sampling=sampling.SamplingConfig(8.0, top_k=5, top_p=0.9), seed=9,
                         sample=2, max_tokens=SHORT_CAP, max_note_seconds=0.2),
    ]
    together = sampling.generate_batch(short_model, vocab, requests)
    for request, piece in zip(requests, together, strict=True):
        alone = run_long(short_model, vocab, label=request.label, instruments=list(request.instruments),
                         seconds=request.seconds, primer=request.primer, sampling=request.sampling, seed=request.seed,
                         max_note_seconds=request.max_note_seconds)[request.sample]
        np.testing.assert_array_equal(piece.tokens, alone.tokens)
        assert (piece.prefix_len, piece.primer_len, piece.ended, piece.windows) == (
            alone.prefix_len, alone.primer_len, alone.ended, alone.windows)
    assert len({p.prefix_len for p in together}) == 3 and max(p.windows for p in together) >= 3
    # Padding rows (a server's fixed batch shapes) change nothing.
    padded = sampling.generate_batch(short_model, vocab, requests[:2], batch_size=3)
    for a, b in zip(padded, together[:2], strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_each_row_reads_its_own_columns_end_and_waits_first(vocab):
    """The logit columns of a row are its allowed ids in id order: END in column 0 and `wait:w` in column w (what
    `decode_rules.constrain` reads there); the window's column count is a power of two above every row's, at
    least the draw's candidates, at most V + 1 rounded up."""
    for names in (["piano"], ["drums"], ["piano", "violin", "drums"], list(vocab.instruments.names)):
        allowed = decode_rules.allowed_body_tokens(vocab, [vocab.instruments.index(n) for n in names])
        columns = np.flatnonzero(allowed)
        w = vocab.config.max_wait
        np.testing.assert_array_equal(columns[: w + 1], np.concatenate([[END], vocab.wait(np.arange(1, w + 1))]))
        u = decode_rules.column_count(vocab, len(columns))
        assert len(columns) < u <= -(-(vocab.size + 1) // 256) * 256 and u >= draws._NUCLEUS_CANDIDATES
    assert decode_rules.column_count(vocab, 300) == 512 and decode_rules.column_count(vocab, 10) == 256


def test_a_bad_request_fails_the_batch_before_decoding(short_model, vocab):
    good = sampling.Request("bach", ("piano",), 1.0, max_tokens=SHORT_CAP)
    traces = window_loop.TRACE_COUNTS["decode_window"]
    with pytest.raises(sampling.GenerationError, match="unknown instrument"):
        sampling.generate_batch(short_model, vocab, [good, dataclasses.replace(good, instruments=("kazoo",))])
    with pytest.raises(sampling.GenerationError, match="no requests"):
        sampling.generate_batch(short_model, vocab, [])
    with pytest.raises(sampling.GenerationError, match="smaller than the 2 requests"):
        sampling.generate_batch(short_model, vocab, [good, good], batch_size=1)
    with pytest.raises(sampling.GenerationError, match="seconds must be in"):
        sampling.check_request(short_model.config, vocab, dataclasses.replace(good, seconds=-1.0))
    assert window_loop.TRACE_COUNTS["decode_window"] == traces


def test_greedy_filters_ignore_the_seed(model, vocab):
    """top_k=1 (and a tiny top_p) leave one token per step, so every seed gives the same piece."""
    for cfg in (sampling.SamplingConfig(top_k=1), sampling.SamplingConfig(top_p=1e-6)):
        pieces = run(model, vocab, sampling=cfg, seed=1) + run(model, vocab, sampling=cfg, seed=2)
        assert len({tuple(p.tokens.tolist()) for p in pieces}) == 1
    top_k = run(model, vocab, sampling=sampling.SamplingConfig(top_k=1))[0].tokens
    top_p = run(model, vocab, sampling=sampling.SamplingConfig(top_p=1e-6))[0].tokens
    np.testing.assert_array_equal(top_k, top_p)


def test_only_chosen_instruments_and_body_tokens_across_windows(short_model, vocab):
    pieces = run_long(short_model, vocab, instruments=["bass", "drums"], seed=5, sampling=sampling.SamplingConfig(1.5))
    prefix = vocab.prefix("bach", [vocab.instruments.index("bass"), vocab.drums_index])
    chosen = {vocab.instruments.index("bass"), vocab.drums_index}
    kinds_seen = set()
    for piece in pieces:
        assert piece.windows >= 3
        np.testing.assert_array_equal(piece.tokens[: piece.prefix_len], prefix)
        body = piece.tokens[piece.prefix_len:]
        kinds = vocab.kind[body[:-1] if piece.ended else body]
        assert set(kinds.tolist()) <= {TokenKind.WAIT, TokenKind.NOTE_ON, TokenKind.NOTE_OFF, TokenKind.DRUM}
        kinds_seen |= set(kinds.tolist())
        assert (body[:-1] != END).all() and (body[-1] == END) == piece.ended
        notes, _ = encoding.decode_tokens(piece.tokens, vocab)
        assert set(notes.instrument.tolist()) <= chosen
    assert {TokenKind.NOTE_ON, TokenKind.DRUM} <= kinds_seen  # the random model does play both


def test_primer_is_kept_verbatim(model, vocab):
    piano = vocab.instruments.index("piano")
    notes = encoding.Notes(np.full(4, piano, np.int32), np.array([60, 64, 67, 62], np.int32),
                           np.full(4, 80, np.int32), np.array([0, 0, 7, 20]), np.array([7, 20, 20, 30]))
    primer = encoding.encode_notes(notes, vocab).body[:-1]  # no END
    pieces = run(model, vocab, instruments=["piano"], primer=primer, seed=7)
    for piece in pieces:
        assert piece.primer_len == len(primer)
        np.testing.assert_array_equal(piece.tokens[piece.prefix_len: piece.prefix_len + len(primer)], primer)
    # The primer sets the start of every row; the continuations differ.
    assert len({tuple(p.tokens.tolist()) for p in pieces}) == BATCH


def test_primer_longer_than_a_window_is_kept_and_continued(short_model, vocab):
    piano = vocab.instruments.index("piano")
    starts = np.arange(20) * 4  # 20 notes, one every 4 units: 60 body tokens, 0.8 s
    notes = encoding.Notes(np.full(20, piano, np.int32), (48 + np.arange(20) % 24).astype(np.int32),
                           np.full(20, 80, np.int32), starts, starts + 3)
    primer = encoding.encode_notes(notes, vocab).body[:-1]
    assert len(primer) > SHORT_LEN
    out = sampling.decode_arrays(short_model, vocab, label="bach", instruments=["piano"], seconds=1.5, primer=primer,
                                 num_samples=BATCH, seed=2, sampling=HOT, max_tokens=SHORT_CAP)
    p = out.prefix_len
    for row in range(BATCH):
        np.testing.assert_array_equal(out.tokens[row, p: p + len(primer)], primer)
        assert out.lengths[row] > p + len(primer)
    # The first window already carries only the primer's last tokens (the prompt does not fit in it), and the
    # primer's features are those of the whole primer.
    assert (out.windows[0].start > p).all()
    check_windows(out, vocab, SHORT_LEN)


def test_windows_are_training_windows_compiled_once(short_model, vocab):
    """A piece of many windows: each window is fed exactly as a training window of the final piece, the same
    seed gives the same tokens, and the window loop is traced at most once for all its windows (and not again
    for other settings of the same shapes: batch size and column count)."""
    before = window_loop.TRACE_COUNTS["decode_window"]
    kwargs = dict(label=None, instruments=["piano", "violin"], seconds=1.5, num_samples=BATCH, seed=11,
                  sampling=HOT, max_tokens=SHORT_CAP)
    out = sampling.decode_arrays(short_model, vocab, **kwargs)
    assert window_loop.TRACE_COUNTS["decode_window"] - before <= 1
    assert len(out.windows) >= 3
    check_windows(out, vocab, SHORT_LEN)
    check_rules(out, vocab)  # a random model's pieces are well-formed too
    check_states(out, vocab)
    assert max(features.compute_features(t[:n], vocab).chord.max() for t, n in zip(out.tokens, out.lengths)) == 2

    again = sampling.decode_arrays(short_model, vocab, **kwargs)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    traced = window_loop.TRACE_COUNTS["decode_window"]
    other = {**kwargs, "label": "jazz_fusion", "instruments": ["cello"], "seconds": 2.5, "seed": 12,
             "sampling": sampling.SamplingConfig(2.0, top_k=20)}
    check_windows(sampling.decode_arrays(short_model, vocab, **other), vocab, SHORT_LEN)
    assert window_loop.TRACE_COUNTS["decode_window"] == traced
    # Drums may hold more ids than the 256 columns of a pitched instrument or two: at most one more loop (512
    # columns; none if an earlier test compiled it).
    check_windows(sampling.decode_arrays(short_model, vocab, **{**other, "instruments": ["drums"]}), vocab, SHORT_LEN)
    assert window_loop.TRACE_COUNTS["decode_window"] <= traced + 1


def test_long_pieces_end_near_the_target(short_model, vocab):
    seconds = 1.5
    out = sampling.decode_arrays(short_model, vocab, label="bach", instruments=["piano", "violin"], seconds=seconds,
                                 num_samples=BATCH, seed=3, sampling=HOT, max_tokens=SHORT_CAP)
    tolerance = sampling.end_tolerance_units(out.duration_units, vocab)
    assert out.ended.all(), "a piece reached the token cap before its target length"
    for row in range(BATCH):
        tokens = out.tokens[row, : out.lengths[row]]
        assert tokens[-1] == END and END not in tokens[:-1]
        units = int(vocab.wait_units[tokens].sum())
        assert out.duration_units - tolerance <= units <= out.duration_units
        assert len(tokens) > 2 * SHORT_LEN  # far longer than one window
    pieces = run_long(short_model, vocab, seed=3, sampling=HOT)
    for piece in pieces:
        assert piece.ended and piece.windows >= 3
        assert seconds - tolerance / 100 - 1e-9 <= piece.seconds <= seconds + 1e-9


class FixedLogits(nnx.Module):
    """A stand-in for `MuseNet` in the sampler: the same next-token logits float32[V] after every token, whatever
    the context. Its `config` is a real `ModelConfig` (the sampler reads max_len, vocab_size and the feature
    horizons); the logits are a Variable, so stand-ins of one context length share one compiled loop."""

    def __init__(self, vocab: Vocab, max_len: int, logits: np.ndarray):
        self.config = model_lib.ModelConfig(vocab_size=vocab.size, max_len=max_len)
        self.logits = nnx.Variable(jnp.asarray(logits, jnp.float32))

    def init_cache(self, batch: int) -> tuple:
        return ()  # nothing to remember: the logits do not depend on the context

    def decode_step(self, tokens, features, position, cache, columns):
        return jnp.take(self.logits[...], columns), cache


def test_a_closing_rest_stays_a_rest(vocab):
    # A model that rests: the longest wait (16 units) 99.5% of the time. 0.5 s = 50 units = 3 x 16 + 2: the
    # fourth wait would pass the target, so it becomes wait:2, and the piece ends on time with no note added
    # (masked and renormalised instead, the rest's probability went to the note-ons: a burst of notes there).
    logits = np.zeros(vocab.size, np.float32)
    logits[vocab.wait(vocab.config.max_wait)] = 10.0
    out = sampling.decode_arrays(FixedLogits(vocab, MAX_LEN, logits), vocab, label="bach",
                                 instruments=["piano", "violin"], seconds=SECONDS, num_samples=BATCH, seed=0)
    assert out.duration_units == 50
    for row in range(BATCH):
        tokens = out.tokens[row, out.prefix_len: out.lengths[row]]
        assert tokens[-1] == END and int(vocab.wait_units[tokens].sum()) == 50
        last_wait = max(i for i, t in enumerate(tokens) if vocab.wait_units[t])
        assert vocab.wait_units[tokens[last_wait]] == 2
        assert len(tokens) - last_wait - 1 == 1  # only END after the closing rest


def test_release_mass_goes_to_the_sounding_notes(vocab):
    # A model sure that a note ends now but wrong about which: all its mass on releasing a silent key (C3), none
    # on the piano E4 the primer leaves sounding. The rules forbid the C3 release; its mass goes to the allowed
    # release, so E4 ends right away. (Masked and renormalised instead, E4's release would be one of ~100
    # equally likely tokens, and a wait, an attack or another one would come first in most rows.)
    piano = vocab.instruments.index("piano")
    logits = np.zeros(vocab.size, np.float32)
    logits[vocab.note_off(piano, 48)] = 30.0
    primer = np.array([vocab.note_on(piano, 1, 64), vocab.wait(4)], np.int32)
    out = sampling.decode_arrays(FixedLogits(vocab, MAX_LEN, logits), vocab, label="bach",
                                 instruments=["piano", "violin"], seconds=SECONDS, primer=primer, num_samples=BATCH,
                                 seed=0)
    for row in range(BATCH):
        assert out.tokens[row, out.prefix_len + len(primer)] == vocab.note_off(piano, 64)


def test_token_cap_stops_a_piece_without_end(short_model, vocab):
    cap = SHORT_CAP - 10  # the same buffer size: no new compilation
    out = sampling.decode_arrays(short_model, vocab, label="bach", instruments=["piano"], seconds=100.0,
                                 num_samples=BATCH, seed=0, max_tokens=cap)
    assert not out.ended.any() and (out.lengths == out.prefix_len + cap).all()
    assert all(END not in row for row in out.tokens)
    check_rules(out, vocab)  # well-formed up to the cap, and no note longer than the default guard
    check_states(out, vocab)


def test_one_window_pieces_reach_their_target(model, vocab):
    out = sampling.decode_arrays(model, vocab, label=None, instruments=["piano", "violin"], seconds=SECONDS,
                                 num_samples=BATCH, seed=11, sampling=HOT)
    target = out.duration_units
    assert target == round(SECONDS * 1000 / vocab.config.time_unit_ms)
    assert out.max_tokens == MAX_LEN  # the default cap is at least one context
    tolerance = sampling.end_tolerance_units(target, vocab)
    assert out.ended.any(), "no piece reached its target length"
    check_windows(out, vocab, MAX_LEN)
    for row in range(BATCH):
        tokens = out.tokens[row, : out.lengths[row]]
        units = int(vocab.wait_units[tokens].sum())
        assert units <= target  # time never passes the target
        if out.ended[row]:
            assert tokens[-1] == END and target - tolerance <= units <= target


def test_max_seconds_is_the_smallest_feature_horizon(model, vocab):
    # countdown 127 steps of 1 s; timing table 1024 * 50 units = 512 s; the context does not bound it.
    assert sampling.max_seconds(model.config, vocab) == pytest.approx(127.0)
    no_countdown = dataclasses.replace(model.config, use_countdown=False)
    assert sampling.max_seconds(no_countdown, vocab) == pytest.approx(512.0)
    assert sampling.max_seconds(dataclasses.replace(no_countdown, use_timing=False), vocab) == math.inf
    assert sampling.default_max_tokens(60.0, model.config) == 60 * sampling.MAX_TOKENS_PER_SECOND
    assert sampling.default_max_tokens(0.1, model.config) == MAX_LEN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(instruments=["piano", "kazoo"]), r"unknown instrument.*'kazoo'.*valid: piano, .*drums"),
        (dict(instruments=[]), r"at least one instrument.*valid: piano"),
        (dict(label="Mozart"), r"unknown label 'Mozart'.*valid: bach, jazz_fusion"),
        (dict(seconds=0.0), r"seconds must be in \(0, 127\]"),
        (dict(seconds=128.0), r"seconds must be in \(0, 127\]"),
        (dict(seconds=float("nan")), r"seconds must be in \(0, 127\]"),
        (dict(num_samples=0), r"num_samples"),
        (dict(max_tokens=0), r"max_tokens \(body tokens per piece, primer included\) must be in 1\.\.1048576"),
        (dict(primer=np.full(40, 3 + 15, np.int32), max_tokens=40), r"primer takes 40 tokens.*40-token cap"),
        (dict(primer=np.array([1, 3], np.int32)), r"body tokens only.*'start'"),
    ],
)
def test_bad_arguments_raise_generation_error(model, vocab, kwargs, message):
    with pytest.raises(sampling.GenerationError, match=message):
        run(model, vocab, **kwargs)


def test_prefix_too_long_for_the_context(vocab):
    tiny = _model(vocab, 8)  # label + 5 instruments + start leave 1 token: no room to carry and write one
    with pytest.raises(sampling.GenerationError, match="prefix takes 7 tokens, too many for this model's 8-token"):
        run(tiny, vocab, instruments=["piano", "violin", "bass", "guitar", "drums"])
    run(tiny, vocab, instruments=["piano", "violin", "bass"], num_samples=1, max_tokens=4)  # 3 tokens leave room


def test_primer_with_other_instruments_or_too_long(model, vocab):
    guitar = vocab.instruments.index("guitar")
    primer = np.array([vocab.note_on(guitar, 1, 60), vocab.wait(4), vocab.drum(36, 0)], np.int32)
    with pytest.raises(sampling.GenerationError, match="primer plays guitar, drums, which is not among"):
        run(model, vocab, instruments=["piano"], primer=primer)
    long = np.full(5, vocab.wait(16), np.int32)  # 80 units = 0.8 s > 0.5 s
    with pytest.raises(sampling.GenerationError, match=r"primer lasts 0\.8 s"):
        run(model, vocab, primer=long)


def test_sampling_config_validates():
    with pytest.raises(sampling.GenerationError, match="temperature"):
        sampling.SamplingConfig(temperature=0.0)
    with pytest.raises(sampling.GenerationError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
    with pytest.raises(sampling.GenerationError, match="top_k"):
        sampling.SamplingConfig(top_k=-1)
    assert issubclass(sampling.GenerationError, ValueError)


# --- Structured decoding: well-formed bodies, no hanging notes (musenet_jax.decode_rules). -------------------

GUARD_SECONDS = 0.2  # M = 20 units: short enough that the guard binds many times in a 1.5 s piece
RULES_CAP = 1000  # body tokens: room for the note-on model's long chords before its target


def adversary(vocab: Vocab, name: str) -> np.ndarray:
    """Logits float32[V] of a model that wants one thing whatever the context."""
    logits = np.zeros(vocab.size, np.float32)  # 'uniform'
    if name == "note_ons":
        logits[vocab.kind == TokenKind.NOTE_ON] = 30.0
    elif name == "longest_wait":
        logits[vocab.wait(vocab.config.max_wait)] = 30.0
    elif name == "releases_and_end":
        logits[vocab.kind == TokenKind.NOTE_OFF] = 30.0
        logits[END] = 30.0
    return logits


def sounding_primer(vocab: Vocab) -> np.ndarray:
    """A well-formed primer body that stops in the middle of its time step 16, with three notes sounding: E4 from
    4, G4 from 8 and D4 from 16 (C4 sounded 0..12)."""
    piano = vocab.instruments.index("piano")
    notes = encoding.Notes(np.full(4, piano, np.int32), np.array([60, 64, 67, 62], np.int32), np.full(4, 80, np.int32),
                           np.array([0, 4, 8, 16]), np.array([12, 40, 40, 24]))
    body = encoding.encode_notes(notes, vocab).body
    waits = np.cumsum(vocab.wait_units[body])
    primer = body[: np.flatnonzero(vocab.kind[body] == TokenKind.NOTE_ON)[-1] + 1]  # up to D4's attack at 16
    assert waits[len(primer) - 1] == 16
    return primer


def decode_rules_piece(vocab: Vocab, logits: np.ndarray, **kwargs) -> sampling.DecodeArrays:
    args = dict(label="bach", instruments=["piano", "violin", "drums"], seconds=1.5, num_samples=BATCH, seed=0,
                max_tokens=RULES_CAP, max_note_seconds=GUARD_SECONDS, primer=sounding_primer(vocab))
    args.update(kwargs)
    return sampling.decode_arrays(FixedLogits(vocab, SHORT_LEN, logits), vocab, **args)


def check_rules(out: sampling.DecodeArrays, vocab: Vocab) -> None:
    """The invariants of structured decoding, for every row of `out`."""
    p, target, m = out.prefix_len, out.duration_units, out.max_note_units
    tolerance = sampling.end_tolerance_units(target, vocab)
    for row in range(out.tokens.shape[0]):
        tokens = out.tokens[row, : out.lengths[row]]
        body = tokens[p:]
        ended = bool(out.ended[row])
        assert (body[-1] == END) == ended and END not in body[:-1]
        events = body[:-1] if ended else body
        # The piece ends at or before its target; an ended one in its last `tolerance` units.
        units = int(vocab.wait_units[events].sum())
        assert units <= target and (not ended or units >= target - tolerance), (units, target)
        # Every pitched note is released before END.
        if ended:
            assert (decode_rules.sounding_state(events, vocab).key_time < 0).all()
        # No pitched note sounds longer than the guard (also those the decoder closes at the token cap: time
        # never passes the guard of a sounding note).
        notes, _ = encoding.decode_tokens(body, vocab)
        pitched = notes.instrument != vocab.drums_index
        if m:
            assert (notes.end - notes.start)[pitched].max(initial=0) <= m
        # Well-formed: encoding the decoded notes gives the body back. The encoding ends a piece at its last
        # event, so a closing rest is not written again; a piece cut by the token cap is compared up to its
        # last wait, where the encoding adds the releases of the notes still sounding.
        if not ended:
            waits = np.flatnonzero(vocab.wait_units[events] > 0)
            events = events[: waits[-1] + 1 if len(waits) else 0]
        again = encoding.encode_notes(encoding.decode_tokens(events, vocab)[0], vocab).body[:-1]
        if (decode_rules.sounding_state(events, vocab).key_time >= 0).any():
            np.testing.assert_array_equal(again[: len(events)], events)
            assert (vocab.kind[again[len(events):]] == TokenKind.NOTE_OFF).all()
        else:
            last_event = np.flatnonzero(vocab.wait_units[events] == 0)
            np.testing.assert_array_equal(again, events[: last_event[-1] + 1 if len(last_event) else 0])


def check_states(out: sampling.DecodeArrays, vocab: Vocab) -> None:
    """The loop's state after every window (carried to the next) is `sounding_state` of the piece so far."""
    p = out.prefix_len
    for row in range(out.tokens.shape[0]):
        tokens = out.tokens[row, : out.lengths[row]]
        for w in out.windows:
            if w.fed[row] == 0:
                continue
            length = int(w.start[row]) + int(w.fed[row]) - p + 1  # the last fed position wrote the token after it
            expected = decode_rules.sounding_state(tokens[:length], vocab)
            for name, got in zip(expected._fields, w.sounding, strict=True):
                np.testing.assert_array_equal(got[row], getattr(expected, name), name)


def test_sounding_state_replays_tokens(vocab):
    key = lambda name, pitch: vocab.instruments.index(name) * 128 + pitch
    tokens = vocab.from_text("bach piano start piano:v80:C4 violin:v80:E4 drums:v80:C2 wait:4 piano:v0:C4 "
                             "piano:v80:G4 violin:v80:E4 drums:v80:D2")
    state = decode_rules.sounding_state(tokens, vocab)
    expected = np.full(decode_rules.num_keys(vocab), decode_rules.NEVER)
    expected[[key("piano", 60), key("violin", 64), key("piano", 67)]] = [-1 - 4, 4, 4]  # C4 released at 4
    np.testing.assert_array_equal(state.key_time, expected)  # the re-attacked E4 sounds from 4; drums never
    assert (state.last_release, state.last_attack) == (key("piano", 60), key("drums", 38))
    state = decode_rules.sounding_state(np.append(tokens, vocab.wait(2)), vocab)  # a wait starts a new step
    assert (state.last_release, state.last_attack) == (-1, -1)


@pytest.mark.parametrize(("name", "guard"), [("uniform", GUARD_SECONDS), ("note_ons", GUARD_SECONDS),
                                             ("longest_wait", GUARD_SECONDS), ("releases_and_end", GUARD_SECONDS),
                                             ("longest_wait", None)])
def test_adversarial_models_write_well_formed_music(vocab, name, guard):
    """Models that want one thing (uniform; only note-ons; only the longest rest; releases and END early),
    continuing a primer that leaves three notes sounding, in many windows: every body is well-formed, every
    note is released before END, none lasts longer than the guard, the pieces end by their target, and the
    loop's state follows the tokens."""
    out = decode_rules_piece(vocab, adversary(vocab, name), max_note_seconds=guard)
    assert out.max_note_units == (20 if guard else 0)
    assert out.ended.all()
    assert len(out.windows) >= (1 if name == "longest_wait" else 3)  # a piece of rests takes few tokens
    check_rules(out, vocab)
    check_states(out, vocab)
    check_windows(out, vocab, SHORT_LEN)
    for row in range(BATCH):
        notes, _ = encoding.decode_tokens(out.tokens[row, : out.lengths[row]], vocab)
        if name == "longest_wait":
            # Time passes up to the guard, and the notes that reach it end there; with no guard they sound until
            # the target, where they are released (in key order) before END. The model never attacks.
            end = (lambda start: start + 20) if guard else (lambda start: out.duration_units)
            assert sorted(zip(notes.pitch.tolist(), notes.start.tolist(), notes.end.tolist())) == [
                (60, 0, 12), (62, 16, end(16)), (64, 4, end(4)), (67, 8, end(8))]
            tokens = out.tokens[row, : out.lengths[row]]
            assert int(vocab.wait_units[tokens].sum()) == out.duration_units  # a closing rest up to the target
            if guard is None:
                np.testing.assert_array_equal(tokens[-4:], vocab.from_text("piano:v0:D4 piano:v0:E4 piano:v0:G4 end"))
        if name == "note_ons":
            # The model re-attacks sounding keys: a note ends where the next one of its key starts.
            key = notes.instrument * 128 + notes.pitch
            order = np.lexsort((notes.start, key))
            key, start, end = key[order], notes.start[order], notes.end[order]
            assert ((key[1:] == key[:-1]) & (end[:-1] == start[1:])).any()


def test_advance_follows_sounding_state_token_by_token(vocab):
    """`decode_rules.advance` (the loop's transition) from the prompt's state, token by token over the sampled
    bodies, equals `sounding_state` of each prefix of the piece."""
    out = decode_rules_piece(vocab, adversary(vocab, "uniform"), seed=4)
    rules = decode_rules.rule_tables(vocab)
    first = out.prefix_len + out.primer_len  # the first sampled token
    tokens = out.tokens[:, first: out.lengths.max()]
    timing = np.stack([features.compute_features(t, vocab).timing for t in out.tokens])[:, first: out.lengths.max()]
    active = first + np.arange(tokens.shape[1])[None, :] < out.lengths[:, None]
    start = decode_rules.sounding_state(out.tokens[0, :first], vocab)
    state = decode_rules.SoundingState(*(jnp.asarray(np.broadcast_to(x, (BATCH, *np.shape(x)))) for x in start))

    def step(state, xs):
        state = decode_rules.advance(state, *xs, rules)
        return state, state

    _, states = jax.lax.scan(step, state, (jnp.asarray(tokens.T), jnp.asarray(timing.T), jnp.asarray(active.T)))
    for row in range(BATCH):
        for i in range(int(out.lengths[row]) - first):
            expected = decode_rules.sounding_state(out.tokens[row, : first + i + 1], vocab)
            for name, got in zip(expected._fields, states, strict=True):
                np.testing.assert_array_equal(np.asarray(got[i, row]), getattr(expected, name), (row, i, name))


def test_default_guard_and_bad_guard(vocab):
    out = decode_rules_piece(vocab, adversary(vocab, "uniform"), max_note_seconds=sampling.DEFAULT_MAX_NOTE_SECONDS)
    assert out.max_note_units == round(sampling.DEFAULT_MAX_NOTE_SECONDS * 1000 / vocab.config.time_unit_ms)
    for bad in (-1.0, float("nan"), math.inf):
        with pytest.raises(sampling.GenerationError, match=r"max_note_seconds must be >= 0 \(0 or None: no limit\)"):
            decode_rules_piece(vocab, adversary(vocab, "uniform"), max_note_seconds=bad)
    assert decode_rules.max_note_units(0.0, vocab) == decode_rules.max_note_units(None, vocab) == 0
    assert decode_rules.max_note_units(1e-6, vocab) == 1  # at least one unit


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Reference: the smallest set of most likely tokens whose mass reaches top_p (by sorting)."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return np.sort(order[before < top_p])


@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_draw_follows_the_nucleus_distribution_in_any_batch(top_p):
    """`draws.draw` without a sort: a peaked row (its nucleus among the first or the second count of candidates)
    and a flat one (wider than the candidates, found by bisection) each draw only nucleus tokens, as often as
    their renormalised probability, and the same token alone as beside the other row."""
    v, n = 1000, 4000
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=v) * 4.0
    flat = rng.normal(size=v) * 0.3
    logits = jnp.asarray(np.stack([peaked, flat]), jnp.float32)
    draw = jax.jit(jax.vmap(lambda key, row, p: draws.draw(key[None], row[None], jnp.zeros((1,), jnp.int32),
                                                               p[None])[0], in_axes=(0, None, None)))
    keys = jax.random.split(jax.random.key(1), n)
    for row in range(2):
        probs = np.asarray(jax.nn.softmax(logits[row]))
        keep = _nucleus(probs, top_p) if top_p < 1.0 else np.arange(v)
        if top_p < 1.0:  # the peaked row's nucleus lies among the candidates, the flat row's does not
            assert (len(keep) > draws._NUCLEUS_CANDIDATES) == (row == 1)
            # ... among the first few candidates at 0.5, among more at 0.95 (each path is drawn from)
            assert row == 1 or (len(keep) <= draws._FIRST_CANDIDATES) == (top_p == 0.5)
        tokens = np.asarray(draw(keys, logits[row], jnp.float32(top_p)))
        assert set(tokens.tolist()) <= set(keep.tolist())
        expected = np.zeros(v)
        expected[keep] = probs[keep] / probs[keep].sum()
        frequency = np.bincount(tokens, minlength=v) / n
        assert np.abs(frequency - expected).max() < 4 * np.sqrt(expected.max() / n) + 1e-9
    # Batched: each row draws what it draws alone (the candidate path for one, the bisection for the other).
    batch_keys = jax.random.split(jax.random.key(2), 2)
    together = draws.draw(batch_keys, logits, jnp.zeros((2,), jnp.int32), jnp.full((2,), top_p))
    for row in range(2):
        alone = draws.draw(batch_keys[row:row + 1], logits[row:row + 1], jnp.zeros((1,), jnp.int32),
                               jnp.full((1,), top_p))
        assert int(together[row]) == int(alone[0])


def test_tokens_tied_at_the_nucleus_boundary_all_stay_past_the_first_candidates():
    """40 equally likely tokens and top_p 0.79: the nucleus is reached at the 32nd of the first 32 candidates,
    but the 8 tied tokens beyond them belong to it too, so every one of the 40 is drawn."""
    logits = np.full(1000, -np.inf, np.float32)
    logits[100:140] = 0.0
    n = 4000
    draw = jax.jit(jax.vmap(lambda key: draws.draw(key[None], jnp.asarray(logits)[None], jnp.zeros((1,), jnp.int32),
                                                   jnp.full((1,), 0.79, jnp.float32))[0]))
    tokens = np.asarray(draw(jax.random.split(jax.random.key(3), n)))
    assert draws._FIRST_CANDIDATES == 32 and set(tokens.tolist()) == set(range(100, 140))
