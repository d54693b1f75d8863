"""The compiled kernels on a real accelerator: values and gradients against the dense reference.

Skipped without a GPU or TPU (CI has none; there the kernels run in interpret mode, in the other files).
On a GPU / TPU host: `python -m pytest tests/pallas_kernels/test_on_device.py`. Every lowering the backend
compiles (`compiled_lowerings`: 'tpu'; 'gpu' (Triton) and, on Hopper, 'mosaic_gpu' and 'mosaic_gpu_ws') at
shapes they all take: H = 64, ragged T, default, 64 and 128 key tiles.

Tolerances. The reference runs at the highest matmul precision in fp32. bf16 inputs as in interpret mode
(atol = rtol = 3e-2 on values, 6e-2 on gradients). fp32 inputs: a GPU's tensor cores multiply fp32 in TF32
(10-bit mantissa, relative step ~1e-3) unless told otherwise, as Triton's dot does by default; over H = 64
products and the softmax that is up to ~1e-2: atol = rtol = 1e-2 (values), 2e-2 (gradients).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import block_sparse_attention as bsa

pytestmark = pytest.mark.skipif(not bsa.compiled_lowerings(), reason="needs a GPU or TPU: the compiled kernels")

TOL = {jnp.float32: (1e-2, 2e-2), jnp.bfloat16: (3e-2, 6e-2)}
PATTERNS = [
    dict(pattern="dense"),
    dict(pattern="strided", stride=32),
    dict(pattern="fixed", stride=32, summary=4),
]


def _cases():
    for lowering in bsa.compiled_lowerings() or ("none",):
        for dtype in (jnp.bfloat16, jnp.float32):
            if lowering.startswith("mosaic_gpu") and dtype == jnp.float32:
                continue  # 16-bit only.
            for kwargs in PATTERNS:
                for block_k in (None, 64, 128):
                    yield pytest.param(lowering, dtype, kwargs, block_k,
                                       id=f"{lowering}-{jnp.dtype(dtype).name}-{kwargs['pattern']}-bk{block_k}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _out_and_grads(fn, kwargs, q, k, v, w):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **dict(kwargs)), q, k, v)
    return out, vjp(w.astype(out.dtype))


@pytest.mark.parametrize("lowering, dtype, kwargs, block_k", list(_cases()))
def test_compiled_kernel_matches_reference(lowering, dtype, kwargs, block_k):
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((2, 1000, 2, 64), np.float32)) for _ in range(4))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, grads = _out_and_grads(pallas_kernels.sparse_attention,
                                tuple({**kwargs, "lowering": lowering, "interpret": False, "block_k": block_k}.items()),
                                q, k, v, w)
    with jax.default_matmul_precision("highest"):
        ref, ref_grads = _out_and_grads(pallas_kernels.reference_attention, tuple(kwargs.items()),
                                        *(x.astype(jnp.float32) for x in (q, k, v)), w)
    val_tol, grad_tol = TOL[dtype]
    f32 = lambda x: np.asarray(x.astype(jnp.float32))
    assert out.dtype == dtype
    np.testing.assert_allclose(f32(out), f32(ref), atol=val_tol, rtol=val_tol)
    for name, g, gr in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(f32(g), f32(gr), atol=grad_tol, rtol=grad_tol, err_msg=f"d{name}")
