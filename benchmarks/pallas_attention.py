"""The Pallas block-sparse kernels on an accelerator: forward+backward TFLOP/s against dense attention.

For each sequence length n, on one jitted step (output and dq, dk, dv) with bf16 inputs [B, n, N, H]:
  dense-cudnn       jax.nn.dot_product_attention(is_causal=True, implementation='cudnn') (CUDA only);
  dense-xla         the same with implementation='xla' (the full n x n square; up to --dense_xla_max_n);
  <pattern>-<lowering>
                    pallas_kernels.sparse_attention for pattern 'strided' / 'fixed' and each kernel lowering
                    this backend compiles (`compiled_lowerings`: 'gpu' (Triton), and 'mosaic_gpu' and
                    'mosaic_gpu_ws' on Hopper, on GPUs; 'tpu' on TPU; on CPU 'tpu' and 'gpu' in interpret mode,
                    for testing the script).
Columns:
  time     best of at least --repeats steady-state runs, and of as many as fit in --min_time seconds (after one
           compile + warm-up run), seconds;
  TFLOP    matmul FLOPs of the logits each method computes, forward+backward, 12 * H per logit (QK^T and PV
           forward; dV, dP, dS^T Q, dS K backward): the kernels' visited tiles (`logits_per_head`, masked
           entries of partial tiles included), the causal half n(n+1)/2 for cuDNN (a flash kernel), the whole
           square for XLA. The kernels also recompute QK^T (and dP) in the backward; that is not counted;
  TFLOP/s  TFLOP / time;  %peak  against the chip's dense bf16 peak (`PEAK_TFLOPS`, or --peak_tflops);
  %mm      against a bf16 8192^3 matmul timed in the same run;
  x dense  the best dense time at this n / this time;
  err      max |this - dense-xla| / max |dense-xla| over out, dq, dk, dv, against the block-sparse plain-JAX
           attention (`attention.attend(impl='xla')`) in fp32, for n <= --check_max_n: numerics on hardware.

Usage (on a GPU or TPU host):
  python -m benchmarks.pallas_attention --out=/tmp/bench
  python -m benchmarks.pallas_attention --out=/tmp/bench --lengths=4096,8192 --lowerings=mosaic_gpu
The issue's target: >= 40 % of the bf16 peak on the computed tiles at n = 4k ... 64k on an H100.
The JSON is rewritten after each length (`done_lengths`), so a run cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import pallas_kernels
from benchmarks import attention_timing as timing
from data_pipeline import outputs
from launch import cli
from musenet_jax import attention
from pallas_kernels import block_sparse_attention as bsa

_OUT = flags.DEFINE_string("out", None, "Folder for pallas_attention.json (created if missing).")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768", "65536"], "Sequence lengths n.")
_PATTERNS = flags.DEFINE_list("patterns", ["strided", "fixed"], "Sparse patterns to time.")
_LOWERINGS = flags.DEFINE_list("lowerings", None, "Kernel lowerings (default: every one this backend compiles).")
_STRIDE = flags.DEFINE_string("stride", "128", "Stride l: an integer, or 'sqrt' for l = round(sqrt(n)).")
_SUMMARY = flags.DEFINE_integer("summary", 8, "Summary width c of the fixed pattern.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch B.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads N.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim H.")
_BLOCK_Q = flags.DEFINE_integer("block_q", None, "Kernel query tile (default: the lowering's).")
_BLOCK_K = flags.DEFINE_integer("block_k", None, "Kernel key tile (default: the lowering's).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per case at least (the best is reported).")
_MIN_TIME = flags.DEFINE_float("min_time", 2.0, "Keep timing a case until this many seconds have passed.")
_DENSE_XLA_MAX_N = flags.DEFINE_integer("dense_xla_max_n", 16384, "Skip dense-xla above this n (n^2 memory).")
_CHECK_MAX_N = flags.DEFINE_integer("check_max_n", 16384, "Check values against the plain-JAX attention up to n.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak of the chip (default: `PEAK_TFLOPS`).")

# Dense bf16 tensor-core / MXU peaks (TFLOP/s, no sparsity), by device_kind substring; first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The chip's dense bf16 peak from `PEAK_TFLOPS`, None for an unknown chip."""
    return next((peak for name, peak in PEAK_TFLOPS if name in device_kind), None)


