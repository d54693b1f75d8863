"""The compiled kernels lower for their real targets on a CPU-only host (no TPU / GPU needed).

`lower_attention` runs Pallas's own lowering: Mosaic for 'tpu' (block shapes against the (8, 128) tiling, each
op to the tpu / vector dialects, the module serialised into a `tpu_custom_call`), Triton for 'cuda' / 'rocm'
(power-of-two arrays, each op to Triton IR inside a `__gpu$xla.gpu.triton` call). Interpret mode accepts
shapes and ops that these reject, so this is the check that the kernels can be compiled at all. The Mosaic GPU
kernels (forward, dq, dk/dv; one warpgroup and warp-specialized) are lowered for 'cuda' too;
test_mosaic_gpu_interpreter.py checks their values and gradients in JAX's GPU interpreter. Not covered (needs
the device): libtpu's Mosaic layout passes, the PTX compile, memory limits (bar Mosaic GPU's shared-memory
check, which its lowering runs), numerics on hardware, speed.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import block_sparse_attention as bsa
from pallas_kernels.block_sparse import mosaic_gpu as mgpu
from pallas_kernels.block_sparse import targets
from tests.pallas_kernels.test_block_sparse_attention import check_against_reference

PATTERNS = {
    "dense": dict(pattern="dense"),
    "strided": dict(pattern="strided", stride=16),
    "fixed": dict(pattern="fixed", stride=16, summary=4),
}
# Disjoint components per pattern ('both'): one kernel launch each, per kernel kind.
COMPONENTS = {"dense": 1, "strided": 2, "fixed": 2}
KERNELS = {
    "tpu": ("_fwd_kernel", "_dq_kernel", "_dkv_kernel"),
    "cuda": ("_fwd_gpu_kernel", "_dq_gpu_kernel", "_dkv_gpu_kernel"),
}
KERNELS["rocm"] = KERNELS["cuda"]
DEFAULT_LOWERING = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}


def kernel_calls(lowered, platform: str) -> list[str]:
    """Names of the kernels in the lowered module, one per custom call of the platform's kernel target."""
    target = bsa.KERNEL_CALL_TARGETS[DEFAULT_LOWERING[platform]]
    lines = [line for line in lowered.as_text().splitlines() if f"custom_call @{target}(" in line]
    names = [re.search(r'\b(?:kernel_name|name) = "(\w+)"', line) for line in lines]
    assert all(names), "a kernel call without a kernel name"
    return sorted(m.group(1) for m in names)


def spec(t, h, dtype, b=1, n=2):
    x = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    return x, x, x


def expected(platform, pattern, grad=True):
    fwd, dq, dkv = KERNELS[platform]
    return sorted([fwd, dq, dkv] * COMPONENTS[pattern] if grad else [fwd] * COMPONENTS[pattern])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_forward_and_backward_lower_at_target_tiles(platform, pattern, dtype):
    # T = 256 with 128 x 128 tiles: the MXU / lane-sized default; the custom VJP's dq and dk/dv kernels too.
    lowered = bsa.lower_attention(*spec(256, 64, dtype), platform=platform, grad=True, block_q=128, block_k=128,
                                  **PATTERNS[pattern])
    assert kernel_calls(lowered, platform) == expected(platform, pattern)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize(
    "t, h, dtype, blocks",
    [
        (200, 32, jnp.float32, dict(block_q=32, block_k=16)),  # ragged T, small unequal tiles (< 128 lanes)
        (37, 16, jnp.bfloat16, {}),  # default tiles, capped at T and rounded for the target
    ],
    ids=["T200-H32-fp32-bq32-bk16", "T37-H16-bf16-default-blocks"],
)
def test_lowers_at_small_tiles_and_ragged_lengths(platform, pattern, t, h, dtype, blocks):
    lowered = bsa.lower_attention(*spec(t, h, dtype), platform=platform, grad=True, **blocks, **PATTERNS[pattern])
    assert kernel_calls(lowered, platform) == expected(platform, pattern)


def test_forward_only_lowers_forward_kernels():
    for platform in ("tpu", "cuda"):
        lowered = bsa.lower_attention(*spec(256, 64, jnp.bfloat16), platform=platform, **PATTERNS["strided"])
        assert kernel_calls(lowered, platform) == expected(platform, "strided", grad=False)


@pytest.mark.parametrize("device_kind", ["TPU v4", "TPU v5 lite", "TPU v6 lite"])
def test_tpu_lowering_for_several_chips(device_kind):
    # The lowering reads chip facts (e.g. `x // l` in the fixed pattern's predicate needs the generation).
    lowered = bsa.lower_attention(*spec(256, 64, jnp.bfloat16), platform="tpu", grad=True, device_kind=device_kind,
                                  **PATTERNS["fixed"])
    assert kernel_calls(lowered, "tpu") == expected("tpu", "fixed")


