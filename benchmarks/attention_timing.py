"""What the attention benchmarks (`attention`, `pallas_attention`) share: their timing rule, the step they
time and the reading of their --lengths / --stride flags."""

from __future__ import annotations

import math
import time

import jax

from launch import cli


def best_time(fn, args, repeats: int, min_time: float) -> float:
    """Best of at least `repeats` runs after a warm-up (compile) run, seconds. Fast cases keep running until
    `min_time` seconds have passed (at most 1000 runs), so that every case gets the same chance of a quiet
    moment on a shared machine, not just a slow baseline."""
    jax.block_until_ready(fn(*args))
    times = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_backward(attn):
    """attn(q, k, v) -> jitted (q, k, v, dout) -> (out, dq, dk, dv): one forward and backward pass."""

    def step(q, k, v, dout):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, *vjp(dout)

    return jax.jit(step)


def check_sizes(**sizes: float) -> None:
    """Usage error for a size flag below 1 (batch, heads, head_dim, repeats) or a negative --min_time."""
    for name, value in sizes.items():
        if value < (0 if name == "min_time" else 1):
            raise cli.UsageError(f"--{name} must be {'>= 0' if name == 'min_time' else '>= 1'}, got {value}")


def parse_lengths(values: list[str]) -> list[int]:
    """--lengths: positive integers (tokens), else a usage error."""
    try:
        lengths = [int(x) for x in values]
    except ValueError as e:
        raise cli.UsageError(f"--lengths must be integers: {e}") from None
    if min(lengths, default=0) < 1:
        raise cli.UsageError(f"--lengths must be positive integers, got {values}")
    return lengths


def stride_rule(value: str):
    """--stride: an integer l, or 'sqrt' for l = round(sqrt(n)); -> n -> l (tokens), else a usage error."""
    if value == "sqrt":
        return lambda n: round(math.sqrt(n))
    if not (value.isdigit() and int(value) >= 1):
        raise cli.UsageError(f"--stride must be a positive integer or 'sqrt', got {value!r}")
    return lambda n: int(value)
