"""The MuseNet-class Sparse Transformer (Flax NNX): embeddings, pre-LayerNorm blocks, logits.

Shapes: B batch, T length (tokens), D d_model, N heads, H head_dim, F mlp_dim, V vocab_size,
Vp padded vocab (V rounded up to `vocab_multiple`), L layers.

Input embedding (each extra table switchable, all summed, MuseNet-style):
  token [Vp, D] (or factored, below) + learned position [T_max, D] + timing [timing_buckets, D] + chord [chord_size, D]
  + part [part_size, D] + countdown [countdown_size, D] + sounding [sounding_size, D].
Tables start as normal(init_std) for tokens and normal(init_std / 2) for the others (GPT-2's 0.02 /
0.01). Feature values (int32[B, T] from `data_pipeline.features`) are clipped into their table; timing (in
time units, 10 ms by default, unbounded) is first bucketed linearly:
  bucket = min(timing // timing_bucket_units, timing_buckets - 1),
so with the defaults (50 units = 0.5 s, 1024 buckets) the table covers the first 512 s of a piece and
every later token shares the last row.

Factored token embedding (`token_embedding='factored'`). Most of the vocabulary is note-ons, one id per
(instrument, velocity bin, pitch): 18k of the default vocabulary's 21.8k ids, most rarely seen in a small
corpus. Factored, each id is the sum of at most two rows of one part table [R, D]
(`data_pipeline.vocab.token_parts`): a note-on is key(instrument, pitch) + loudness(instrument, velocity), a
note-off key'(instrument, pitch), a drum hit drum_key(note) + drum_loudness(velocity), a wait, special,
instrument or label token one row of its own (R = 2733 for the default vocabulary). The output layer is tied
to the same table: logits[id] = h . row1(id) + h . row2(id), i.e. scores s = h @ table.T [B, T, R] gathered
twice into [B, T, V]. So the head costs 2 B T D R FLOPs instead of 2 B T D Vp (8x less by default), a rare
token learns from every token sharing its parts, and velocity is conditionally independent of pitch given
the instrument and the context (p(on) = p(instrument, pitch) p(velocity | instrument), up to normalisation).

Block (pre-LN, GPT-2 style): x += Drop(Attn(LN(x))); x += Drop(MLP(LN(x))), MLP = W2 gelu(W1 x).
Output projections of both sublayers start with std init_std / sqrt(2 L) so the residual stream's
variance stays O(1) at init whatever the depth. Parameters are `param_dtype` (fp32); matmuls run in
`dtype` (bf16 or fp32); the embedding sum, LayerNorm statistics and logits are fp32 (the head matmul
accumulates in fp32 via preferred_element_type, so a softmax / cross-entropy on the returned logits is
fp32).

Attention per layer. Every layer has a kind, from the config:
  'dense'   causal attention over all earlier tokens;
  'both'    the sparse pattern's A1 ∪ A2 in one softmax (Sparse Transformer "merged head");
  'local'   A1 only, 'summary' A2 only (alternated over layers: "interleaved");
  'heads'   the first N - N//2 heads attend with A1, the other N//2 with A2 ("multi-head").
`attention_combination` ('merged' | 'interleaved' | 'heads') and `dense_every` (every k-th layer
dense) generate the per-layer schedule; `attention_schedule` gives it explicitly (repeated cyclically).

Scanning a heterogeneous stack. `nnx.scan` needs one body for all iterations, so the schedule's
period p (smallest p with kind[i] == kind[i mod p]) becomes one scanned "period" module holding p
blocks, each with its own fixed kind; the scan runs floor(L / p) times and any remaining L mod p
layers run unscanned after it. We chose this over a per-layer `lax.switch` on the kind because the
structure stays static: no runtime conditional inside the loop, XLA (and a Pallas kernel) sees one
fixed attention call per position in the period, and remat policies apply per block as usual. The
cost is that the stacked parameter layout depends on p (`stack.blocks[j]` with leading axis
'layers' = floor(L / p), then `layers[k]` for the remainder); `scan_layers=False` puts all L blocks in
`layers`.

Rematerialisation (`remat_policy`): 'off' (store everything), 'nothing' (save nothing, recompute the
block), 'dots' (save weight matmuls without batch dims), 'names' (save only the values tagged with
`checkpoint_name` that are listed in `remat_names`: 'qkv_proj', 'attn_context', 'attn_out',
'mlp_hidden', 'mlp_out').

Embedding mixup (MuseNet's augmentation; the blog says only "mixup on the token embeddings"): in
training, each token's embedding is, with probability `mixup_prob`, replaced by
lam * E[x] + (1 - lam) * E[x'] with x' the token at a random position of the batch and
lam ~ Beta(alpha, alpha) folded to [0.5, 1] so the real token dominates. Targets are unchanged, so it is
input noise shaped like the data, and the trainer's loss needs no mixed targets.

Sharding: every parameter carries logical axis names (`out_sharding` metadata) and activations are
constrained with logical names; `musenet_jax.sharding` maps them onto a (data, fsdp, tensor) mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import vocab as vocab_lib
from musenet_jax import layers
from musenet_jax import sharding as sharding_lib
from musenet_jax.layers import Attention  # noqa: F401 (re-exported: the model's names)
from musenet_jax.model_config import (  # noqa: F401 (re-exported: the model's names)
    CHECKPOINT_NAMES,
    COMBINATIONS,
    DTYPES,
    EXECUTION_FIELDS,
    LAYER_KINDS,
    PALLAS_LOWERINGS,
    PATTERNS,
    REMAT_POLICIES,
    TOKEN_EMBEDDINGS,
    ModelConfig,
    architecture,
    token_parts,
    vocab_fields,
)


def _part_blocks(scores: jax.Array, layout: tuple[int, ...]) -> list[jax.Array]:
    """Part scores [..., R] split into `data_pipeline.vocab.part_blocks`' seven blocks."""
    return jnp.split(scores, np.cumsum(vocab_lib.part_blocks(layout))[:-1], axis=-1)


