"""Forward+backward time and peak memory of block-sparse attention against dense causal attention.

For each sequence length n it times, on one jitted `value_and_grad`-style step (output and dq, dk, dv):
  dense        jax.nn.dot_product_attention(is_causal=True), the baseline (computes the full n x n square);
  strided      attend(..., AttentionSpec('strided', l), impl='xla');
  fixed        attend(..., AttentionSpec('fixed', l, c), impl='xla');
  strided-cpu  attend(..., AttentionSpec('strided', l), impl='cpu') (the fused C++ kernel; skipped with a
               note if it cannot be built);
  fixed-cpu    attend(..., AttentionSpec('fixed', l, c), impl='cpu');
  pallas       attend(..., AttentionSpec('strided', l), impl='pallas') up to --pallas_max_n (interpret mode
               on CPU).
Columns:
  time       best of at least --repeats steady-state runs, and of as many as fit in --min_time seconds
             (after one compile+warm-up run), seconds;
  peak       compiled executable's memory_analysis(): arguments + outputs + temporaries, MiB;
  GFLOP      matmul FLOPs of the tiles the implementation computes, forward+backward
             (12 * H per computed logit: QK^T and PV forward, four matmuls backward; the 'cpu' kernel's
             recomputation of QK^T in the backward is not counted);
  useful     the same count restricted to allowed (query, key) pairs, i.e. the pattern's nnz;
  x time     dense time / this time;  x flop  dense GFLOP / this GFLOP;
  %mm        achieved GFLOP/s on the computed tiles as a percentage of a jitted 2048x2048 f32 matmul;
  floor      for 'xla' rows: the same tiles' six matmuls alone (`attention.xla_tile_matmuls`: no mask, no
             softmax), timed the same way, and its %mm. When time ~ floor, the softmax costs little and
             what bounds the row is how fast XLA runs batched dots of these tile shapes on this machine.
  %hw        for 'cpu' rows: %mm counting the matmuls the kernel executes, i.e. with its backward's
             recomputation of QK^T (14 * H per logit instead of 12 * H).

Usage:
  python -m benchmarks.attention --out=/tmp/bench [--lengths=1024,2048] [--stride=128|sqrt] [--summary=8]

Dense is skipped above --dense_max_n (default 8192: at 16k its fp32 [N, n, n] logits and their gradients
take tens of GiB), with a note in the table and JSON.
"""

from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import pallas_kernels.block_sparse_attention
from benchmarks import attention_timing as timing
from data_pipeline import outputs
from launch import cli
from musenet_jax import attention, cpu_attention

_OUT = flags.DEFINE_string("out", None, "Folder for attention.json (created if missing).")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths n.")
_STRIDE = flags.DEFINE_string("stride", "128", "Stride l: an integer, or 'sqrt' for l = round(sqrt(n)).")
_SUMMARY = flags.DEFINE_integer("summary", 8, "Summary width c of the fixed pattern.")
_HEADS = flags.DEFINE_integer("heads", 4, "Heads N.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim H.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch B.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per case at least (the best is reported).")
_MIN_TIME = flags.DEFINE_float("min_time", 3.0, "Keep timing a case until this many seconds have passed.")
_DENSE_MAX_N = flags.DEFINE_integer("dense_max_n", 8192, "Skip the dense baseline above this n.")
_PALLAS_MAX_N = flags.DEFINE_integer("pallas_max_n", 4096, "Skip the Pallas kernel (strided) above this n.")

_MIB = 1 << 20


def matmul_flops_per_s(repeats: int) -> float:
    """Measured f32 FLOP/s of one jitted 2048 x 2048 x 2048 matmul."""
    x = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    return 2 * 2048**3 / timing.best_time(jax.jit(jnp.matmul), (x, x), max(repeats, 5), _MIN_TIME.value)


def batched_tile_flops_per_s(repeats: int, h: int) -> float:
    """Measured f32 FLOP/s of a batched dot shaped like the strided band's QK^T tiles at n = 8192, l = 128:
    512 independent [64, H] x [H, 192] products. XLA:CPU runs such small dots well below the big-matmul
    rate, which bounds what any plain-XLA block-sparse attention can reach here."""
    x = jax.random.normal(jax.random.key(1), (512, 64, h), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (512, 192, h), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.einsum("XYH,XSH->XYS", x, y))
    return 2 * 512 * 64 * 192 * h / timing.best_time(dot, (x, y), max(repeats, 5), _MIN_TIME.value)


def bench_case(name: str, attn, args, repeats: int) -> dict:
    compiled = timing.forward_backward(attn).lower(*args).compile()
    mem = compiled.memory_analysis()
    # XLA:CPU leaves `peak_memory_in_bytes` at arguments + outputs; the buffer assignment's temp size is
    # where the [N, n, n] logits live, so the peak is bounded by (and for these graphs close to) the sum.
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) / _MIB
    return {"method": name, "seconds": timing.best_time(compiled, args, repeats, _MIN_TIME.value), "peak_mib": peak}


