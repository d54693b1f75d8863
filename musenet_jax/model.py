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

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from data_pipeline import vocab as vocab_lib
from musenet_jax import attention as attention_lib
from musenet_jax import decoding
from musenet_jax import sharding as sharding_lib
from pallas_kernels import block_sparse_attention

PATTERNS = ("dense", "strided", "fixed")
TOKEN_EMBEDDINGS = ("table", "factored")
COMBINATIONS = ("merged", "interleaved", "heads")
LAYER_KINDS = ("dense", "both", "local", "summary", "heads")
REMAT_POLICIES = ("off", "nothing", "dots", "names")
# Names a 'names' remat policy may save; the last two are the Pallas kernel's residuals (impl='pallas').
CHECKPOINT_NAMES = ("qkv_proj", "attn_context", "attn_out", "mlp_hidden", "mlp_out",
                    block_sparse_attention.OUT_NAME, block_sparse_attention.LSE_NAME)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PALLAS_LOWERINGS = ("auto", *block_sparse_attention.LOWERINGS)
# Fields that choose how the model runs, not what it computes or which parameters it has: a checkpoint
# resumes under other values of these (e.g. trained with 'xla' on CPU, continued with 'pallas' on a TPU).
EXECUTION_FIELDS = ("attention_impl", "pallas_lowering", "remat_policy", "remat_names", "axis_rules")


@functools.lru_cache(maxsize=8)
def token_parts(layout: tuple[int, ...]):
    """`data_pipeline.vocab.token_parts` of a layout, computed once per layout."""
    return vocab_lib.token_parts(tuple(layout))


def _part_blocks(scores: jax.Array, layout: tuple[int, ...]) -> list[jax.Array]:
    """Part scores [..., R] split into `data_pipeline.vocab.part_blocks`' seven blocks."""
    return jnp.split(scores, np.cumsum(vocab_lib.part_blocks(layout))[:-1], axis=-1)


def factored_logits(scores: jax.Array, layout: tuple[int, ...]) -> jax.Array:
    """Logits [..., V] from part scores [..., R] (`token_parts` row order): logits[id] = the sum of the scores
    of its parts. Laid out block by block with slices and broadcast adds rather than two gathers over V: on
    XLA:CPU the gathers' backward (a scatter-add into [..., R]) made a training step 4x slower."""
    _, i, v, p, _ = layout
    rows, waits, on_key, on_vel, off_key, drum_key, drum_vel = _part_blocks(scores, layout)
    lead = scores.shape[:-1]
    on = on_key.reshape(*lead, i, 1, p) + on_vel.reshape(*lead, i, v, 1)  # note-on ids: instrument, velocity, pitch
    drums = drum_vel[..., :, None] + drum_key[..., None, :]  # drum ids: velocity, note
    return jnp.concatenate([rows[..., :3], waits, on.reshape(*lead, i * v * p), off_key,
                            drums.reshape(*lead, v * vocab_lib.NUM_DRUM_NOTES), rows[..., 3:]], axis=-1)


def factored_log_z(scores: jax.Array, layout: tuple[int, ...]) -> jax.Array:
    """logsumexp over all V ids of `factored_logits(scores, layout)`, float32[...], in O(R) per position: the
    note-on block sums over instruments of LSE_pitch(key) + LSE_velocity(loudness), the drum block
    LSE_velocity + LSE_note, so the [..., V] logits are never formed."""
    _, i, v, p, _ = layout
    rows, waits, on_key, on_vel, off_key, drum_key, drum_vel = _part_blocks(scores, layout)
    lead = scores.shape[:-1]
    lse = jax.nn.logsumexp
    on = lse(on_key.reshape(*lead, i, p), axis=-1) + lse(on_vel.reshape(*lead, i, v), axis=-1)  # [..., I]
    drums = lse(drum_key, axis=-1, keepdims=True) + lse(drum_vel, axis=-1, keepdims=True)
    return lse(jnp.concatenate([rows, waits, off_key, on, drums], axis=-1), axis=-1)


def vocab_fields(vocab) -> dict[str, Any]:
    """The model config fields that come from the vocabulary: `ModelConfig.from_config_dict(config.model,
    **vocab_fields(vocab))`."""
    return {"vocab_size": vocab.size, "token_layout": tuple(vocab.layout())}