def matmul_tflops(repeats: int) -> float:
    """Measured bf16 TFLOP/s of one jitted 8192^3 matmul (2048^3 on CPU, where it is only a reference)."""
    m = 8192 if jax.default_backend() != "cpu" else 2048
    x = jax.random.normal(jax.random.key(0), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return 2 * m**3 / timing.best_time(mm, (x, x), max(repeats, 5), _MIN_TIME.value) / 1e12


def default_lowerings() -> list[str]:
    """Every kernel lowering this backend compiles; on CPU the two that interpret mode runs quickly."""
    return list(bsa.compiled_lowerings()) or ["tpu", "gpu"]


def _has_cudnn() -> bool:
    """CUDA (not ROCm) GPUs, where jax.nn.dot_product_attention has a cuDNN implementation."""
    return jax.default_backend() == "gpu" and bsa._gpu_compute_capability() is not None


def _rel_err(got, want) -> float:
    """max |got - want| / max |want| over matching arrays (fp32)."""
    errs = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        errs.append(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return max(errs)


def _parse_flags():
    """-> (lengths, n -> stride, lowerings), or a usage error."""
    if not _OUT.value:
        raise cli.UsageError("--out is required")
    lengths, stride_of = timing.parse_lengths(_LENGTHS.value), timing.stride_rule(_STRIDE.value)
    timing.check_sizes(batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value, repeats=_REPEATS.value,
                       min_time=_MIN_TIME.value)
    bad = sorted(set(_PATTERNS.value) - {"strided", "fixed", "dense"})
    if bad:
        raise cli.UsageError(f"--patterns must be among strided, fixed, dense; got {bad}")
    lowerings = _LOWERINGS.value or default_lowerings()
    bad = sorted(set(lowerings) - set(bsa.LOWERINGS))
    if bad:
        raise cli.UsageError(f"--lowerings must be among {', '.join(bsa.LOWERINGS)}; got {bad}")
    return lengths, stride_of, lowerings


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    lengths, stride_of, lowerings = _parse_flags()
    b, nh, h, reps = _BATCH.value, _HEADS.value, _HEAD_DIM.value, _REPEATS.value
    backend, device = jax.default_backend(), jax.devices()[0].device_kind
    cli.prepare_output_dir(_OUT.value)

    peak = _PEAK_TFLOPS.value or peak_tflops(device)
    mm = matmul_tflops(reps)
    print(f"device: {device} ({backend}); bf16 matmul {mm:.1f} TFLOP/s; peak "
          f"{'unknown' if peak is None else f'{peak:.0f} TFLOP/s'}; lowerings {','.join(lowerings)}", flush=True)
    rows, notes = [], []
    report = {
        "benchmark": "pallas block-sparse attention forward+backward",
        "config": {"batch": b, "heads": nh, "head_dim": h, "dtype": "bfloat16", "stride": _STRIDE.value,
                   "summary": _SUMMARY.value, "block_q": _BLOCK_Q.value, "block_k": _BLOCK_K.value,
                   "lowerings": lowerings, "repeats": reps, "min_time_s": _MIN_TIME.value},
        "machine": {"device": device, "backend": backend, "platform": platform.platform(), "jax": jax.__version__,
                    "peak_tflops": peak, "matmul_tflops": mm},
        "rows": rows,
        "notes": notes,
    }
    path = os.path.join(_OUT.value, "pallas_attention.json")
    for done, n in enumerate(lengths, 1):
        stride = stride_of(n)
        keys = jax.random.split(jax.random.key(n), 4)
        args32 = tuple(jax.random.normal(key, (b, n, nh, h), jnp.float32) for key in keys)
        args = tuple(x.astype(jnp.bfloat16) for x in args32)
        cases = []  # (method, pattern kwargs or None, attention fn, computed logits per (batch, head))
        if _has_cudnn():
            cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            cases.append(("dense-cudnn", None, cudnn, n * (n + 1) // 2))
        if n <= _DENSE_XLA_MAX_N.value:
            xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
            cases.append(("dense-xla", None, xla, n * n))
        else:
            notes.append(f"n={n}: dense-xla skipped (above --dense_xla_max_n={_DENSE_XLA_MAX_N.value})")
        for pattern in _PATTERNS.value:
            kw = dict(pattern=pattern)
            if pattern != "dense":
                kw["stride"] = stride
            if pattern == "fixed":
                kw["summary"] = _SUMMARY.value
            for lowering in lowerings:
                blocks = dict(block_q=_BLOCK_Q.value, block_k=_BLOCK_K.value)
                fn = lambda q, k, v, kw=kw, lowering=lowering, blocks=blocks: pallas_kernels.sparse_attention(
                    q, k, v, lowering=lowering, **blocks, **kw)
                logits = bsa.logits_per_head(n, lowering=lowering, dtype=jnp.bfloat16, **blocks, **kw)
                cases.append((f"{pattern}-{lowering}", kw, fn, logits))

        results = []
        for method, kw, fn, logits in cases:
            try:
                step = timing.forward_backward(fn)
                seconds = timing.best_time(step, args, reps, _MIN_TIME.value)
            except Exception as e:  # A lowering this chip or JAX cannot run: a note, not a lost table.
                notes.append(f"n={n} {method}: failed: {' '.join(str(e).split())[:300]}")
                continue
            flops = 12 * h * b * nh * logits
            res = dict(n=n, method=method, stride=None if kw is None or kw["pattern"] == "dense" else stride,
                       seconds=seconds, tflop=flops / 1e12, tflops=flops / seconds / 1e12)
            res["pct_peak"] = None if peak is None else 100 * res["tflops"] / peak
            res["pct_matmul"] = 100 * res["tflops"] / mm
            if kw is not None and n <= _CHECK_MAX_N.value:
                want = timing.forward_backward(lambda q, k, v, kw=kw: attention.attend(
                    q, k, v, attention.AttentionSpec(kw["pattern"], kw.get("stride"), kw.get("summary")), "xla"))
                got = step(*args)
                with jax.default_matmul_precision("highest"):  # No TF32 in the reference on GPUs.
                    res["err"] = _rel_err(got, want(*args32))
            results.append(res)
        dense = [r["seconds"] for r in results if r["method"].startswith("dense")]
        for res in results:
            if dense:
                res["speedup"] = min(dense) / res["seconds"]
            rows.append(res)
            _print_row(res, header=len(rows) == 1)
        # After every length, so that a run stopped by a time limit keeps the lengths it finished.
        report["done_lengths"] = lengths[:done]
        outputs.write_atomic(path, json.dumps(report, indent=1) + "\n")

    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'n':>6} {'method':>21} {'l':>4} {'time s':>9} {'TFLOP':>8} {'TFLOP/s':>8} {'%peak':>6} "
              f"{'%mm':>6} {'x dense':>7} {'err':>8}")
    fmt = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)
    print(f"{r['n']:>6} {r['method']:>21} {r['stride'] or '-':>4} {r['seconds']:>9.5f} {r['tflop']:>8.4f} "
          f"{r['tflops']:>8.2f} {fmt('pct_peak', '6.1f'):>6} {r['pct_matmul']:>6.1f} {fmt('speedup', '7.2f'):>7} "
          f"{fmt('err', '8.1e'):>8}", flush=True)


if __name__ == "__main__":
    cli.run(main)