def _nnz(spec: attention.AttentionSpec, n: int) -> int:
    """Allowed (query, key) pairs, counted in row chunks so no [n, n] mask is held."""
    pattern = spec.to_pattern()
    total, rows = 0, max(1, (1 << 24) // n)
    j = np.arange(n, dtype=np.int32)[None, :]
    for r0 in range(0, n, rows):
        i = np.arange(r0, min(n, r0 + rows), dtype=np.int32)[:, None]
        total += int(np.count_nonzero(pattern.allows(i, j)))
    return total


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    if not _OUT.value:
        raise cli.UsageError("--out is required")
    lengths, stride_of = timing.parse_lengths(_LENGTHS.value), timing.stride_rule(_STRIDE.value)
    b, nh, h, reps = _BATCH.value, _HEADS.value, _HEAD_DIM.value, _REPEATS.value
    timing.check_sizes(batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value, repeats=_REPEATS.value,
                       min_time=_MIN_TIME.value)
    cli.prepare_output_dir(_OUT.value)

    cpu_note = None
    peak = matmul_flops_per_s(reps)
    tile = batched_tile_flops_per_s(reps, h)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, {os.cpu_count()} cpus; "
          f"f32 2048^3 matmul: {peak / 1e9:.1f} GFLOP/s; "
          f"batched 512 x [64,{h}]x[{h},192] tile dot: {tile / 1e9:.1f} GFLOP/s")
    rows, notes = [], []
    for n in lengths:
        stride = stride_of(n)
        keys = jax.random.split(jax.random.key(n), 4)
        args = tuple(jax.random.normal(key, (b, n, nh, h), jnp.float32) for key in keys)
        dense_spec = attention.AttentionSpec("dense")
        cases = [
            ("strided", attention.AttentionSpec("strided", stride=stride)),
            ("fixed", attention.AttentionSpec("fixed", stride=stride, summary=_SUMMARY.value)),
        ]
        results = []
        if n <= _DENSE_MAX_N.value:
            dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
            results.append((bench_case("dense", dpa, args, reps), dense_spec))
        else:
            notes.append(f"n={n}: dense skipped (above --dense_max_n={_DENSE_MAX_N.value})")
        for name, spec in cases:
            attn = lambda q, k, v, spec=spec: attention.attend(q, k, v, spec, impl="xla")
            res = bench_case(name, attn, args, reps)
            floor = lambda q, k, v, spec=spec: attention.xla_tile_matmuls(q, k, v, spec)
            res["floor_seconds"] = bench_case("floor", floor, args, reps)["seconds"]
            results.append((res, spec))
        for name, spec in cases:
            if cpu_note:
                break
            attn = lambda q, k, v, spec=spec: attention.attend(q, k, v, spec, impl="cpu")
            try:
                results.append((bench_case(f"{name}-cpu", attn, args, reps), spec))
            except cpu_attention.KernelBuildError as e:
                cpu_note = f"cpu kernel skipped: {e}"
                notes.append(cpu_note)
        if n <= _PALLAS_MAX_N.value:
            attn = lambda q, k, v, spec=cases[0][1]: attention.attend(q, k, v, spec, impl="pallas")
            results.append((bench_case("pallas", attn, args, reps), cases[0][1]))
        dense = results[0][0] if results[0][0]["method"] == "dense" else None
        for res, spec in results:
            if res["method"] == "pallas":
                logits = pallas_kernels.block_sparse_attention.logits_per_head(n, pattern="strided", stride=stride)
            elif res["method"].endswith("-cpu"):
                logits = cpu_attention.logits_per_head(spec.pattern, n, spec.stride, spec.summary, spec.part)
            else:
                logits = attention.xla_logits_per_head(spec, n)
            flops = 12 * h * b * nh * logits
            res.update(
                n=n,
                stride=None if spec.pattern == "dense" else stride,
                summary=spec.summary,
                gflop=flops / 1e9,
                useful_gflop=12 * h * b * nh * _nnz(spec, n) / 1e9,
                pct_matmul=100 * flops / res["seconds"] / peak,
            )
            if "floor_seconds" in res:
                res["floor_pct_matmul"] = 100 * flops / res["floor_seconds"] / peak
            if res["method"].endswith("-cpu"):
                # The kernel's backward recomputes Q K^T (2 * H more per logit): FLOPs it executes.
                res["hw_pct_matmul"] = res["pct_matmul"] * 14 / 12
            if dense is not None:
                res["speedup"] = dense["seconds"] / res["seconds"]
                res["flop_ratio"] = dense["gflop"] / res["gflop"]
            rows.append(res)
            _print_row(res, header=len(rows) == 1)

    for note in notes:
        print(f"note: {note}")
    report = {
        "benchmark": "attention forward+backward",
        "config": {"batch": b, "heads": nh, "head_dim": h, "dtype": "float32", "stride": _STRIDE.value,
                   "summary": _SUMMARY.value, "repeats": reps, "min_time_s": _MIN_TIME.value},
        "machine": {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "jax": jax.__version__,
                    "matmul_gflops": peak / 1e9, "batched_tile_dot_gflops": tile / 1e9},
        "rows": rows,
        "notes": notes,
    }
    path = os.path.join(_OUT.value, "attention.json")
    outputs.write_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'n':>6} {'method':>11} {'l':>4} {'time s':>9} {'peak MiB':>9} {'GFLOP':>8} {'useful':>8} "
              f"{'x time':>7} {'x flop':>7} {'%mm':>5} {'floor s':>8} {'%mm':>5} {'%hw':>5}")
    fmt = lambda key, spec: format(r[key], spec) if key in r else "-"
    peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
    print(f"{r['n']:>6} {r['method']:>11} {r['stride'] or '-':>4} {r['seconds']:>9.4f} {peak:>9} "
          f"{r['gflop']:>8.2f} {r['useful_gflop']:>8.2f} {fmt('speedup', '7.1f'):>7} "
          f"{fmt('flop_ratio', '7.1f'):>7} {r['pct_matmul']:>5.1f} {fmt('floor_seconds', '8.4f'):>8} "
          f"{fmt('floor_pct_matmul', '5.1f'):>5} {fmt('hw_pct_matmul', '5.1f'):>5}")


if __name__ == "__main__":
    cli.run(main)