def test_rocm_uses_the_triton_kernels():
    lowered = bsa.lower_attention(*spec(128, 32, jnp.bfloat16), platform="rocm", grad=True, **PATTERNS["fixed"])
    assert kernel_calls(lowered, "rocm") == expected("rocm", "fixed")


@pytest.mark.parametrize(
    "platform, blocks, match",
    [
        ("tpu", dict(block_q=12, block_k=16), "divisible by 8 and 128"),  # Mosaic's block-shape rule
        ("cuda", dict(block_q=16, block_k=24), "power of 2"),  # Triton's array-size rule
    ],
)
def test_the_real_lowering_rejects_bad_tiles(platform, blocks, match, monkeypatch):
    # Without our own up-front check, the kernels reach Pallas's lowering, which must reject these tiles
    # (interpret mode runs them happily): evidence that the target's lowering really runs on the kernels.
    monkeypatch.setattr(targets, "check_compilable", lambda *args: None)
    with pytest.raises(ValueError, match=match):
        bsa.lower_attention(*spec(96, 32, jnp.float32), platform=platform, **PATTERNS["dense"], **blocks)


@pytest.mark.parametrize(
    "platform, t, h, dtype, blocks, match",
    [
        ("tpu", 96, 32, jnp.float32, dict(block_q=12), "multiples of 8 for float32"),
        ("tpu", 96, 32, jnp.bfloat16, dict(block_q=8, block_k=16), "multiples of 16 for bfloat16"),
        ("cuda", 96, 32, jnp.float32, dict(block_q=8, block_k=16), "block_q': 8"),  # tl.dot needs >= 16
        ("cuda", 96, 48, jnp.float32, dict(block_q=16, block_k=16), "head_dim': 48"),
        ("metal", 96, 32, jnp.float32, {}, "platform must be one of"),
    ],
)
def test_uncompilable_configurations_fail_with_a_clear_error(platform, t, h, dtype, blocks, match):
    with pytest.raises(ValueError, match=match):
        bsa.lower_attention(*spec(t, h, dtype), platform=platform, **PATTERNS["dense"], **blocks)


@pytest.mark.parametrize(
    "lowering, dtype, t, want",
    [
        ("tpu", jnp.float32, 37, 40),  # sublane multiple of 8 (unchanged from before)
        ("tpu", jnp.bfloat16, 37, 48),  # 16 rows per bf16 tile
        ("tpu", jnp.float32, 1000, 128),
        ("gpu", jnp.float32, 37, 64),  # next power of two
        ("gpu", jnp.bfloat16, 5, 16),  # tl.dot minimum
        ("gpu", jnp.float32, 1000, 128),
    ],
)
def test_default_blocks_suit_the_target(lowering, dtype, t, want):
    assert targets.block_size(None, bsa.DEFAULT_BLOCK_Q, t, lowering, dtype) == want
    assert bsa.logits_per_head(t, pattern="dense", lowering=lowering, dtype=dtype) % (want * want) == 0


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["tpu", "gpu"])
def test_lowered_tile_configuration_matches_reference_in_interpret_mode(lowering):
    # The configuration lowered above (ragged T, bq 32 / bk 16, both parts of the fixed pattern), run in
    # the interpreter: values and gradients equal the dense reference.
    check_against_reference(1, 70, 1, 16, jnp.float32, lowering=lowering, block_q=32, block_k=16,
                            **PATTERNS["fixed"])


# --- Mosaic GPU kernels ('mosaic_gpu': forward, dq and dk/dv, no Triton). -----------------------------------


def custom_calls(lowered) -> dict[str, int]:
    """Kernel launches per custom-call target (both Mosaic GPU lowerings share 'mosaic_gpu_v2')."""
    text = lowered.as_text()
    return {target: text.count(f"custom_call @{target}(") for target in set(bsa.KERNEL_CALL_TARGETS.values())}


NO_TRITON = {"tpu_custom_call": 0, "__gpu$xla.gpu.triton": 0}


def mosaic_gpu_kernel_arities(lowered) -> list[tuple[int, int]]:
    """(operands, results) of each Mosaic GPU call: the serialised module carries no kernel name, but the
    forward (8 operands, o + lse), dq (12, dq) and dk/dv (13, dk + dv) kernels differ in their signatures."""
    calls = re.findall(r"(%\w+(?::(\d+))?) = stablehlo\.custom_call @mosaic_gpu_v2\(([^)]*)\)", lowered.as_text())
    return sorted((len(args.split(",")), int(results or 1)) for _, results, args in calls)


MGPU_FWD, MGPU_DQ, MGPU_DKV = (8, 2), (12, 1), (13, 2)


