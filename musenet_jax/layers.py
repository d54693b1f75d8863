"""The model's building blocks: parameters with logical axes, LayerNorm, attention, MLP and the pre-LN block.

Shapes as in `musenet_jax.model` (B batch, T length, D d_model, N heads, H head_dim, F mlp_dim); the attention
kinds and the block's layout are documented there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from musenet_jax import attention as attention_lib
from musenet_jax import decoding
from musenet_jax import sharding as sharding_lib
from musenet_jax.model_config import ModelConfig

ACT = ("batch", "length", "embed")
ACT_HEADS = ("batch", "length", "heads", "kv")


# --- Building blocks. -------------------------------------------------------------------------------------


def param(
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


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when key is None (deterministic) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over D with fp32 statistics; [..., D] -> [..., D] in the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = param(rngs, (config.d_model,), None, ("embed",), config, fill=1.0)
        self.bias = param(rngs, (config.d_model,), None, ("embed",), config)
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
        self.query = param(rngs, (d, n, h), config.init_std, ("embed", "heads", "kv"), config)
        self.key = param(rngs, (d, n, h), config.init_std, ("embed", "heads", "kv"), config)
        self.value = param(rngs, (d, n, h), config.init_std, ("embed", "heads", "kv"), config)
        self.out = param(rngs, (n, h, d), out_std, ("heads", "kv", "embed"), config)
        if config.use_bias:
            self.query_bias = param(rngs, (n, h), None, ("heads", "kv"), config)
            self.key_bias = param(rngs, (n, h), None, ("heads", "kv"), config)
            self.value_bias = param(rngs, (n, h), None, ("heads", "kv"), config)
            self.out_bias = param(rngs, (d,), None, ("embed",), config)
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
        return sharding_lib.constrain(checkpoint_name(y, "qkv_proj"), ACT_HEADS, self.rules)

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
        ctx = sharding_lib.constrain(checkpoint_name(ctx, "attn_context"), ACT_HEADS, self.rules)
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
        self.wi = param(rngs, (d, f), config.init_std, ("embed", "mlp"), config)
        self.wo = param(rngs, (f, d), out_std, ("mlp", "embed"), config)
        if config.use_bias:
            self.bi = param(rngs, (f,), None, ("mlp",), config)
            self.bo = param(rngs, (d,), None, ("embed",), config)
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
        x = x + dropout(self.attention(self.attention_norm(x)), self.dropout_rate, keys[0])
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, keys[1])
        return sharding_lib.constrain(x, ACT, self.rules)

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