def architecture(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config section (mapping) without its `EXECUTION_FIELDS`: what must match to resume."""
    return {k: v for k, v in model_config.items() if k not in EXECUTION_FIELDS}

_ACT = ("batch", "length", "embed")
_ACT_HEADS = ("batch", "length", "heads", "kv")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model depends on (and nothing else).

    Attributes:
      vocab_size: V, token ids 0..V-1 (from the dataset's vocab.json).
      d_model, num_heads, head_dim, mlp_dim, num_layers: D, N, H, F, L.
      max_len: T_max, rows of the learned positional table (longest sequence, in tokens).
      vocab_multiple: embedding / head rows are padded to a multiple of this (e.g. 128) so matmuls
        tile and the vocab axis shards; the padded logits are dropped before returning.
      tie_embeddings: logits use the token embedding table (GPT-2 style) instead of a separate head.
      token_embedding: 'table' (one row per id) or 'factored' (rows shared by the parts of each id, see the
        module doc; always tied).
      token_layout: (W, I, V, P, L) of the vocabulary (`Vocab.layout()`), needed by 'factored'.
      use_bias: biases on the q/k/v/output and MLP projections.
      use_positional, use_timing, use_chord, use_part, use_countdown, use_sounding: which extra embeddings
        to add (sounding is off by default so that exports written before it load unchanged).
      timing_buckets, timing_bucket_units: timing table rows and time units per row (see module doc).
      chord_size, part_size, countdown_size, sounding_size: rows of those tables (values are clipped into
        them).
      dropout_rate: on the summed embedding and each sublayer's output, in training only.
      mixup_prob, mixup_alpha: token embedding mixup (see module doc); 0 disables.
      dtype: compute dtype name ('bfloat16' or 'float32'); param_dtype: parameter dtype name.
      init_std: std of the normal init of embeddings and input projections.
      layer_norm_eps: LayerNorm epsilon.
      attention_pattern: 'dense' | 'strided' | 'fixed'.
      attention_stride, attention_summary: l and c in tokens (ignored where the pattern has none).
      attention_combination: 'merged' | 'interleaved' | 'heads'.
      dense_every: k > 0 makes layers k-1, 2k-1, ... dense (0: none).
      attention_schedule: explicit per-layer kinds (see module doc), repeated over the layers;
        overrides attention_combination and dense_every.
      attention_impl: 'reference' | 'xla' | 'cpu' | 'pallas' (see `musenet_jax.attention.attend`).
      pallas_lowering: the kernels of the 'pallas' impl: 'auto' (Mosaic TPU on TPU; on a GPU Mosaic GPU
        where it runs, i.e. Hopper, 16-bit, head_dim a multiple of 64, else Triton) or one of
        `pallas_kernels.block_sparse_attention.LOWERINGS` ('tpu', 'gpu' = Triton, 'mosaic_gpu',
        'mosaic_gpu_ws' = warp-specialized).
      scan_layers: scan over stacked layers (fast compiles) or unroll them.
      remat_policy: 'off' | 'nothing' | 'dots' | 'names'; remat_names: saved names for 'names'.
      axis_rules: logical axis -> mesh axes rules (`musenet_jax.sharding.DEFAULT_RULES`).
    """

    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 2048
    num_layers: int = 6
    max_len: int = 1024
    vocab_multiple: int = 1
    tie_embeddings: bool = True
    token_embedding: str = "table"
    token_layout: tuple[int, ...] = ()
    use_bias: bool = True
    use_positional: bool = True
    use_timing: bool = True
    timing_buckets: int = 1024
    timing_bucket_units: int = 50
    use_chord: bool = True
    chord_size: int = 64
    use_part: bool = True
    part_size: int = 128
    use_countdown: bool = True
    countdown_size: int = 128
    use_sounding: bool = False
    sounding_size: int = 32
    dropout_rate: float = 0.0
    mixup_prob: float = 0.0
    mixup_alpha: float = 0.4
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5
    attention_pattern: str = "dense"
    attention_stride: int | None = None
    attention_summary: int | None = None
    attention_combination: str = "merged"
    dense_every: int = 0
    attention_schedule: tuple[str, ...] = ()
    attention_impl: str = "xla"
    pallas_lowering: str = "auto"
    scan_layers: bool = True
    remat_policy: str = "nothing"
    remat_names: tuple[str, ...] = ("attn_context",)
    axis_rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "num_heads",
            "head_dim",
            "mlp_dim",
            "num_layers",
            "max_len",
            "vocab_multiple",
            "timing_buckets",
            "timing_bucket_units",
            "chord_size",
            "part_size",
            "countdown_size",
            "sounding_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0.0 <= self.mixup_prob <= 1.0:
            raise ValueError(f"model.mixup_prob must be in [0, 1], got {self.mixup_prob}")
        if self.mixup_prob > 0 and self.mixup_alpha <= 0:
            raise ValueError(f"model.mixup_alpha must be > 0, got {self.mixup_alpha}")
        if self.token_embedding not in TOKEN_EMBEDDINGS:
            raise ValueError(f"model.token_embedding must be one of {TOKEN_EMBEDDINGS}, got {self.token_embedding!r}")
        if self.token_embedding == "factored":
            if len(self.token_layout) != 5:
                raise ValueError("model.token_embedding='factored' needs model.token_layout = the vocabulary's "
                                 f"(W, I, V, P, L) (Vocab.layout()), got {self.token_layout!r}")
            if len(token_parts(self.token_layout)[0]) != self.vocab_size:
                raise ValueError(f"model.token_layout {tuple(self.token_layout)} gives "
                                 f"{len(token_parts(self.token_layout)[0])} ids, not vocab_size={self.vocab_size}")
            if not self.tie_embeddings:
                raise ValueError("model.token_embedding='factored' is always tied: set model.tie_embeddings=True")
        if self.attention_pattern not in PATTERNS:
            raise ValueError(
                f"model.attention_pattern must be one of {PATTERNS}, got {self.attention_pattern!r}"
            )
        if self.attention_pattern in ("strided", "fixed") and not self.attention_stride:
            raise ValueError(f"model.attention_pattern={self.attention_pattern} needs model.attention_stride "
                             "(l, in tokens; about sqrt(max_len))")
        if self.attention_pattern == "fixed" and not self.attention_summary:
            raise ValueError("model.attention_pattern=fixed needs model.attention_summary (c, in tokens, "
                             f"1..attention_stride={self.attention_stride})")
        if self.attention_combination not in COMBINATIONS:
            raise ValueError(
                f"model.attention_combination must be one of {COMBINATIONS}, "
                f"got {self.attention_combination!r}"
            )
        if self.attention_impl not in attention_lib.IMPLS:
            raise ValueError(
                f"model.attention_impl must be one of {attention_lib.IMPLS}, got {self.attention_impl!r}"
            )
        if self.pallas_lowering not in PALLAS_LOWERINGS:
            raise ValueError(
                f"model.pallas_lowering must be one of {PALLAS_LOWERINGS}, got {self.pallas_lowering!r}"
            )
        if self.dense_every < 0:
            raise ValueError(f"model.dense_every must be >= 0, got {self.dense_every}")
        bad = [k for k in self.attention_schedule if k not in LAYER_KINDS]
        if bad:
            raise ValueError(f"model.attention_schedule entries must be in {LAYER_KINDS}, got {bad}")
        if self.attention_schedule and self.dense_every:
            raise ValueError(
                "model.attention_schedule and model.dense_every are exclusive; put 'dense' in the schedule"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        bad = [n for n in self.remat_names if n not in CHECKPOINT_NAMES]
        if bad:
            raise ValueError(f"model.remat_names must be in {CHECKPOINT_NAMES}, got {bad}")
        if "heads" in self.layer_kinds() and self.num_heads < 2:
            raise ValueError("attention_combination 'heads' needs num_heads >= 2")
        for kind in set(self.layer_kinds()):
            self.attention_groups(kind)  # Raises ValueError on a bad stride / summary.

    # --- Derived values. -----------------------------------------------------------------------------

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def padded_vocab_size(self) -> int:
        """Vp: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def layer_kinds(self) -> tuple[str, ...]:
        """The attention kind of each of the L layers (see module doc)."""
        if self.attention_pattern == "dense":  # No sparse parts to alternate or split.
            return ("dense",) * self.num_layers
        if self.attention_schedule:
            s = self.attention_schedule
            return tuple(s[i % len(s)] for i in range(self.num_layers))
        kinds = []
        for i in range(self.num_layers):
            if self.dense_every and i % self.dense_every == self.dense_every - 1:
                kinds.append("dense")
            elif self.attention_combination == "merged":
                kinds.append("both")
            elif self.attention_combination == "interleaved":
                kinds.append("local" if i % 2 == 0 else "summary")
            else:
                kinds.append("heads")
        return tuple(kinds)

    def layer_period(self) -> int:
        """Smallest p with kind[i] == kind[i mod p] for all layers: the scanned period."""
        kinds = self.layer_kinds()
        return next(
            p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds))
        )

    def attention_groups(self, kind: str) -> tuple[tuple[attention_lib.AttentionSpec, int], ...]:
        """(spec, number of heads) per head group of a layer of this kind, covering the N heads in order."""
        if kind == "dense" or self.attention_pattern == "dense":
            return ((attention_lib.AttentionSpec("dense"), self.num_heads),)
        stride = self.attention_stride
        summary = self.attention_summary if self.attention_pattern == "fixed" else None

        def spec(part):
            return attention_lib.AttentionSpec(self.attention_pattern, stride, summary, part)

        if kind == "heads":
            n_summary = self.num_heads // 2
            return ((spec("local"), self.num_heads - n_summary), (spec("summary"), n_summary))
        return ((spec(kind), self.num_heads),)

    # --- Conversion. ---------------------------------------------------------------------------------

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
        """From a `config.model` section (ml_collections ConfigDict or mapping) plus overrides.

        Typical use: `ModelConfig.from_config_dict(config.model, vocab_size=vocab.size)`.
        Unknown keys raise ValueError (a typo in a config must not be silently ignored).
        """
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        for name in ("attention_schedule", "remat_names", "token_layout"):
            if name in values:
                values[name] = tuple(values[name])
        if "axis_rules" in values:
            values["axis_rules"] = tuple(
                (str(n), tuple(t) if isinstance(t, list | tuple) else t) for n, t in values["axis_rules"]
            )
        for name in ("attention_stride", "attention_summary"):
            if values.get(name) == 0:
                values[name] = None  # 0 reads as "not set", so configs can keep plain ints.
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; `ModelConfig.from_config_dict(d)` inverts it."""
        return dataclasses.asdict(self)


# --- Building blocks. -------------------------------------------------------------------------------------


def _param(
    rngs: nnx.Rngs, shape, std: float | None, axes, config: ModelConfig, fill: float = 0.0
) -> nnx.Param:
    """A parameter with logical axis names; normal(std) init, or constant `fill` when std is None.

    eager_sharding=False: the model can be built anywhere (no mesh needed); `init_model` places
    parameters on the mesh through jit's out_shardings instead.
    """
    dtype = config.params_dtype
    if std is None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, eager_sharding=False, out_sharding=tuple(axes))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when key is None (deterministic) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over D with fp32 statistics; [..., D] -> [..., D] in the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (config.d_model,), None, ("embed",), config, fill=1.0)
        self.bias = _param(rngs, (config.d_model,), None, ("embed",), config)
        self.eps = config.layer_norm_eps
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head causal (sparse) self-attention: [B, T, D] -> [B, T, D].

    Heads are split into `groups` (spec, count); each group calls `attend` with its own spec.
    """

    def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        d, n, h = config.d_model, config.num_heads, config.head_dim
        out_std = config.init_std / math.sqrt(2 * config.num_layers)
        self.query = _param(rngs, (d, n, h), config.init_std, ("embed", "heads", "kv"), config)
        self.key = _param(rngs, (d, n, h), config.init_std, ("embed", "heads", "kv"), config)
        self.value = _param(rngs, (d, n, h), config.init_std, ("embed", "heads", "kv"), config)
        self.out = _param(rngs, (n, h, d), out_std, ("heads", "kv", "embed"), config)
        if config.use_bias:
            self.query_bias = _param(rngs, (n, h), None, ("heads", "kv"), config)
            self.key_bias = _param(rngs, (n, h), None, ("heads", "kv"), config)
            self.value_bias = _param(rngs, (n, h), None, ("heads", "kv"), config)
            self.out_bias = _param(rngs, (d,), None, ("embed",), config)
        else:
            self.query_bias = self.key_bias = self.value_bias = self.out_bias = None
        self.kind = kind
        self.groups = config.attention_groups(kind)
        self.impl = config.attention_impl
        self.lowering = None if config.pallas_lowering == "auto" else config.pallas_lowering
        self.dtype = config.compute_dtype
        self.rules = config.axis_rules

    def _project(self, x, kernel, bias):
        y = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(self.dtype))
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return sharding_lib.constrain(checkpoint_name(y, "qkv_proj"), _ACT_HEADS, self.rules)

    def _attend(self, q, k, v, spec: attention_lib.AttentionSpec) -> jax.Array:
        """[B, T, N, H] x 3 -> [B, T, N, H]. The 'cpu' and 'pallas' kernels are opaque custom calls that
        XLA cannot partition (it would gather their inputs onto every device), so under a mesh every
        device runs them on its own batch and head shard (shard_map); the sequence axis is never split
        for them."""
        attend = functools.partial(attention_lib.attend, spec=spec, impl=self.impl, lowering=self.lowering)
        mesh = jax.sharding.get_abstract_mesh()
        if self.impl not in ("cpu", "pallas") or mesh.empty:
            return attend(q, k, v)
        pspec = sharding_lib.logical_to_spec(
            ("batch", None, "heads", None), self.rules, shape=q.shape, mesh_shape=dict(mesh.shape)
        )
        return jax.shard_map(attend, mesh=mesh, in_specs=(pspec,) * 3, out_specs=pspec)(q, k, v)

    def __call__(self, x: jax.Array) -> jax.Array:
        q = self._project(x, self.query, self.query_bias)
        k = self._project(x, self.key, self.key_bias)
        v = self._project(x, self.value, self.value_bias)
        outs, start = [], 0
        for spec, count in self.groups:
            sl = slice(start, start + count)
            outs.append(self._attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], spec))
            start += count
        ctx = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
        ctx = sharding_lib.constrain(checkpoint_name(ctx, "attn_context"), _ACT_HEADS, self.rules)
        y = jnp.einsum("btnh,nhd->btd", ctx, self.out[...].astype(self.dtype))
        if self.out_bias is not None:
            y = y + self.out_bias[...].astype(self.dtype)
        return checkpoint_name(y, "attn_out")

    def init_cache(self, batch: int, max_len: int) -> tuple:
        """Empty decoding cache: one `decoding.init_cache` dict per head group, in group order."""
        h = self.query.shape[-1]
        return tuple(
            decoding.init_cache(spec, max_len, batch, count, h, self.dtype) for spec, count in self.groups
        )

    def decode_step(self, x: jax.Array, cache: tuple, position: jax.Array, max_len: int, index=None):
        """One token: x [B, 1, D] at `position` (int32 scalar) -> ([B, 1, D], new cache).

        index: the layer row of caches stacked over scanned layers (see `decoding.attend_step`)."""
        q = self._project(x, self.query, self.query_bias)[:, 0]  # [B, N, H]
        k = self._project(x, self.key, self.key_bias)[:, 0]
        v = self._project(x, self.value, self.value_bias)[:, 0]
        outs, new_cache, start = [], [], 0
        for (spec, count), group_cache in zip(self.groups, cache, strict=True):
            sl = slice(start, start + count)
            out, c = decoding.attend_step(q[:, sl], k[:, sl], v[:, sl], group_cache, spec, position, max_len, index)
            outs.append(out)
            new_cache.append(c)
            start += count
        ctx = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # [B, N, H]
        y = jnp.einsum("bnh,nhd->bd", ctx, self.out[...].astype(self.dtype))[:, None]
        if self.out_bias is not None:
            y = y + self.out_bias[...].astype(self.dtype)
        return y, tuple(new_cache)


class Mlp(nnx.Module):
    """Position-wise GELU MLP: [B, T, D] -> [B, T, F] -> [B, T, D]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.mlp_dim
        out_std = config.init_std / math.sqrt(2 * config.num_layers)
        self.wi = _param(rngs, (d, f), config.init_std, ("embed", "mlp"), config)
        self.wo = _param(rngs, (f, d), out_std, ("mlp", "embed"), config)
        if config.use_bias:
            self.bi = _param(rngs, (f,), None, ("mlp",), config)
            self.bo = _param(rngs, (d,), None, ("embed",), config)
        else:
            self.bi = self.bo = None
        self.dtype = config.compute_dtype
        self.rules = config.axis_rules

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("btd,df->btf", x, self.wi[...].astype(self.dtype))
        if self.bi is not None:
            h = h + self.bi[...].astype(self.dtype)
        h = jax.nn.gelu(h)
        h = sharding_lib.constrain(checkpoint_name(h, "mlp_hidden"), ("batch", "length", "mlp"), self.rules)
        y = jnp.einsum("btf,fd->btd", h, self.wo[...].astype(self.dtype))
        if self.bo is not None:
            y = y + self.bo[...].astype(self.dtype)
        return checkpoint_name(y, "mlp_out")