@pytest.mark.parametrize("lowering", ["mosaic_gpu", "mosaic_gpu_ws"])
@pytest.mark.parametrize("pattern", ["strided", "fixed"])  # Two components each; 'dense' has one.
def test_mosaic_gpu_forward_and_backward_lower_for_cuda(pattern, lowering):
    c = COMPONENTS[pattern]
    x = spec(256, 64, jnp.bfloat16)
    fwd = bsa.lower_attention(*x, platform="cuda", lowering=lowering, **PATTERNS[pattern])
    assert custom_calls(fwd) == NO_TRITON | {"mosaic_gpu_v2": c}
    assert mosaic_gpu_kernel_arities(fwd) == [MGPU_FWD] * c
    both = bsa.lower_attention(*x, platform="cuda", lowering=lowering, grad=True, block_k=128, **PATTERNS[pattern])
    assert custom_calls(both) == NO_TRITON | {"mosaic_gpu_v2": 3 * c}  # No Triton kernel left.
    assert mosaic_gpu_kernel_arities(both) == sorted([MGPU_FWD, MGPU_DQ, MGPU_DKV] * c)


@pytest.mark.parametrize("lowering", ["mosaic_gpu", "mosaic_gpu_ws"])
def test_mosaic_gpu_kernels_ask_for_approximate_math(monkeypatch, lowering):
    # exp2 / log2 / division as `ex2.approx` etc. (as FlashAttention kernels): the lowered module is bytecode,
    # so check what each of the three launches asks for.
    params, kernel = [], mgpu.plgpu.kernel
    spy = lambda body, **kw: params.append(kw["compiler_params"]) or kernel(body, **kw)
    monkeypatch.setattr(mgpu.plgpu, "kernel", spy)
    bsa.lower_attention(*spec(136, 64, jnp.bfloat16), platform="cuda", lowering=lowering, grad=True,
                        **PATTERNS["dense"])
    assert len(params) == 3 and all(p.approx_math for p in params), params


@pytest.mark.parametrize(
    "t, h, dtype, block_k, slots",
    [
        (256, 64, jnp.bfloat16, 64, [2, 2, 2]),
        (200, 128, jnp.float16, 128, [2, 1, 2]),
        (512, 64, jnp.bfloat16, 256, [2, 1, 2]),
        (256, 192, jnp.bfloat16, 64, [2, 2, 1]),
    ],
    ids=["T256-H64-bk64", "T200-H128-fp16-bk128", "T512-H64-bk256", "T256-H192-bk64"],
)
def test_mosaic_gpu_lowers_at_larger_tiles_and_head_dims(t, h, dtype, block_k, slots):
    # Ragged T, and tiles / head dims that are multiples of 64 but not Triton's powers of two. Each kernel
    # double-buffers its copies where two slots fit in SMEM (forward, dq, dk/dv); what it picks lowers, so
    # Mosaic GPU's own SMEM check agrees with `_mgpu_slots`.
    assert [mgpu._mgpu_slots(k, "mosaic_gpu", mgpu.MGPU_BLOCK, block_k, h, dtype) for k in mgpu._MGPU_KERNELS] == slots
    lowered = bsa.lower_attention(*spec(t, h, dtype), platform="cuda", lowering="mosaic_gpu", grad=True,
                                  block_k=block_k, **PATTERNS["strided"])
    assert mosaic_gpu_kernel_arities(lowered) == sorted([MGPU_FWD, MGPU_DQ, MGPU_DKV] * 2)


