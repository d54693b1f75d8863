"""Pallas block-sparse attention (interpret mode on CPU) against the dense masked-softmax reference.

Tolerances. fp32: kernel and reference sum the same terms in a different order (online softmax, tile
by tile, components merged by log-sum-exp), observed max error ~1e-6; we allow atol = rtol = 2e-5 on
values and gradients. bf16: q, k, v, the probabilities fed to the value matmul and (backward) the logit
gradients are rounded to bf16 (relative step 2^-8) at different points than in the reference, so results
may differ by a few bf16 steps: atol = rtol = 3e-2 on values, 6e-2 on gradients (inputs N(0, 1), outputs
O(1)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import block_sparse_attention as bsa
from pallas_kernels import patterns

# Numbers, not speed: skip LLVM's backend optimisations (they dominate the compile of these tiny graphs).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 6e-2)}


def qkv(b, t, n, h, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, n, h), np.float32), dtype) for _ in range(3))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _out_and_grads(fn, kwargs, q, k, v, w):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **dict(kwargs)), q, k, v)
    return out, vjp(w.astype(out.dtype))


def check_against_reference(b, t, n, h, dtype=jnp.float32, **kwargs):
    q, k, v = qkv(b, t, n, h, dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    blocks = {key: kwargs.pop(key) for key in ("block_q", "block_k", "lowering") if key in kwargs}
    out, grads = _out_and_grads(
        pallas_kernels.sparse_attention, tuple({**kwargs, **blocks}.items()), q, k, v, w
    )
    ref, ref_grads = _out_and_grads(pallas_kernels.reference_attention, tuple(kwargs.items()), q, k, v, w)
    assert out.dtype == dtype and out.shape == q.shape
    val_tol, grad_tol = TOL[dtype]
    f32 = lambda x: np.asarray(x.astype(jnp.float32))
    np.testing.assert_allclose(f32(out), f32(ref), atol=val_tol, rtol=val_tol)
    for name, g, gr in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(f32(g), f32(gr), atol=grad_tol, rtol=grad_tol, err_msg=f"d{name}")


# (B, T, N, H, kwargs): prime-ish T, mostly not a multiple of the stride, unequal blocks, several c.
FAST = [
    (2, 29, 2, 8, dict(pattern="dense", block_q=8, block_k=8)),
    (2, 37, 2, 8, dict(pattern="strided", stride=5, block_q=8, block_k=8)),
    (1, 31, 2, 8, dict(pattern="strided", stride=6, part="summary", block_q=8, block_k=8)),
    (1, 64, 1, 16, dict(pattern="strided", stride=8, block_q=16, block_k=16)),
    (2, 37, 2, 8, dict(pattern="fixed", stride=5, summary=2, block_q=8, block_k=8)),
    (1, 29, 2, 8, dict(pattern="fixed", stride=6, summary=1, part="summary", block_q=8, block_k=8)),
    (1, 41, 1, 16, dict(pattern="fixed", stride=7, summary=3, part="local", block_q=8, block_k=16)),
    (1, 53, 2, 8, dict(pattern="fixed", stride=7, summary=3, block_q=16, block_k=8)),
]
# More of the same kind, run with the slow tests.
FAST_MORE = [
    (1, 37, 1, 16, dict(pattern="dense", block_q=16, block_k=8)),
    (1, 31, 3, 8, dict(pattern="strided", stride=6, part="local", block_q=8, block_k=16)),
]


def case_id(case) -> str:
    b, t, n, h, kwargs = case
    return f"B{b}-T{t}-N{n}-H{h}-" + "-".join(f"{k}{v}" for k, v in kwargs.items() if k != "pattern") + \
        f"-{kwargs['pattern']}"


@pytest.mark.parametrize("b, t, n, h, kwargs", FAST, ids=[case_id(c) for c in FAST])
def test_matches_reference_fp32(b, t, n, h, kwargs):
    check_against_reference(b, t, n, h, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pattern="strided", stride=5, block_q=8, block_k=8),
        dict(pattern="fixed", stride=5, summary=2),
        dict(pattern="strided", stride=6, block_q=16, block_k=16, lowering="gpu"),
    ],
    ids=["strided", "fixed-default-blocks", "strided-gpu"],
)
def test_matches_reference_bf16(kwargs):
    check_against_reference(1, 37, 2, 16, jnp.bfloat16, **kwargs)


# The 'gpu' kernels (Triton-style: a loop over each row's listed blocks), in interpret mode.
GPU_FAST = [
    (2, 37, 2, 8, dict(pattern="strided", stride=5, block_q=8, block_k=16, lowering="gpu")),
    (1, 53, 2, 8, dict(pattern="fixed", stride=7, summary=3, block_q=16, block_k=8, lowering="gpu")),
]
GPU_SLOW = [(b, t, n, h, {**kwargs, "lowering": "gpu"}) for b, t, n, h, kwargs in FAST + FAST_MORE]


@pytest.mark.parametrize("b, t, n, h, kwargs", GPU_FAST, ids=[case_id(c) for c in GPU_FAST])
def test_gpu_kernels_match_reference_fp32(b, t, n, h, kwargs):
    check_against_reference(b, t, n, h, **kwargs)


SLOW = [
    (1, 61, 2, 8, dict(pattern=pattern, stride=7, part=part, block_q=bq, block_k=bk, **extra))
    for pattern, extra in (("strided", {}), ("fixed", {"summary": 2}))
    for part in ("both", "local", "summary")
    for bq, bk in ((8, 8), (16, 8))
] + FAST_MORE + GPU_SLOW + [
    (1, 35, 1, 8, dict(pattern="strided", stride=5)),  # T a multiple of l
    (1, 35, 1, 8, dict(pattern="fixed", stride=5, summary=5)),  # c = l
    (1, 1, 1, 8, dict(pattern="dense")),  # one token
    (1, 3, 2, 8, dict(pattern="strided", stride=7)),  # T < l
    (1, 5, 1, 8, dict(pattern="fixed", stride=7, summary=2, part="summary")),  # no query sees any key
    (3, 24, 2, 16, dict(pattern="fixed", stride=4, summary=1, block_q=8, block_k=8)),  # T a multiple of blocks
]


@pytest.mark.slow
@pytest.mark.parametrize("b, t, n, h, kwargs", SLOW, ids=[case_id(c) for c in SLOW])
def test_matches_reference_more_shapes(b, t, n, h, kwargs):
    check_against_reference(b, t, n, h, **kwargs)


@pytest.mark.parametrize(
    "t, kwargs",
    [
        (37, dict(pattern="dense")),
        (61, dict(pattern="strided", stride=7)),
        (61, dict(pattern="strided", stride=7, part="summary")),
        (61, dict(pattern="fixed", stride=7, summary=2)),
    ],
)
def test_visits_only_non_empty_blocks(t, kwargs):
    bq = bk = 8
    q, k, v = qkv(1, t, 2, 8)
    visits = bsa.visited_blocks(q, k, v, block_q=bq, block_k=bk, **kwargs)
    layout = patterns.make_pattern(kwargs["pattern"], kwargs.get("stride"), kwargs.get("summary"),
                                   kwargs.get("part", "both")).block_layout(t, bq, bk)
    for comp in layout.components:
        lay = comp.layout
        # Counted inside the kernel: every (batch * head) row ran exactly the listed tiles of each q-block.
        np.testing.assert_array_equal(visits[comp.name], np.broadcast_to(lay.kv_counts, (2, len(lay.kv_counts))))
    assert sum(int(x.sum()) for x in visits.values()) == 2 * layout.num_blocks
    if kwargs["pattern"] != "dense":
        # The launched grid's k axis is the longest list of non-empty k-blocks, not all k-blocks.
        for comp in layout.components:
            assert comp.layout.kv_blocks.shape[1] == comp.layout.kv_counts.max()
        assert layout.num_blocks < sum(c.layout.tiles.size for c in layout.components)


def test_rows_with_no_allowed_key_are_zero():
    # fixed 'summary' with l = 6, c = 2: queries 0..3 see no key.
    q, k, v = qkv(1, 19, 1, 8)
    kwargs = dict(pattern="fixed", stride=6, summary=2, part="summary", block_q=8, block_k=8)
    out = pallas_kernels.sparse_attention(q, k, v, **kwargs)
    assert np.all(np.asarray(out[:, :4]) == 0)
    dq = jax.grad(lambda q: jnp.sum(pallas_kernels.sparse_attention(q, k, v, **kwargs)))(q)
    assert np.all(np.isfinite(np.asarray(dq))) and np.all(np.asarray(dq[:, :4]) == 0)


def test_remat_policies_keep_or_drop_named_residuals(capsys):
    q, k, v = qkv(1, 21, 1, 8)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(pallas_kernels.sparse_attention(q, k, v, pattern="strided", stride=4)))

    def names(f):
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(f, q, k, v)
        lines = capsys.readouterr().out.splitlines()
        return sorted(x.split()[0] for x in lines if "from the argument" not in x and "from a constant" not in x)

    keep = jax.checkpoint(loss, policy=jax.checkpoint_policies.save_only_these_names(bsa.OUT_NAME, bsa.LSE_NAME))
    drop = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
    # Besides q, k, v: kept = exactly the output [B * N, T, H] and the lse [B * N, T, 1]; dropped = nothing.
    assert names(keep) == ["f32[1,21,1]", "f32[1,21,8]"]
    assert names(drop) == []
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for f in (keep, drop):
        for g, gw in zip(jax.grad(f, argnums=(0, 1, 2))(q, k, v), want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(gw), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pattern="sparse"), "pattern must be one of"),
        (dict(pattern="strided"), "needs stride"),
        (dict(pattern="dense", block_q=0), "block sizes"),
        (dict(pattern="dense", interpret=False), "interpret=True"),
        (dict(pattern="dense", lowering="cuda"), "lowering must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    if "interpret" in kwargs and jax.default_backend() == "tpu":
        pytest.skip("the TPU lowering exists")
    q, k, v = qkv(1, 8, 1, 8)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        pallas_kernels.sparse_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        pallas_kernels.sparse_attention(q, k[:, :4], v, pattern="dense")
