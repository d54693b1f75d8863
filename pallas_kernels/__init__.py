"""Pallas kernels for block-sparse attention (depends on nothing else of this repo).

`sparse_attention(q, k, v, *, pattern, stride, summary, part, block_q, block_k, interpret)` runs the Pallas
kernel; `reference_attention` (same signature) is the dense masked-softmax ground truth.

Lowering. `lower_attention(q, k, v, platform=, lowering=, grad=)` lowers the compiled kernels (forward, and
with grad the custom VJP's dq and dk/dv kernels) on any host, no device needed, via
`jax.jit(f).trace(...).lower(lowering_platforms=(platform,))` under an abstract mesh whose chip
(`jax.sharding.AbstractDevice`, `device_kind=`, default per platform 'TPU v5 lite' / 'NVIDIA H100' / 'gfx942')
gives the facts the lowering reads: 'tpu' -> Mosaic, 'cuda' / 'rocm' -> Triton, 'cuda' with
lowering='mosaic_gpu' (one warpgroup per row block) or 'mosaic_gpu_ws' (warp-specialized: a producer warpgroup
streaming tiles to two consumers) -> the Mosaic GPU kernels (forward, dq, dk/dv). This runs Pallas's own
lowering of every kernel (block-shape rules, per-op lowering, the serialised kernel in a `tpu_custom_call` /
`__gpu$xla.gpu.triton` / `mosaic_gpu_v2` custom call); tests/pallas_kernels/test_lowering.py does so in CI for
every pattern, fp32 / bf16, at 128-tiles and small ragged tiles. It found (fixed): key-position tiles [1, bk]
that Mosaic rejects unless bk % 128 == 0 (now [nk, 1, bk]); 'gpu' kernels that JAX 0.10 sends to Mosaic GPU by
default, which rejects them (now explicit Triton params); default tiles the targets cannot compile (now
rounded per target, with a clear error for bad explicit ones). Not checkable without the device: libtpu's
Mosaic layout passes and VMEM limits, the PTX compile (tl.dot / wgmma shapes, shared memory, registers),
numerics on hardware, speed; Mosaic GPU's own shared-memory check does run in its lowering
(and ours, `block_sparse.targets.check_compilable`, before it, in interpret mode too).
`jax.export` accepts the TPU and Mosaic GPU kernels (serialising needs `flatbuffers`) but refuses Triton
calls (no compatibility guarantee). The Mosaic GPU kernels' values and gradients are tested in JAX's GPU
interpreter (a private API in JAX 0.10: `jax._src.pallas.mosaic_gpu.interpret`). On a GPU the default
lowering is 'mosaic_gpu' where it runs (Hopper, 16-bit inputs, H a multiple of 64), else Triton;
'mosaic_gpu_ws' is chosen explicitly until it has been timed against 'mosaic_gpu' on a device.
"""

from pallas_kernels.block_sparse_attention import lower_attention, sparse_attention
from pallas_kernels.block_sparse_attention import sparse_attention_reference as reference_attention

__all__ = ["lower_attention", "reference_attention", "sparse_attention"]