@pytest.mark.parametrize(
    "t, h, dtype, block_q, block_k, slots",
    [
        (256, 64, jnp.bfloat16, 128, 128, [2, 2, 2]),  # the defaults: two consumers per row block
        (200, 128, jnp.float16, 128, 64, [2, 2, 1]),
        (256, 128, jnp.bfloat16, 64, 128, [2, 1, 2]),  # one consumer in the forward / dq, two in dk/dv
        (256, 192, jnp.bfloat16, 64, 64, [2, 2, 1]),
    ],
    ids=["T256-H64-bq128-bk128", "T200-H128-fp16-bq128-bk64", "T256-H128-bq64-bk128", "T256-H192-bq64-bk64"],
)
def test_warp_specialized_mosaic_gpu_lowers_with_the_slots_it_picks(t, h, dtype, block_q, block_k, slots):
    # Three / two warpgroups per block (consumers + producer), SMEM shared between them; the slots that
    # `_mgpu_slots` picks per kernel (forward, dq by block_q's consumers; dk/dv by block_k's) pass Mosaic GPU's
    # own SMEM check.
    assert [k.warpgroups("mosaic_gpu_ws", block_q, block_k).consumers for k in mgpu._MGPU_KERNELS] == [
        block_q // mgpu.MGPU_BLOCK, block_q // mgpu.MGPU_BLOCK, block_k // mgpu.MGPU_BLOCK]
    assert [mgpu._mgpu_slots(k, "mosaic_gpu_ws", block_q, block_k, h, dtype) for k in mgpu._MGPU_KERNELS] == slots
    lowered = bsa.lower_attention(*spec(t, h, dtype), platform="cuda", lowering="mosaic_gpu_ws", grad=True,
                                  block_q=block_q, block_k=block_k, **PATTERNS["strided"])
    assert mosaic_gpu_kernel_arities(lowered) == sorted([MGPU_FWD, MGPU_DQ, MGPU_DKV] * 2)


@pytest.mark.parametrize(
    "lowering, kwargs, match",
    [
        ("mosaic_gpu_ws", dict(dtype=jnp.float32), "'mosaic_gpu_ws' kernels need bfloat16 or float16"),
        ("mosaic_gpu_ws", dict(block_q=256), r"block_q, block_k in \(64, 128\)"),
        ("mosaic_gpu_ws", dict(block_k=192), r"block_q, block_k in \(64, 128\)"),
        ("mosaic_gpu_ws", dict(h=96), "head_dim multiple of 64"),
        ("mosaic_gpu_ws", dict(h=128), "'mosaic_gpu_ws' dk/dv kernel exceeds available shared memory at "
                                       "block_q=128, block_k=128, head_dim=128: 228 KiB > 227 KiB"),
        ("mosaic_gpu", dict(dtype=jnp.float32), "bfloat16 or float16"),
        ("mosaic_gpu", dict(h=32), "multiples of 64"),
        ("mosaic_gpu", dict(block_q=128), "block_q = 64"),
        ("mosaic_gpu", dict(platform="rocm"), "takes lowering"),
        ("mosaic_gpu_ws", dict(platform="rocm"), "takes lowering"),
        ("mosaic_gpu", dict(h=128, block_k=256), "'mosaic_gpu' dq kernel exceeds available shared memory"),
    ],
)
def test_mosaic_gpu_rejects_what_it_cannot_run(lowering, kwargs, match):
    args = dict(t=256, h=64, dtype=jnp.bfloat16, platform="cuda") | kwargs
    blocks = {key: kwargs[key] for key in ("block_q", "block_k") if key in kwargs}
    with pytest.raises(ValueError, match=match):
        bsa.lower_attention(*spec(args["t"], args["h"], args["dtype"]), platform=args["platform"],
                            lowering=lowering, grad=True, **blocks, **PATTERNS["dense"])


@pytest.mark.parametrize(
    "backend, capability, dtype, h, block_q, block_k, want",
    [
        ("gpu", "9.0", jnp.bfloat16, 64, None, None, "mosaic_gpu"),  # Hopper, what its kernels take
        ("gpu", "9.0", jnp.float16, 128, 64, 192, "mosaic_gpu"),
        ("gpu", "9.0", jnp.float32, 64, None, None, "gpu"),  # wgmma's SMEM operands are 16-bit here
        ("gpu", "9.0", jnp.bfloat16, 32, None, None, "gpu"),
        ("gpu", "9.0", jnp.bfloat16, 64, 128, None, "gpu"),  # one warpgroup: block_q 64
        ("gpu", "9.0", jnp.bfloat16, 64, None, 96, "gpu"),
        ("gpu", "8.0", jnp.bfloat16, 64, None, None, "gpu"),  # no wgmma before Hopper
        ("gpu", "10.0", jnp.bfloat16, 64, None, None, "gpu"),  # nor on Blackwell (tcgen05)
        ("gpu", None, jnp.bfloat16, 64, None, None, "gpu"),  # ROCm
        ("cpu", None, jnp.bfloat16, 64, None, None, "tpu"),
        ("tpu", None, jnp.bfloat16, 64, None, None, "tpu"),
    ],
)
def test_default_lowering_prefers_mosaic_gpu_where_it_runs(backend, capability, dtype, h, block_q, block_k, want,
                                                           monkeypatch):
    monkeypatch.setattr(targets, "gpu_compute_capability", lambda: capability)
    assert targets.default_lowering(backend, dtype, h, block_q, block_k) == want


@pytest.mark.parametrize(
    "backend, capability, want",
    [("cpu", None, ()), ("tpu", None, ("tpu",)), ("gpu", "9.0", ("gpu", "mosaic_gpu", "mosaic_gpu_ws")),
     ("gpu", "8.0", ("gpu",)),
     ("gpu", None, ("gpu",))],
)
def test_compiled_lowerings_per_backend(backend, capability, want, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(targets, "gpu_compute_capability", lambda: capability)
    assert bsa.compiled_lowerings() == want
