"""Which block-sparse attention kernels compile where: lowerings, their backends and tile rules, defaults.

Interpret mode accepts any tile; the real compilers do not (`check_compilable`). `default_lowering` is what
`sparse_attention(lowering=None)` runs; `compiled_lowerings` what compiles on this process's backend.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse import mosaic_gpu

LOWERINGS = ("tpu", "gpu", *mosaic_gpu.LOWERINGS)
# The JAX backend each lowering compiles on.
BACKEND = {"tpu": "tpu", "gpu": "gpu", "mosaic_gpu": "gpu", "mosaic_gpu_ws": "gpu"}
# Lowering platform (as `jax.jit(...).lower(lowering_platforms=...)` names it) -> the kernels it can take
# (the first is the default).
PLATFORM_LOWERINGS = {"tpu": ("tpu",), "cuda": ("gpu", *mosaic_gpu.LOWERINGS), "rocm": ("gpu",)}
# Custom-call target of each kernel kind, one call per kernel launch: Mosaic TPU, Triton, Mosaic GPU.
KERNEL_CALL_TARGETS = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton", "mosaic_gpu": "mosaic_gpu_v2",
                       "mosaic_gpu_ws": "mosaic_gpu_v2"}
# The chip `lower_attention` lowers for unless told (`device_kind`): a v5e, an H100, an MI300X.
LOWERING_DEVICE_KINDS = {"tpu": "TPU v5 lite", "cuda": "NVIDIA H100", "rocm": "gfx942"}


def sublanes(dtype) -> int:
    """Rows of one TPU vreg tile for dtype: 8 for 32-bit, 16 for 16-bit (bf16 packs two rows per sublane)."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def block_size(block: int | None, default: int, t: int, lowering: str = "tpu", dtype=jnp.float32) -> int:
    if block is None:
        # Cap at the sequence length so that short inputs need no big tiles, rounded to what the target
        # compiles: 'tpu' a multiple of the dtype's sublane tile (8 fp32, 16 bf16), 'gpu' a power of two >= 16;
        # 'mosaic_gpu' one warpgroup's wgmma tile, 'mosaic_gpu_ws' two.
        if lowering in mosaic_gpu.LOWERINGS:
            return mosaic_gpu.MGPU_BLOCK * (2 if lowering == "mosaic_gpu_ws" else 1)
        if lowering == "gpu":
            return max(16, min(default, pl.next_power_of_2(t)))
        g = sublanes(dtype)
        return max(g, min(default, -(-t // g) * g))
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block sizes must be positive integers, got {block!r}")
    return int(block)


def check_compilable(lowering: str, bq: int, bk: int, h: int, dtype) -> None:
    """Raises ValueError for tiles the real compiler rejects (interpret mode accepts any size).

    'tpu' (Mosaic): q/k/v tiles [b, H] have b as the sublane dim, so b must be a multiple of the dtype's
    sublane tile (Pallas itself checks only 8; 16-bit dtypes tile (16, 128) natively). 'gpu' (Triton):
    every array in the kernel must have a power-of-two size and tl.dot needs dims >= 16, so bq, bk and H
    must be powers of two >= 16. Pallas's Triton lowering checks only the power of two. 'mosaic_gpu' (also
    checked in interpret mode, whose TMA / wgmma simulation has the same rules): 16-bit dtypes (wgmma's
    SMEM operands), block_q 64 (one warpgroup's M), block_k and H multiples of 64 (M of the dk/dv kernel,
    128-byte swizzled rows). 'mosaic_gpu_ws': the same, but block_q and block_k 64 or 128 (one or two
    consumer warpgroups of 64 rows in the forward / dq and in the dk/dv kernels). Both: every kernel fits in
    SMEM with one slot per streamed operand (at H = 128, 'mosaic_gpu_ws' needs a 64 tile on one side).
    """
    if lowering in mosaic_gpu.LOWERINGS:
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"the {lowering!r} kernels need bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}")
        m = mosaic_gpu.MGPU_BLOCK
        if lowering == "mosaic_gpu" and (bq != m or bk % m or h % m):
            raise ValueError(f"the 'mosaic_gpu' kernels need block_q = {m} and block_k, head_dim multiples "
                             f"of {m}, got {bq}, {bk}, {h}")
        ws_blocks = (m, 2 * m)
        if lowering == "mosaic_gpu_ws" and (bq not in ws_blocks or bk not in ws_blocks or h % m):
            raise ValueError(f"the 'mosaic_gpu_ws' kernels need block_q, block_k in {ws_blocks} and a head_dim "
                             f"multiple of {m}, got {bq}, {bk}, {h}")
        mosaic_gpu.check_smem(lowering, bq, bk, h, dtype)
    elif lowering == "tpu":
        g = sublanes(dtype)
        if bq % g or bk % g:
            raise ValueError(f"the 'tpu' kernels need block_q and block_k multiples of {g} for "
                             f"{jnp.dtype(dtype).name}, got {bq}, {bk}")
    else:  # 'gpu'
        bad = {name: x for name, x in (("block_q", bq), ("block_k", bk), ("head_dim", h)) if x < 16 or x & (x - 1)}
        if bad:
            raise ValueError(f"the 'gpu' (Triton) kernels need block_q, block_k and head_dim powers of two >= 16, "
                             f"got {bad}")


def gpu_compute_capability() -> str | None:
    """The first device's CUDA compute capability ('9.0' on Hopper), None off CUDA (e.g. ROCm, CPU)."""
    return getattr(jax.devices()[0], "compute_capability", None)


def has_wgmma() -> bool:
    """Whether the GPU is a Hopper (sm_90), whose wgmma the 'mosaic_gpu' kernels need (Blackwell has none)."""
    return gpu_compute_capability() == "9.0"


def default_lowering(backend: str, dtype, h: int, block_q: int | None, block_k: int | None) -> str:
    """The kernels `lowering=None` picks: off a GPU backend 'tpu' (also what interpret mode runs on CPU); on
    a GPU, Mosaic GPU (the Pallas GPU backend JAX develops; its Triton path is deprecated) wherever its
    kernels run: Hopper, and inputs and blocks `check_compilable` accepts for it (16-bit, H and the blocks
    asked for multiples of 64, block_q exactly 64). Elsewhere (other GPUs, fp32, other shapes) the Triton
    kernels."""
    if backend != "gpu":
        return "tpu"
    if not has_wgmma():
        return "gpu"
    bq, bk = (mosaic_gpu.MGPU_BLOCK if b is None else b for b in (block_q, block_k))
    try:
        check_compilable("mosaic_gpu", bq, bk, h, dtype)
    except ValueError:
        return "gpu"
    return "mosaic_gpu"


def compiled_lowerings() -> tuple[str, ...]:
    """The lowerings whose kernels compile on this process's default backend: ('tpu',) on TPU; on CUDA
    ('gpu', 'mosaic_gpu', 'mosaic_gpu_ws') on Hopper, else ('gpu',); ('gpu',) on ROCm; () on CPU (which
    interprets them)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return ("tpu",)
    if backend != "gpu":
        return ()
    return ("gpu", *mosaic_gpu.LOWERINGS) if has_wgmma() else ("gpu",)


# XLA:CPU pool threads the interpreted 'mosaic_gpu_ws' kernels need: the kernel's own blocking call, two
# warpgroups blocked on barriers, one left to run the third (the launches are chained: `_Mode.after`).
MGPU_INTERPRET_THREADS = 4


def xla_cpu_threads() -> int:
    """Threads in XLA:CPU's pool: $PJRT_NPROC or $NPROC if set (as XLA reads them), else the usable cores."""
    for name in ("PJRT_NPROC", "NPROC"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
