"""`ModelConfig`: everything the model depends on (and nothing else), checked, and the layer schedule it implies.

The model (`musenet_jax.model`) documents what each field does; this module holds the fields, their checks and
the names they may take.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from data_pipeline import vocab as vocab_lib
from musenet_jax import attention as attention_lib
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


def vocab_fields(vocab) -> dict[str, Any]:
    """The model config fields that come from the vocabulary: `ModelConfig.from_config_dict(config.model,
    **vocab_fields(vocab))`."""
    return {"vocab_size": vocab.size, "token_layout": tuple(vocab.layout())}


def architecture(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config section (mapping) without its `EXECUTION_FIELDS`: what must match to resume."""
    return {k: v for k, v in model_config.items() if k not in EXECUTION_FIELDS}


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
      token_layout: (W, I, V, P, L[, X]) of the vocabulary (`Vocab.layout()`), needed by 'factored'.
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
            if len(self.token_layout) not in (5, 6):
                raise ValueError("model.token_embedding='factored' needs model.token_layout = the vocabulary's "
                                 f"(W, I, V, P, L[, X]) (Vocab.layout()), got {self.token_layout!r}")
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
