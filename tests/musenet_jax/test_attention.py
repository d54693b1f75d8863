"""`attend`: 'xla' and 'cpu' against 'reference' (values and gradients), causality, and use under
jit/remat/scan/sharding; the 'cpu' and 'pallas' kernels per shard in the model under a mesh. The 'cpu'
kernel's own edge cases (tile sizes, vmap, its build) are in test_cpu_attention.py.

Tolerances. fp32: both implementations compute the same sums in a different order, so they agree to
~1e-6; we allow atol = rtol = 2e-5 on values and gradients. bf16: q, k, v and the probabilities fed to
the value matmul are bf16 (8-bit mantissa, relative step 2^-8 = 0.4 %) in both implementations, but the
block-sparse one rounds a different max-shifted probability, so values may differ by a few bf16 steps:
atol = rtol = 3e-2 on values and 6e-2 on gradients (inputs are N(0, 1), outputs O(1)).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from configs import tiny
from musenet_jax import attention
from musenet_jax import model as model_lib
from musenet_jax import sharding as sharding_lib
from musenet_jax.attention import AttentionSpec, attend
from pallas_kernels import block_sparse_attention as bsa
from pallas_kernels.block_sparse import targets

# These tests check numbers, not speed: skip LLVM's backend optimisations, which otherwise dominate the run
# time of this file (seconds per tiny graph on a 2-core machine).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def specs(stride: int, summary: int = 2) -> list[AttentionSpec]:
    out = [AttentionSpec("dense")]
    for part in ("both", "local", "summary"):
        out.append(AttentionSpec("strided", stride=stride, part=part))
        out.append(AttentionSpec("fixed", stride=stride, summary=summary, part=part))
    return out


def spec_id(spec: AttentionSpec) -> str:
    return f"{spec.pattern}-{spec.part}-l{spec.stride}"


# Prime T, l, N, H with T not a multiple of l (the padding path), plus T = 35 = 7 * 5 (no padding), plus
# l = 6, where the strided band uses query blocks of b = 3 < l (windows of l + b keys; b = l for prime l).
CASES = [(37, spec) for spec in specs(5)] + [(61, spec) for spec in specs(7)]
CASES += [(35, AttentionSpec("strided", stride=5)), (35, AttentionSpec("fixed", stride=5, summary=2))]
CASES += [(37, AttentionSpec("strided", stride=6, part=part)) for part in ("both", "local")]


def qkv(t: int, dtype=jnp.float32, b: int = 2, n: int = 3, h: int = 5, seed: int = 0):
    # numpy draws: no per-shape compile of jax.random ops.
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, n, h), np.float32), dtype) for _ in range(3))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _out_and_grads(spec: AttentionSpec, impl: str, q, k, v, w):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, spec, impl), q, k, v)
    return out, vjp(w.astype(out.dtype))


def value_and_grads(impl: str, spec: AttentionSpec, q, k, v):
    """Output and the gradients of sum(out * w) for a fixed random w (so every gradient entry matters).

    Compiled once per (spec, impl, shape, dtype) and shared by all tests of this file.
    """
    w = np.random.default_rng(7).standard_normal(q.shape, np.float32)
    w = jax.device_put(w, q.sharding)
    return _out_and_grads(spec, impl, q, k, v, w)


FAST_IMPLS = ("xla", "cpu")


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("t,spec", CASES, ids=[f"T{t}-{spec_id(s)}" for t, s in CASES])
def test_fast_impls_match_reference_fp32(t, spec, impl):
    q, k, v = qkv(t)
    ref_out, ref_grads = value_and_grads("reference", spec, q, k, v)
    out, grads = value_and_grads(impl, spec, q, k, v)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("spec", specs(7), ids=spec_id)
def test_fast_impls_match_reference_bf16(spec, impl):
    q, k, v = qkv(61, jnp.bfloat16)
    ref_out, ref_grads = value_and_grads("reference", spec, q, k, v)
    out, grads = value_and_grads(impl, spec, q, k, v)
    assert out.dtype == jnp.bfloat16
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(out), f32(ref_out), atol=3e-2, rtol=3e-2)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(f32(g), f32(ref), atol=6e-2, rtol=6e-2, err_msg=f"d{name}")


@pytest.mark.parametrize("spec", specs(5), ids=spec_id)
def test_reference_is_softmax_over_the_pattern_sets(spec):
    # Ground truth for the ground truth: a per-row numpy softmax over S_i built from the set definitions.
    q32, k32, v32 = qkv(37)
    q, k, v = (np.asarray(x, np.float64) for x in (q32, k32, v32))
    stride, c = spec.stride, spec.summary
    expected = np.zeros_like(q)
    for i in range(q.shape[1]):
        if spec.pattern == "dense":
            s = list(range(i + 1))
        elif spec.pattern == "strided":
            a1 = set(range(max(0, i - stride), i + 1))
            a2 = {j for j in range(i + 1) if (i - j) % stride == 0}
            s = sorted({"both": a1 | a2, "local": a1, "summary": a2}[spec.part])
        else:
            a1 = {j for j in range(i + 1) if j // stride == i // stride}
            a2 = {j for j in range(i + 1) if j % stride >= stride - c}
            s = sorted({"both": a1 | a2, "local": a1, "summary": a2}[spec.part])
        if not s:
            continue  # No allowed key: the output is 0 by convention.
        logits = np.einsum("bnh,bsnh->bns", q[:, i], k[:, s]) / np.sqrt(q.shape[-1])
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected[:, i] = np.einsum("bns,bsnh->bnh", p, v[:, s])
    out, _ = value_and_grads("reference", spec, q32, k32, v32)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


IMPL_CASES = list(itertools.product(["reference", "xla", "cpu"], specs(5)))


@pytest.mark.parametrize("impl,spec", IMPL_CASES, ids=[f"{i}-{spec_id(s)}" for i, s in IMPL_CASES])
def test_no_causal_leakage(impl, spec):
    t = 37
    q, k, v = qkv(t)
    fn = lambda q, k, v: value_and_grads(impl, spec, q, k, v)[0]
    base = fn(q, k, v)
    mask = spec.to_pattern().mask(t)
    for pos in (0, 4, 5, 11, 36):
        out = fn(q, k.at[:, pos].add(3.0), v.at[:, pos].add(-5.0))
        np.testing.assert_array_equal(out[:, :pos], base[:, :pos], err_msg=f"changing position {pos} leaked")
        # The check has teeth: every query that may see position pos does change.
        sees_pos = mask[:, pos]
        diff = np.abs(np.asarray(out - base)[:, sees_pos]).max(axis=(0, 2, 3))
        assert (diff > 0).all(), f"position {pos} not seen by queries {np.flatnonzero(sees_pos)[diff == 0]}"


def test_queries_without_keys_output_zero_with_finite_gradients():
    # fixed 'summary' (A2 only): queries i < l - c have no allowed key at all.
    spec = AttentionSpec("fixed", stride=7, summary=2, part="summary")
    q, k, v = qkv(61)
    for impl in ("reference", "xla", "cpu"):
        out, grads = value_and_grads(impl, spec, q, k, v)
        np.testing.assert_array_equal(out[:, :5], 0.0)
        assert np.abs(np.asarray(out[:, 5:])).min(axis=-1).max() > 0
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(grads[0][:, :5], 0.0)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_fast_impls_under_checkpoint_match_plain_grad(impl):
    spec = AttentionSpec("strided", stride=7)
    q, k, v = qkv(61)
    w = np.random.default_rng(7).standard_normal(q.shape, np.float32)
    _, plain = value_and_grads(impl, spec, q, k, v)  # The loss below, without remat.
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, spec, impl) * w)
    remat = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
    grads = jax.jit(jax.grad(remat, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)(q, k, v)
    for g, ref in zip(grads, plain, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


class _Block(nnx.Module):
    """A minimal residual attention layer: x [B, T, D] -> x + attend(qkv(x))."""

    def __init__(self, spec: AttentionSpec, impl: str, d: int, heads: int, rngs: nnx.Rngs):
        self.spec, self.impl, self.heads = spec, impl, heads
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
        return x + attend(q, k, v, self.spec, self.impl).reshape(b, t, d)


def _scanned_loss_and_grads(spec: AttentionSpec, impl: str, x):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
        return _Block(spec, impl, d=12, heads=3, rngs=rngs)

    graphdef, params = nnx.split(make_layers(nnx.Rngs(0)))

    def loss_fn(params):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(h, layer):
            return layer(h)

        return jnp.sum(body(x, nnx.merge(graphdef, params)) ** 2)

    return jax.jit(jax.value_and_grad(loss_fn), compiler_options=FAST_COMPILE)(params)


SCAN_CASES = [("xla", AttentionSpec("strided", stride=5)), ("xla", AttentionSpec("fixed", 5, 2))]
SCAN_CASES += [("cpu", AttentionSpec("strided", stride=5))]


@pytest.mark.slow
@pytest.mark.parametrize("impl,spec", SCAN_CASES, ids=[f"{i}-{spec_id(s)}" for i, s in SCAN_CASES])
def test_fast_impls_inside_nnx_scan_and_remat(impl, spec):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 23, 12), np.float32))
    loss, grads = _scanned_loss_and_grads(spec, impl, x)
    ref_loss, ref_grads = _scanned_loss_and_grads(spec, "reference", x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), grads, ref_grads)


SHARDED_CASES = [(AxisType.Auto, spec) for spec in specs(5)[:3]] + [(AxisType.Explicit, specs(5)[1])]


@pytest.mark.slow
@pytest.mark.parametrize("axis_type,spec", SHARDED_CASES, ids=[f"{a}-{spec_id(s)}" for a, s in SHARDED_CASES])
def test_xla_with_batch_and_heads_sharded(axis_type, spec):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
    sharding = NamedSharding(mesh, P("data", None, "model", None))
    q, k, v = qkv(37, n=4, h=8)
    expected_out, expected = value_and_grads("xla", spec, q, k, v)
    with jax.set_mesh(mesh):
        out, grads = value_and_grads("xla", spec, *(jax.device_put(x, sharding) for x in (q, k, v)))
    assert out.sharding.spec == sharding.spec
    np.testing.assert_allclose(out, expected_out, atol=1e-6)
    for g, ref in zip(grads, expected, strict=True):
        assert g.sharding.spec == sharding.spec
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [AttentionSpec("strided", stride=5), AttentionSpec("fixed", 5, 2)], ids=spec_id)
def test_pallas_matches_reference(spec):
    # The kernel itself is tested in tests/pallas_kernels/; this checks the wiring (interpret mode on CPU).
    q, k, v = qkv(37)
    out, grads = value_and_grads("pallas", spec, q, k, v)
    ref_out, ref_grads = value_and_grads("reference", spec, q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["cpu", "pallas"])
def test_model_kernels_run_per_shard_under_a_mesh(impl, monkeypatch):
    # Both kernels are opaque custom calls (the 'cpu' FFI call; on TPU / GPU the pallas_call) that XLA cannot
    # partition: under a (data, fsdp, tensor) mesh the model runs them per batch and head shard (shard_map
    # in model.Attention). Values and gradients equal the single-device run.
    config = model_lib.ModelConfig.from_config_dict(
        tiny.get_config().model, token_embedding="table", vocab_size=53,
        d_model=24, num_heads=4, head_dim=6, mlp_dim=29, num_layers=2,
        attention_stride=5, max_len=31, vocab_multiple=1, attention_impl=impl)
    layer = model_lib.Attention(config, "both", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 31, 24), np.float32))
    seen = []  # Shapes of q each Pallas kernel call is traced with.
    kernel = pallas_kernels.sparse_attention
    monkeypatch.setattr(pallas_kernels, "sparse_attention", lambda q, k, v, **kw: seen.append(q.shape) or
                        kernel(q, k, v, **kw))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)
    expected = step(params, x)
    mesh = sharding_lib.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        got = step(params, x_sharded)
        hlo = step.lower(params, x_sharded).compile().as_text()
    # Each device's kernel sees its own shard: batch 8 / (data 2 x fsdp 2), heads 4 / tensor 2.
    if impl == "cpu":
        calls = [line for line in hlo.splitlines() if 'custom_call_target="musenet_sparse_attention' in line]
        assert len(calls) == 2 and all("f32[2,31,2,6]" in line for line in calls), calls
    else:  # Interpret mode on CPU has no custom call to look for: the traced shapes say it.
        assert seen == [(8, 31, 4, 6), (2, 31, 2, 6)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, expected)


@pytest.mark.parametrize(
    "backend, capability, platform, target, lowering",
    [("tpu", None, "tpu", "tpu_custom_call", "auto"), ("gpu", "8.0", "cuda", "__gpu$xla.gpu.triton", "auto"),
     ("gpu", "9.0", "cuda", "mosaic_gpu_v2", "auto"), ("gpu", "9.0", "cuda", "mosaic_gpu_v2", "mosaic_gpu_ws")],
    ids=["tpu", "cuda-triton", "cuda-mosaic_gpu", "cuda-mosaic_gpu_ws"],
)
def test_model_pallas_attention_lowers_per_shard(backend, capability, platform, target, lowering, monkeypatch):
    # The train step's attention on an abstract 8-chip mesh (data 2 x fsdp 2 x tensor 2), lowered from this
    # CPU host for TPU (Mosaic), an A100-class GPU (Triton) and a Hopper GPU (Mosaic GPU, by default and
    # warp-specialized as configured): the kernels (2 components x forward, dq, dk/dv) each run on one
    # device's shard, batch 8 / 4 x heads 4 / 2 = 4 rows, not on gathered inputs (32 rows).
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # The kernels pick their target from these.
    monkeypatch.setattr(targets, "gpu_compute_capability", lambda: capability)
    config = model_lib.ModelConfig.from_config_dict(
        tiny.get_config().model, token_embedding="table", vocab_size=53,
        d_model=128, num_heads=4, head_dim=64, mlp_dim=29, num_layers=2,
        attention_stride=16, max_len=256, vocab_multiple=1, attention_impl="pallas", dtype="bfloat16",
        pallas_lowering=lowering)
    graphdef, params = nnx.split(model_lib.Attention(config, "both", rngs=nnx.Rngs(0)))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) ** 2)

    chip = jax.sharding.AbstractDevice(device_kind=bsa.LOWERING_DEVICE_KINDS[platform], num_cores=1, platform=backend)
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                                     abstract_device=chip)
    with jax.sharding.use_abstract_mesh(mesh):
        x = jax.ShapeDtypeStruct((8, 256, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
        p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)
        text = jax.jit(jax.value_and_grad(loss)).trace(p, x).lower(lowering_platforms=(platform,)).as_text()
    calls = [line for line in text.splitlines() if f"custom_call @{target}(" in line]
    assert len(calls) == 6
    results = [line[line.rindex("->") + 2:].strip(" (") for line in calls]
    assert all(r.startswith("tensor<4x256x64x") for r in results), results


@pytest.mark.parametrize("lowering, want", [("auto", None), ("gpu", "gpu")])
def test_model_passes_its_pallas_lowering_to_the_kernel(lowering, want, monkeypatch):
    config = model_lib.ModelConfig.from_config_dict(
        tiny.get_config().model, token_embedding="table", vocab_size=53,
        d_model=24, num_heads=4, head_dim=6, mlp_dim=29, num_layers=2,
        attention_stride=5, max_len=31, vocab_multiple=1, attention_impl="pallas", pallas_lowering=lowering)
    seen = []
    kernel = pallas_kernels.sparse_attention
    monkeypatch.setattr(pallas_kernels, "sparse_attention", lambda q, k, v, **kw: seen.append(kw["lowering"]) or
                        kernel(q, k, v, **kw))
    layer = model_lib.Attention(config, "both", rngs=nnx.Rngs(0))
    out = layer(jnp.ones((1, 31, 24), jnp.float32))
    assert seen == [want] and np.all(np.isfinite(np.asarray(out)))


def test_bad_impl_and_shapes_raise_clear_errors():
    q, k, v = (np.zeros((1, 8, 2, 4), np.float32),) * 3
    spec = AttentionSpec("strided", stride=4)
    with pytest.raises(ValueError, match="impl must be one of"):
        attend(q, k, v, spec, "cuda")
    with pytest.raises(ValueError, match=r"\[B, T, N, H\]"):
        attend(q[0], k[0], v[0], spec)
    with pytest.raises(ValueError, match="needs stride"):
        AttentionSpec("strided")
    with pytest.raises(ValueError, match="part must be"):
        AttentionSpec("fixed", 4, 1, part="interleaved")


def test_spec_maps_onto_the_shared_pattern_definition():
    assert AttentionSpec("fixed", 8, 2, "local").to_pattern() == attention.patterns_lib.Fixed(8, 2, "local")


@pytest.mark.parametrize(
    "spec", [s for s in specs(7) if s.pattern != "dense"] + [AttentionSpec("strided", 9)], ids=spec_id
)
def test_xla_logits_count_matches_the_tiles_it_builds(spec):
    t = 61
    tp = -(-t // spec.stride) * spec.stride
    pattern = spec.to_pattern()
    build = attention._strided_pieces if spec.pattern == "strided" else attention._fixed_pieces
    x = jax.ShapeDtypeStruct((1, 1, tp, 4), jnp.float32)
    logits = jax.eval_shape(lambda x: [p.logits for p in build(x, x, x, pattern, t)], x)
    assert attention.xla_logits_per_head(spec, t) == sum(np.prod(s.shape) for s in logits)
    # Sub-quadratic: with l = sqrt(T) strided computes ~ T * 2.5 l logits and fixed ~ T * (l + c T / l),
    # far below dense's T^2 (here T = 16384, l = 128, c = 8: 1/51 and 1/14 of T^2).
    big = {"strided": AttentionSpec("strided", 128), "fixed": AttentionSpec("fixed", 128, 8)}[spec.pattern]
    assert attention.xla_logits_per_head(big, 16384) < 16384**2 / {"strided": 40, "fixed": 12}[spec.pattern]
