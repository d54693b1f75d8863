"""The fused CPU kernel (`musenet_jax.cpu_attention`): values and gradients against the reference at shapes
that exercise its vector paths, its tiling edge cases, vmap, its logit count, and its build.

test_attention.py covers it beside 'xla' on the shared small cases (prime T, l, N, H; bf16; causality; remat;
scan). Here H is a multiple of 8 (the 8 x 8 transposes and 16-wide tiles) and T spans many blocks, panels
and grid rows. Tolerances: fp32 sums in a different order, atol = rtol = 2e-5 on O(1) values.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musenet_jax import cpu_attention
from musenet_jax.attention import AttentionSpec, attend

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def qkv(t, n=2, h=16, b=1, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, n, h), np.float32)) for _ in range(3))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)
def _run(spec: AttentionSpec, impl: str, block_q, q, k, v, w):
    if impl == "cpu":
        fn = lambda q, k, v: cpu_attention.sparse_attention_cpu(
            q, k, v, pattern=spec.pattern, stride=spec.stride, summary=spec.summary, part=spec.part, block_q=block_q
        )
    else:
        fn = lambda q, k, v: attend(q, k, v, spec, impl)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(w)


def check_against_reference(spec, q, k, v, block_q=None):
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    out, grads = _run(spec, "cpu", block_q, q, k, v, w)
    ref_out, ref_grads = _run(spec, "reference", None, q, k, v, w)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")


SPECS = [AttentionSpec("dense")]
for _part in ("both", "local", "summary"):
    SPECS += [AttentionSpec("strided", stride=16, part=_part), AttentionSpec("fixed", 24, 5, _part)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.pattern}-{s.part}")
def test_matches_reference_across_blocks_panels_and_grid_rows(spec):
    # T = 203: 4 blocks of 64 with a ragged last one, 13 grid rows of 16 with a ragged last row.
    check_against_reference(spec, *qkv(203, n=3, h=24))


@pytest.mark.parametrize("block_q", [1, 5, 16, 48, 300])
def test_any_block_size_gives_the_same_result(block_q):
    # Blocks smaller than a tile, not dividing l, straddling blocks of l, and larger than T.
    for spec in (AttentionSpec("strided", stride=24), AttentionSpec("fixed", 24, 4)):
        check_against_reference(spec, *qkv(151, h=16), block_q=block_q)


def test_head_dim_64_long_sequence_and_batch():
    # The benchmark's head size, several batch rows and heads spread over the thread pool.
    check_against_reference(AttentionSpec("strided", stride=32), *qkv(640, n=3, h=64, b=2, seed=3))


def test_large_logits_stay_finite():
    # Logits with a spread of hundreds: the shared row max keeps exp() in range.
    q, k, v = qkv(97, h=16)
    check_against_reference(AttentionSpec("fixed", 16, 4), q * 8, k * 8, v)


def test_vmap_over_a_leading_axis_equals_a_loop():
    spec = AttentionSpec("strided", stride=8)
    q, k, v = (jnp.stack([x, x * 0.5 + 1]) for x in qkv(45, h=8))  # [2, B, T, N, H]
    f = jax.jit(lambda q, k, v: attend(q, k, v, spec, "cpu"))
    batched = jax.vmap(f)(q, k, v)
    for i in range(2):
        np.testing.assert_allclose(batched[i], f(q[i], k[i], v[i]), atol=1e-6)


@pytest.mark.parametrize(
    "spec", [AttentionSpec("strided", stride=16), AttentionSpec("fixed", 24, 5), AttentionSpec("dense")],
    ids=lambda s: s.pattern,
)
def test_logit_count_covers_every_allowed_pair(spec):
    t = 203
    count = cpu_attention.logits_per_head(spec.pattern, t, spec.stride, spec.summary, spec.part)
    pattern = spec.to_pattern()
    pos = np.arange(t)
    nnz = int(np.count_nonzero(pattern.allows(pos[:, None], pos[None, :])))
    # At l = 16 a tile of 16 keys is as wide as the band, so up to ~2.5x is computed; see the next test.
    assert nnz <= count <= 3 * nnz


def test_logit_count_at_the_benchmark_shape():
    # n = 8192, l = 128: 129 local + 32 strided keys per query are allowed; the kernel computes < 190.
    count = cpu_attention.logits_per_head("strided", 8192, 128)
    assert 161 * 8192 < count < 190 * 8192


def _build_in_subprocess(tmp_path, env_update, code="from musenet_jax import cpu_attention as c; "
                                                     "print(c.build_library())"):
    env = {**os.environ, "MUSENET_JAX_KERNEL_CACHE": str(tmp_path / "cache"), **env_update}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_build_is_cached_by_content_and_a_damaged_entry_is_rebuilt(tmp_path):
    first = _build_in_subprocess(tmp_path, {})
    assert first.returncode == 0, first.stderr
    lib = first.stdout.strip().splitlines()[-1]
    assert os.path.exists(lib) and lib.startswith(str(tmp_path / "cache"))
    mtime = os.stat(lib).st_mtime_ns
    second = _build_in_subprocess(tmp_path, {})
    assert second.stdout.strip().splitlines()[-1] == lib
    assert os.stat(lib).st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(lib)]  # no temporaries left
    # A damaged library (say, from a full disk) is rebuilt once when it fails to load.
    with open(lib, "wb") as f:
        f.write(b"not a shared library")
    code = ("import jax.numpy as jnp\n"
            "from musenet_jax import cpu_attention as c\n"
            "x = jnp.ones((1, 8, 1, 8))\n"
            "print(float(c.sparse_attention_cpu(x, x, x, pattern='dense').sum()))")
    res = _build_in_subprocess(tmp_path, {}, code=code)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip().splitlines()[-1]) == 64.0


def test_missing_or_failing_compiler_is_a_one_line_error(tmp_path):
    res = _build_in_subprocess(tmp_path, {"CXX": "", "PATH": str(tmp_path)},
                               code="import sys; sys.path[:0] = " + repr(sys.path) + "\n"
                               "from musenet_jax import cpu_attention as c\n"
                               "try:\n    c.build_library()\nexcept c.KernelBuildError as e:\n    print('ERR', e)")
    assert "ERR attention impl 'cpu' needs a C++ compiler" in res.stdout, res.stderr
    res = _build_in_subprocess(tmp_path, {"CXX": "false"},
                               code="from musenet_jax import cpu_attention as c\n"
                               "try:\n    c.build_library()\nexcept c.KernelBuildError as e:\n    print('ERR', e)")
    assert "ERR compiling the CPU attention kernel failed" in res.stdout, res.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