def factored_logits(scores: jax.Array, layout: tuple[int, ...]) -> jax.Array:
    """Logits [..., V] from part scores [..., R] (`token_parts` row order): logits[id] = the sum of the scores
    of its parts. Laid out block by block with slices and broadcast adds rather than two gathers over V: on
    XLA:CPU the gathers' backward (a scatter-add into [..., R]) made a training step 4x slower."""
    _, i, v, p = layout[:4]
    rows, waits, on_key, on_vel, off_key, drum_key, drum_vel = _part_blocks(scores, layout)
    lead = scores.shape[:-1]
    on = on_key.reshape(*lead, i, 1, p) + on_vel.reshape(*lead, i, v, 1)  # note-on ids: instrument, velocity, pitch
    drums = drum_vel[..., :, None] + drum_key[..., None, :]  # drum ids: velocity, note
    return jnp.concatenate([rows[..., :3], waits, on.reshape(*lead, i * v * p), off_key,
                            drums.reshape(*lead, v * vocab_lib.NUM_DRUM_NOTES), rows[..., 3:]], axis=-1)


def factored_logits_at(scores: jax.Array, layout: tuple[int, ...], ids: jax.Array) -> jax.Array:
    """float32[..., U]: the logits of int32[..., U] token ids from part scores [..., R], the same sums as
    `factored_logits` (a one-part id's second part is the always-zero row R), read at U ids instead of laid
    out over V."""
    first, second, _ = token_parts(layout)
    padded = jnp.concatenate([scores, jnp.zeros((*scores.shape[:-1], 1), scores.dtype)], axis=-1)
    return (jnp.take_along_axis(padded, jnp.take(jnp.asarray(first, jnp.int32), ids), axis=-1)
            + jnp.take_along_axis(padded, jnp.take(jnp.asarray(second, jnp.int32), ids), axis=-1))


