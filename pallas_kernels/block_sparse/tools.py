"""Block-sparse attention tooling for tests and benchmarks: lowering for a device this host lacks, counting the
tiles a kernel visits, and the logits a pattern costs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_attention as entry
from pallas_kernels import patterns as patterns_lib
from pallas_kernels.block_sparse import plan as plan_lib
from pallas_kernels.block_sparse import targets


def lower_attention(
    q: jax.Array | jax.ShapeDtypeStruct,
    k: jax.Array | jax.ShapeDtypeStruct,
    v: jax.Array | jax.ShapeDtypeStruct,
    *,
    platform: str,
    lowering: str | None = None,
    grad: bool = False,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
    block_q: int | None = None,
    block_k: int | None = None,
    device_kind: str | None = None,
) -> jax.stages.Lowered:
    """Lowers the compiled (not interpreted) kernels for `platform` on any host, without that device.

    Runs Pallas's own lowering of every kernel: for 'tpu' to Mosaic MLIR (checks block shapes against
    the (8, 128) tiling, lowers each op, serialises the module into a `tpu_custom_call`); for 'cuda' /
    'rocm' to Triton IR (checks power-of-two array sizes, lowers each op, embeds it in a
    `__gpu$xla.gpu.triton` call). What still needs the device: Mosaic's layout / vreg passes (in libtpu)
    and Triton's compile to PTX / AMDGCN (in XLA's GPU backend), i.e. VMEM / shared-memory limits,
    register pressure and numerics. Lowering reads chip facts (TPU generation and tile sizes; a GPU's compute
    capability, which Triton's lowering asks the device for in newer JAX), so it runs under an abstract mesh
    whose one device is of kind `device_kind`.

    Args:
      q, k, v: [B, T, N, H] arrays or `jax.ShapeDtypeStruct`s (only shapes and dtypes are used).
      platform: 'tpu' | 'cuda' | 'rocm'.
      lowering: which kernels (see `sparse_attention`); default 'tpu' for 'tpu', 'gpu' (Triton) for 'cuda' /
        'rocm'; 'mosaic_gpu' or 'mosaic_gpu_ws' on 'cuda' lowers the Mosaic GPU kernels (forward, dq,
        dk/dv).
      grad: also lower the custom VJP (the dq and dk/dv kernels) via `jax.vjp`; the lowered function is
        then (q, k, v, dout) -> (out, dq, dk, dv), else (q, k, v) -> out.
      pattern ... block_k: as `sparse_attention`; blocks must suit the target (see `targets.check_compilable`).
      device_kind: the chip lowered for, as JAX's `device_kind` names it (e.g. 'TPU v4', 'TPU v6 lite',
        'NVIDIA A100', 'gfx90a'); default `targets.LOWERING_DEVICE_KINDS[platform]`.

    Returns:
      The `jax.stages.Lowered`; `.as_text()` holds one custom call per kernel launch (see
      `KERNEL_CALL_TARGETS`): per pattern component, the forward kernel, plus the dq and dk/dv kernels
      with grad. For the Mosaic GPU lowerings the module is lowered to its dialect here; its compile to PTX
      (like Triton's) happens in XLA's CUDA backend.
    """
    takes = targets.PLATFORM_LOWERINGS.get(platform)
    if takes is None:
        raise ValueError(f"platform must be one of {tuple(targets.PLATFORM_LOWERINGS)}, got {platform!r}")
    lowering = lowering or takes[0]
    if lowering not in takes:
        raise ValueError(f"platform {platform!r} takes lowering {takes}, got {lowering!r}")
    mode = plan_lib.Mode(lowering, interpret=False)
    plans, _ = entry._prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, None, mode=mode)
    if not plans:
        raise ValueError("nothing to lower: the pattern allows no key for any query at this length")
    b, t, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    rows = jax.ShapeDtypeStruct((b * n, t, h), q.dtype)

    def forward(q, k, v):
        return entry._attention(q, k, v, plans, scale, mode)

    def forward_and_vjp(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return (out, *vjp(do))

    fn, args = (forward_and_vjp, (rows,) * 4) if grad else (forward, (rows,) * 3)
    device = jax.sharding.AbstractDevice(device_kind=device_kind or targets.LOWERING_DEVICE_KINDS[platform],
                                         num_cores=1, platform=targets.BACKEND[lowering])
    # Traced under the mesh too: the trace context (which the lowering sees) is captured at trace time.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("chip",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def visited_blocks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> dict[str, np.ndarray]:
    """Tiles the forward kernel actually computed, per component: {name: int32[B * N, q_blocks]}.

    Counted inside the kernel (a per-q-block counter incremented on every visited tile), for checking that
    only the layout's non-empty tiles run: each row should equal `BlockLayout.kv_counts`.
    """
    plans, mode = entry._prepare(q, k, v, pattern, stride, summary, part, block_q, block_k, interpret, "tpu")
    h = q.shape[-1]
    fwd = jax.jit(lambda q, k, v: entry._forward(q, k, v, plans, 1.0 / math.sqrt(h), mode, count_visits=True)[2])
    visits = fwd(plan_lib.to_rows(q), plan_lib.to_rows(k), plan_lib.to_rows(v))
    return {plan.name: np.asarray(vis[..., 0]) for plan, vis in zip(plans, visits, strict=True)}


def logits_per_head(
    n: int,
    *,
    pattern: str,
    stride: int | None = None,
    summary: int | None = None,
    part: str = "both",
    block_q: int | None = None,
    block_k: int | None = None,
    lowering: str = "tpu",
    dtype=jnp.float32,
) -> int:
    """(query, key) logits the kernel computes per batch row and head for length n: visited tiles * bq * bk.

    `lowering` and `dtype` only matter for default block sizes (rounded to what that target compiles).

    Includes the masked entries of partial tiles. Matmul FLOPs per logit: 4 * H forward (QK^T, PV) and
    14 * H backward (the dq and dk/dv kernels each recompute QK^T and dP = dO V^T, then dQ / dK, dV).
    """
    bq = targets.block_size(block_q, plan_lib.DEFAULT_BLOCK_Q, n, lowering, dtype)
    bk = targets.block_size(block_k, plan_lib.DEFAULT_BLOCK_K, n, lowering, dtype)
    plans = plan_lib.plan(patterns_lib.make_pattern(pattern, stride, summary, part), n, bq, bk)
    return sum(plan.fwd.num_blocks for plan in plans) * bq * bk