class Block(nnx.Module):
    """Pre-LN residual block with attention of one fixed kind: [B, T, D] -> [B, T, D]."""

    def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.attention_norm = LayerNorm(config, rngs=rngs)
        self.attention = Attention(config, kind, rngs=rngs)
        self.mlp_norm = LayerNorm(config, rngs=rngs)
        self.mlp = Mlp(config, rngs=rngs)
        self.dropout_rate = config.dropout_rate
        self.rules = config.axis_rules

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """key: dropout key for this layer, None when deterministic."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x = x + _dropout(self.attention(self.attention_norm(x)), self.dropout_rate, keys[0])
        x = x + _dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[1])
        return sharding_lib.constrain(x, _ACT, self.rules)

    def decode_step(self, x: jax.Array, cache: tuple, position: jax.Array, max_len: int, index=None):
        """One token, deterministic: x [B, 1, D] -> ([B, 1, D], new cache); index as in Attention."""
        y, cache = self.attention.decode_step(self.attention_norm(x), cache, position, max_len, index)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class Period(nnx.Module):
    """One period of the layer schedule: p blocks of (possibly) different attention kinds, run in order."""

    def __init__(self, config: ModelConfig, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(config, kind, rngs=rngs) for kind in kinds])


def _remat_policy(config: ModelConfig):
    if config.remat_policy == "nothing":
        return jax.checkpoint_policies.nothing_saveable
    if config.remat_policy == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if config.remat_policy == "names":
        return jax.checkpoint_policies.save_only_these_names(*config.remat_names)
    return None


def _run_block(block: Block, x: jax.Array, key: jax.Array | None) -> jax.Array:
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
            self.token_parts = _param(rngs, (token_parts(config.token_layout)[2], d), std, ("vocab", "embed"),
                                      config)
        else:
            self.token_embed = _param(rngs, (vp, d), std, ("vocab", "embed"), config)
            self.token_parts = None

        def table(enabled, rows):
            return _param(rngs, (rows, d), table_std, ("table", "embed"), config) if enabled else None

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
            def make_stack(layer_rngs: nnx.Rngs) -> Period:
                return Period(config, kinds[:period], rngs=layer_rngs)

            self.stack = make_stack(rngs)
        else:
            self.stack = None
        self.num_stacked = repeats * period
        self.layers = nnx.List(
            [Block(config, kinds[i], rngs=rngs) for i in range(self.num_stacked, len(kinds))]
        )
        self.final_norm = LayerNorm(config, rngs=rngs)
        self.head = None if config.tie_embeddings else _param(rngs, (d, vp), std, ("embed", "vocab"), config)

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

    def _logits(self, hidden: jax.Array) -> jax.Array:
        """float32[..., V] next-token logits of final hidden states [..., D] (compute dtype, fp32 accumulation)."""
        cfg = self.config
        dt = cfg.compute_dtype
        if self.token_parts is not None:
            scores = jnp.einsum("...d,rd->...r", hidden, self.token_parts[...].astype(dt),
                                preferred_element_type=jnp.float32)
            return factored_logits(scores, cfg.token_layout)
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
        first, second, _ = token_parts(cfg.token_layout)
        scores = jnp.einsum("...d,rd->...r", hidden, self.token_parts[...].astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
        padded = jnp.concatenate([scores, jnp.zeros((*scores.shape[:-1], 1), scores.dtype)], axis=-1)
        targets = jnp.clip(targets, 0, cfg.vocab_size - 1)
        target_logit = (jnp.take_along_axis(padded, jnp.asarray(first)[targets][..., None], axis=-1)[..., 0]
                        + jnp.take_along_axis(padded, jnp.asarray(second)[targets][..., None], axis=-1)[..., 0])
        return factored_log_z(scores, cfg.token_layout) - target_logit

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
          return_hidden: also return the final-LayerNorm output.
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
        x = _dropout(x, cfg.dropout_rate, k_embed).astype(cfg.compute_dtype)
        x = sharding_lib.constrain(x, _ACT, cfg.axis_rules)

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
        def body(x, period_module: Period, period_keys):
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
                    cache: dict) -> tuple[jax.Array, dict]:
        """Next-token logits for one new token per row, reading and extending the cache.

        Args:
          tokens: int32[B], the token at `position` in every row.
          features: dict of int32[B] (the enabled embeddings' features of those tokens), as in __call__.
          position: int32 scalar, the tokens' position (0-based, < max_len; all rows share it).
          cache: from `init_cache(B)` or the previous step, holding positions 0..position-1.
        Returns:
          (logits float32[B, V], the cache now holding position too). Equal to `__call__`'s logits at
          `position` for the same prefix (deterministic mode). Static shapes: usable in jit / lax loops.
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
        logits = self._logits(self.final_norm(x)[:, 0])
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