def factored_log_z(scores: jax.Array, layout: tuple[int, ...]) -> jax.Array:
    """logsumexp over all V ids of `factored_logits(scores, layout)`, float32[...], in O(R) per position: the
    note-on block sums over instruments of LSE_pitch(key) + LSE_velocity(loudness), the drum block
    LSE_velocity + LSE_note, so the [..., V] logits are never formed."""
    _, i, v, p = layout[:4]
    rows, waits, on_key, on_vel, off_key, drum_key, drum_vel = _part_blocks(scores, layout)
    lead = scores.shape[:-1]
    lse = jax.nn.logsumexp
    on = lse(on_key.reshape(*lead, i, p), axis=-1) + lse(on_vel.reshape(*lead, i, v), axis=-1)  # [..., I]
    drums = lse(drum_key, axis=-1, keepdims=True) + lse(drum_vel, axis=-1, keepdims=True)
    return lse(jnp.concatenate([rows, waits, off_key, on, drums], axis=-1), axis=-1)


def _remat_policy(config: ModelConfig):
    if config.remat_policy == "nothing":
        return jax.checkpoint_policies.nothing_saveable
    if config.remat_policy == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if config.remat_policy == "names":
        return jax.checkpoint_policies.save_only_these_names(*config.remat_names)
    return None


def _run_block(block: layers.Block, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return block(x, key)


# --- The model. -------------------------------------------------------------------------------------------


class MuseNet(nnx.Module):
    """Token + feature embeddings, L pre-LN blocks, final LayerNorm, logits over the vocabulary.

    Build with `MuseNet(config, rngs=nnx.Rngs(params=seed))` (anywhere, no mesh needed) or, placed on a
    mesh, with `init_model(config, mesh, rng)`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, std, table_std = config.d_model, config.init_std, config.init_std / 2
        vp = config.padded_vocab_size
        if config.token_embedding == "factored":
            self.token_embed = None
            self.token_parts = layers.param(rngs, (token_parts(config.token_layout)[2], d), std, ("vocab", "embed"),
                                      config)
        else:
            self.token_embed = layers.param(rngs, (vp, d), std, ("vocab", "embed"), config)
            self.token_parts = None

        def table(enabled, rows):
            return layers.param(rngs, (rows, d), table_std, ("table", "embed"), config) if enabled else None

        self.position_embed = table(config.use_positional, config.max_len)
        self.timing_embed = table(config.use_timing, config.timing_buckets)
        self.chord_embed = table(config.use_chord, config.chord_size)
        self.part_embed = table(config.use_part, config.part_size)
        self.countdown_embed = table(config.use_countdown, config.countdown_size)
        self.sounding_embed = table(config.use_sounding, config.sounding_size)

        kinds = config.layer_kinds()
        period = config.layer_period()
        repeats = config.num_layers // period if config.scan_layers else 0
        if repeats:

            @nnx.split_rngs(splits=repeats)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(layer_rngs: nnx.Rngs) -> layers.Period:
                return layers.Period(config, kinds[:period], rngs=layer_rngs)

            self.stack = make_stack(rngs)
        else:
            self.stack = None
        self.num_stacked = repeats * period
        self.layers = nnx.List(
            [layers.Block(config, kinds[i], rngs=rngs) for i in range(self.num_stacked, len(kinds))]
        )
        self.final_norm = layers.LayerNorm(config, rngs=rngs)
        self.head = None if config.tie_embeddings else layers.param(rngs, (d, vp), std, ("embed", "vocab"), config)

    # --- Embedding. ----------------------------------------------------------------------------------

    def _feature(self, features, name: str, shape) -> jax.Array:
        if features is None or name not in features:
            raise ValueError(
                f"feature {name!r} is required by this model (model.use_{name}=True) but was not given"
            )
        value = jnp.asarray(features[name], jnp.int32)
        if value.shape != shape:
            raise ValueError(f"feature {name!r} has shape {value.shape}, tokens have {shape}")
        return value

    def embed(self, tokens: jax.Array, features=None, positions=None, mixup_key=None) -> jax.Array:
        """Summed input embedding, float32[B, T, D].

        Summed in float32 whatever the param dtype: six bfloat16 rows added in bfloat16 round the sum at
        every add (it doubled the RMS logit error of a bfloat16 export, and quadrupled its largest one).
        """
        cfg = self.config
        # Tables are gathered whole along D before the lookups, as FSDP gathers every weight before use:
        # rows indexed by batch-sharded ids cannot also keep D split over 'fsdp', which the batch uses
        # (XLA would fall back to replicating the [B, T, D] result, then re-splitting it).
        x = self._token_vectors(tokens)
        if mixup_key is not None and cfg.mixup_prob > 0:
            k_partner, k_lam, k_apply = jax.random.split(mixup_key, 3)
            flat = tokens.reshape(-1)
            partner = flat[jax.random.randint(k_partner, tokens.shape, 0, flat.shape[0])]
            lam = jax.random.beta(k_lam, cfg.mixup_alpha, cfg.mixup_alpha, tokens.shape + (1,))
            lam = jnp.maximum(lam, 1.0 - lam)
            lam = jnp.where(jax.random.bernoulli(k_apply, cfg.mixup_prob, tokens.shape + (1,)), lam, 1.0)
            x = lam * x + (1.0 - lam) * self._token_vectors(partner)
        if self.position_embed is not None:
            if positions is None:
                positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
            x = x + jnp.take(self._table(self.position_embed), positions, axis=0, mode="clip").astype(jnp.float32)
        lookups = (
            (self.timing_embed, "timing", lambda t: t // cfg.timing_bucket_units),
            (self.chord_embed, "chord", lambda c: c),
            (self.part_embed, "part", lambda p: p),
            (self.countdown_embed, "countdown", lambda c: c),
            (self.sounding_embed, "sounding", lambda c: c),
        )
        for param, name, to_row in lookups:
            if param is not None:
                rows = to_row(self._feature(features, name, tokens.shape))
                # mode="clip": values past the table (and negatives) share its last (first) row.
                x = x + jnp.take(self._table(param), rows, axis=0, mode="clip").astype(jnp.float32)
        return x

    def _token_vectors(self, tokens: jax.Array) -> jax.Array:
        """float32[*tokens.shape, D]: the token table's rows (or the sum of each id's part rows)."""
        cfg = self.config
        if self.token_parts is None:
            table = sharding_lib.constrain(self.token_embed[...], ("vocab", None), cfg.axis_rules)
            return jnp.take(table, tokens, axis=0, mode="clip").astype(jnp.float32)
        first, second, _ = token_parts(cfg.token_layout)
        table = self._part_table()
        tokens = jnp.clip(tokens, 0, cfg.vocab_size - 1)
        return (jnp.take(table, jnp.asarray(first)[tokens], axis=0).astype(jnp.float32)
                + jnp.take(table, jnp.asarray(second)[tokens], axis=0).astype(jnp.float32))

    def _part_table(self) -> jax.Array:
        """[R + 1, D]: the factored part table, whole along D, with the always-zero row R appended."""
        table = sharding_lib.constrain(self.token_parts[...], ("vocab", None), self.config.axis_rules)
        return jnp.concatenate([table, jnp.zeros((1, table.shape[1]), table.dtype)])

    def _logits(self, hidden: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """float32[..., V] next-token logits of final hidden states [..., D] (compute dtype, fp32 accumulation);
        with int32[..., U] `columns` (token ids), only those: float32[..., U], equal to the [..., V] logits there."""
        cfg = self.config
        dt = cfg.compute_dtype
        if self.token_parts is not None:
            scores = self._part_scores(hidden)
            if columns is None:
                return factored_logits(scores, cfg.token_layout)
            return factored_logits_at(scores, cfg.token_layout, columns)
        if columns is not None:
            return jnp.take_along_axis(self._logits(hidden), columns, axis=-1)
        # The tied table is contracted as [Vp, D] directly: a `.T` would copy the whole table (every decode step).
        if self.head is not None:
            logits = jnp.einsum("...d,dv->...v", hidden, self.head[...].astype(dt), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...d,vd->...v", hidden, self.token_embed[...].astype(dt),
                                preferred_element_type=jnp.float32)
        return logits[..., : cfg.vocab_size]

    def token_nll(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
        """-log p(target) in nats, float32[B, T], from final hidden states [B, T, D] (`return_hidden`).

        Equal to the cross-entropy of `__call__`'s logits; with the factored embedding it never forms the
        [B, T, V] logits (`factored_log_z`), so a jitted loss that uses only this lets XLA drop them.
        """
        cfg = self.config
        targets = jnp.asarray(targets, jnp.int32)
        if self.token_parts is None:
            logits = self._logits(hidden)
            target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jax.nn.logsumexp(logits, axis=-1) - target_logit
        scores = self._part_scores(hidden)
        targets = jnp.clip(targets, 0, cfg.vocab_size - 1)
        target_logit = factored_logits_at(scores, cfg.token_layout, targets[..., None])[..., 0]
        return factored_log_z(scores, cfg.token_layout) - target_logit

    def _part_scores(self, hidden: jax.Array) -> jax.Array:
        """float32[..., R]: final hidden states [..., D] against the factored part table (compute dtype, fp32
        accumulation)."""
        return jnp.einsum("...d,rd->...r", hidden, self.token_parts[...].astype(self.config.compute_dtype),
                          preferred_element_type=jnp.float32)

    def _table(self, param: nnx.Param) -> jax.Array:
        """A feature table [rows, D], whole along D (see `embed`)."""
        return sharding_lib.constrain(param[...], ("table", None), self.config.axis_rules)

    # --- Forward. ------------------------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        features: Mapping[str, jax.Array] | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
    ):
        """Next-token logits.

        Args:
          tokens: int32[B, T] token ids, T <= max_len.
          features: dict of int32[B, T]: 'timing' (time units), 'chord', 'part', 'countdown', 'sounding'; only the
            enabled embeddings' entries are read.
          positions: int32[B, T] or [1, T] positions for the positional table (default 0..T-1).
          deterministic: False in training (dropout, mixup); then `rng` (a PRNG key) is needed if
            dropout_rate or mixup_prob is non-zero.
          return_hidden: also return the final-layers.LayerNorm output.
        Returns:
          logits float32[B, T, V]; with return_hidden, (logits, hidden [B, T, D] in compute dtype).
        """
        cfg = self.config
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        if positions is None and tokens.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_len={cfg.max_len}")
        stochastic = not deterministic and (cfg.dropout_rate > 0 or cfg.mixup_prob > 0)
        if stochastic and rng is None:
            raise ValueError("deterministic=False with dropout or mixup needs an rng key")
        if stochastic:
            k_mix, k_embed, k_layers = jax.random.split(rng, 3)
            layer_keys = jax.random.split(k_layers, cfg.num_layers)
        else:
            k_mix = k_embed = layer_keys = None

        x = self.embed(tokens, features, positions, k_mix)
        x = layers.dropout(x, cfg.dropout_rate, k_embed).astype(cfg.compute_dtype)
        x = sharding_lib.constrain(x, layers.ACT, cfg.axis_rules)

        policy = _remat_policy(cfg)
        if self.stack is not None:
            x = self._run_stack(x, None if layer_keys is None else layer_keys[: self.num_stacked], policy)
        run = _run_block if cfg.remat_policy == "off" else nnx.remat(_run_block, policy=policy)
        for i, block in enumerate(self.layers):
            x = run(block, x, None if layer_keys is None else layer_keys[self.num_stacked + i])

        hidden = self.final_norm(x)
        logits = self._logits(hidden)
        logits = sharding_lib.constrain(logits, ("batch", "length", "vocab"), cfg.axis_rules)
        return (logits, hidden) if return_hidden else logits

    def _run_stack(self, x: jax.Array, keys: jax.Array | None, policy) -> jax.Array:
        """Scans the stacked periods over x; keys: [L_stacked] dropout keys or None."""
        cfg = self.config
        period = len(self.stack.blocks)
        if keys is not None:
            keys = keys.reshape(-1, period)  # [repeats, p]: row r holds the keys of layers r*p .. r*p+p-1
        # Inside scan, CSE across iterations is already impossible, so prevent_cse only costs speed.
        run = (
            _run_block
            if cfg.remat_policy == "off"
            else nnx.remat(_run_block, policy=policy, prevent_cse=False)
        )

        @nnx.scan(
            in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def body(x, period_module: layers.Period, period_keys):
            for j, block in enumerate(period_module.blocks):
                x = run(block, x, None if period_keys is None else period_keys[j])
            return x

        return body(x, self.stack, keys)

    # --- Decoding (one token at a time, with a KV cache). -------------------------------------------

    def init_cache(self, batch: int) -> dict:
        """Empty decoding cache for `batch` rows and up to max_len positions (see `musenet_jax.decoding`).

        {'stack': per block of the scanned period, its groups' caches with a leading [repeats] axis;
         'layers': per unscanned layer, its groups' caches}. Every leaf is [B, N_group, S_store, H].
        """
        max_len = self.config.max_len
        stack = ()
        if self.stack is not None:
            repeats = self.num_stacked // len(self.stack.blocks)
            stack = tuple(
                jax.tree.map(lambda a: jnp.broadcast_to(a, (repeats, *a.shape)),
                             block.attention.init_cache(batch, max_len))
                for block in self.stack.blocks
            )
        layers = tuple(block.attention.init_cache(batch, max_len) for block in self.layers)
        return {"stack": stack, "layers": layers}

    def decode_step(self, tokens: jax.Array, features: Mapping[str, jax.Array] | None, position: jax.Array,
                    cache: dict, columns: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Next-token logits for one new token per row, reading and extending the cache.

        Args:
          tokens: int32[B], the token at `position` in every row.
          features: dict of int32[B] (the enabled embeddings' features of those tokens), as in __call__.
          position: int32 scalar, the tokens' position (0-based, < max_len; all rows share it).
          cache: from `init_cache(B)` or the previous step, holding positions 0..position-1.
          columns: int32[B, U] token ids: return only the logits of these (a sampler that may draw a few
            thousand of the V ids skips forming the rest); None: all V.
        Returns:
          (logits float32[B, V] (or [B, U] at `columns`), the cache now holding position too). Equal to
          `__call__`'s logits at `position` for the same prefix (deterministic mode). Static shapes: usable in
          jit / lax loops.
        """
        cfg = self.config
        position = jnp.asarray(position, jnp.int32)
        tokens = jnp.asarray(tokens, jnp.int32)[:, None]
        features = None if features is None else {k: jnp.asarray(v)[:, None] for k, v in features.items()}
        x = self.embed(tokens, features, jnp.reshape(position, (1, 1))).astype(cfg.compute_dtype)
        stack_cache = cache["stack"]
        if self.stack is not None:
            # A fori_loop over the repeats that carries the whole stacked cache; each block reads and writes
            # its row r in place (`index`). A scan with the cache as xs / ys, or slicing rows out and back,
            # would copy every layer's cache each step, which costs more than the step itself. (And NNX
            # transforms refuse modules created at an outer trace level, where decode_step runs inside the
            # caller's lax loops, so this is plain lax on the split state.)
            period_def, period_params = nnx.split(self.stack)
            repeats = self.num_stacked // len(self.stack.blocks)

            def body(r, carry):
                x, stack_cache = carry
                row = functools.partial(jax.lax.dynamic_index_in_dim, index=r, keepdims=False)
                period_module = nnx.merge(period_def, jax.tree.map(row, period_params))
                new = []
                for block, block_cache in zip(period_module.blocks, stack_cache, strict=True):
                    x, c = block.decode_step(x, block_cache, position, cfg.max_len, r)
                    new.append(c)
                return x, tuple(new)

            x, stack_cache = jax.lax.fori_loop(0, repeats, body, (x, stack_cache))
        layer_caches = []
        for block, block_cache in zip(self.layers, cache["layers"], strict=True):
            x, c = block.decode_step(x, block_cache, position, cfg.max_len)
            layer_caches.append(c)
        logits = self._logits(self.final_norm(x)[:, 0], columns)
        return logits, {"stack": stack_cache, "layers": tuple(layer_caches)}


# --- Creation on a mesh. ----------------------------------------------------------------------------------


def _as_key(rng) -> jax.Array:
    return jax.random.key(rng) if isinstance(rng, int) else rng


def abstract_model(config: ModelConfig, mesh: jax.sharding.Mesh | None = None):
    """(graphdef, abstract state) without allocating: ShapeDtypeStructs, with shardings when mesh is given."""
    abstract = nnx.eval_shape(lambda: MuseNet(config, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        state = sharding_lib.abstract_with_shardings(state, mesh, config.axis_rules)
    return graphdef, state


def init_model(config: ModelConfig, mesh: jax.sharding.Mesh, rng: int | jax.Array = 0) -> MuseNet:
    """A freshly initialised model whose parameters are created already sharded on `mesh`.

    eval_shape gives the state's structure, the rules turn its logical axes into NamedShardings, and
    a jitted init with those out_shardings materialises each shard on its device (never a full copy
    on one device first, which matters when the model does not fit one device).
    """
    graphdef, abstract_state = abstract_model(config, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)

    @functools.partial(jax.jit, out_shardings=shardings)
    def create(key):
        return nnx.state(MuseNet(config, rngs=nnx.Rngs(params=key)))

    with jax.set_mesh(mesh):
        state = create(_as_key(rng))
    return nnx.merge(graphdef, state)


def _per_layer_params(config: ModelConfig, params: Mapping) -> list:
    """The L per-layer parameter dicts of a pure-dict state laid out as `config` lays it out."""
    period = config.layer_period()
    num_stacked = (config.num_layers // period) * period if config.scan_layers else 0
    layers = []
    for i in range(config.num_layers):
        if i < num_stacked:
            r, j = divmod(i, period)
            layers.append(jax.tree.map(lambda a, r=r: a[r], params["stack"]["blocks"][j]))
        else:
            layers.append(params["layers"][i - num_stacked])  # (an empty List has no key at all)
    return layers


def convert_layout(params: Mapping, src: ModelConfig, dst: ModelConfig) -> dict:
    """Re-lays a pure-dict state (`nnx.to_pure_dict`) from `src`'s layer layout to `dst`'s.

    For moving weights between scanned / unrolled models (or another period split of the same
    schedule); load the result with `nnx.replace_by_pure_dict(nnx.state(dst_model), out)`.
    """
    if src.layer_kinds() != dst.layer_kinds():
        raise ValueError("convert_layout needs the same per-layer attention kinds in both configs")
    layers = _per_layer_params(src, params)
    out = {k: v for k, v in params.items() if k not in ("stack", "layers")}
    period = dst.layer_period()
    repeats = dst.num_layers // period if dst.scan_layers else 0
    if repeats:
        out["stack"] = {
            "blocks": {
                j: jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[r * period + j] for r in range(repeats)])
                for j in range(period)
            }
        }
    tail = layers[repeats * period :]
    if tail:  # nnx.to_pure_dict leaves out an empty List, so mirror that.
        out["layers"] = dict(enumerate(tail))
    return out


def count_params(tree) -> int:
    """Number of parameter scalars in a model, State or abstract State (nnx.Param only)."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
