"""Decoding speed: the KV-cached step (sparse and dense caches) against naive re-encoding, by position.

Models (random init, fp32; the real default vocabulary, so the output layer is realistic):
  strided  D 256, 4 layers x 4 heads x 64, MLP 1024, max_len 8448, strided l = 128 interleaved
           (local / summary layers: caches of l + 1 and one residue row of ceil(L / l) entries per step);
  dense    the same with dense attention (every layer caches and reads all L positions).
Rows, for batch 1 and 8 at positions 256, 1k, 4k, 8k:
  cached   `MuseNet.decode_step` from position p: --steps steps in one jitted lax.fori_loop (as in the
           sampling loop; the cache is donated, so it is updated in place), time / steps; the positions
           take turns within each repeat so that load changes on a shared machine hit them alike;
  naive    the full forward over the p-token prefix for one next token (the trunk over p tokens plus the
           output layer on the last one: the way to decode without a cache).
ms/step is the time to produce one token in every row of the batch; tok/s = batch / that.
Timing is warm (after a compile + warm-up call), the median of --repeats calls. Both models scan their layers
(as the configs do); see musenet_jax.decoding for what that costs the dense cache.

Ratios (the issue's targets): strided ms/step at the last position / at the first (target <= 1.3: time per
token must not grow with position), and naive / cached-strided at the second-to-last position (4k; target
>= 50x).

Usage:
  python -m benchmarks.generate [--out=results.json] [--quick]
--quick: tiny sizes (seconds; for the smoke test), not a measurement.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from data_pipeline import features as features_lib
from data_pipeline import outputs
from data_pipeline.vocab import Vocab
from launch import cli
from musenet_jax import decoding
from musenet_jax import model as model_lib

_OUT = flags.DEFINE_string("out", None, "JSON file for the results (written atomically); none: table only.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes, for a smoke run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per case (the median is reported).")
_STEPS = flags.DEFINE_integer("steps", 8, "Decode steps per timed call of the cached step.")
_NAIVE_MAX_TOKENS = flags.DEFINE_integer(
    "naive_max_tokens", None, "Skip naive rows with batch * position above this (default: 8192, quick: 128).")

FULL = dict(d_model=256, num_heads=4, head_dim=64, mlp_dim=1024, num_layers=4, max_len=8448, stride=128,
            positions=(256, 1024, 4096, 8192), batches=(1, 8), naive_max_tokens=8192)
QUICK = dict(d_model=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=2, max_len=160, stride=8,
             positions=(16, 64, 128), batches=(1, 2), naive_max_tokens=128, vocab_size=96)


def model_config(sizes: dict, pattern: str, vocab_size: int) -> model_lib.ModelConfig:
    return model_lib.ModelConfig(
        vocab_size=vocab_size, d_model=sizes["d_model"], num_heads=sizes["num_heads"], head_dim=sizes["head_dim"],
        mlp_dim=sizes["mlp_dim"], num_layers=sizes["num_layers"], max_len=sizes["max_len"],
        attention_pattern=pattern, attention_stride=sizes["stride"] if pattern != "dense" else None,
        attention_combination="interleaved", dtype="float32", remat_policy="off", attention_impl="xla",
    )


def _features(batch: int, length: int | None = None) -> dict:
    shape = (batch,) if length is None else (batch, length)
    return {name: jnp.zeros(shape, jnp.int32) for name in features_lib.FEATURE_NAMES}


def _median_seconds(call, repeats: int) -> float:
    call()  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_cached(model, batch: int, positions, steps: int, repeats: int) -> dict[int, float]:
    """Seconds per decode step (one token per row) at each position: `steps` steps in one jitted loop."""
    graphdef, state = nnx.split(model)

    def run(state, cache, start):
        tokens = jnp.full((batch,), 5, jnp.int32)

        def body(i, carry):
            cache, acc = carry
            logits, cache = nnx.merge(graphdef, state).decode_step(tokens, _features(batch), start + i, cache)
            return cache, acc + logits[:, 0]

        return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((batch,), jnp.float32)))

    run = jax.jit(run, donate_argnums=1)
    holder = {"cache": model.init_cache(batch)}

    def call(p):
        holder["cache"], acc = run(state, holder["cache"], jnp.int32(p))
        jax.block_until_ready(acc)

    call(positions[0])  # compile + warm-up (the position is traced: one compile for all)
    times = {p: [] for p in positions}
    # Positions take turns within each repeat, so that load changes on a shared machine hit all alike.
    # The step's cost does not depend on the cache's contents, only on its layout and the position.
    for _ in range(repeats):
        for p in positions:
            t0 = time.perf_counter()
            call(p)
            times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(t) / steps for p, t in times.items()}


def time_naive(model, batch: int, position: int, repeats: int) -> float:
    """Seconds for one next token by a full forward over a `position`-token prefix."""
    graphdef, state = nnx.split(model)
    cfg = model.config

    @jax.jit
    def run(state, tokens, feats):
        m = nnx.merge(graphdef, state)
        _, hidden = m(tokens, feats, return_hidden=True)  # the full logits are unused, so XLA drops them
        table = m.head[...] if m.head is not None else m.token_embed[...].T
        return hidden[:, -1] @ table[:, : cfg.vocab_size]

    tokens = jnp.full((batch, position), 5, jnp.int32)
    feats = _features(batch, position)
    return _median_seconds(lambda: jax.block_until_ready(run(state, tokens, feats)), repeats)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    if _REPEATS.value < 1 or _STEPS.value < 1:
        raise cli.UsageError("--repeats and --steps must be >= 1")
    cli.prepare_output_file(_OUT.value)
    sizes = QUICK if _QUICK.value else FULL
    vocab_size = sizes.get("vocab_size", Vocab().size)
    positions, batches = sizes["positions"], sizes["batches"]
    if positions[-1] + _STEPS.value > sizes["max_len"]:
        raise cli.UsageError(f"--steps={_STEPS.value} runs past max_len {sizes['max_len']}")
    reps, steps = _REPEATS.value, _STEPS.value
    naive_max = sizes["naive_max_tokens"] if _NAIVE_MAX_TOKENS.value is None else _NAIVE_MAX_TOKENS.value
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; vocab {vocab_size}; "
          f"{'quick sizes' if _QUICK.value else 'full sizes'}")

    rows, notes = [], []
    models = {name: model_lib.MuseNet(model_config(sizes, name, vocab_size), rngs=nnx.Rngs(params=0))
              for name in ("strided", "dense")}
    cache_tokens = {}
    for name, model in models.items():
        stored = read = 0
        for kind in model.config.layer_kinds():
            for spec, count in model.config.attention_groups(kind):
                s, r = decoding.cache_tokens(spec, sizes["max_len"])
                stored, read = stored + s * count, read + r * count
        cache_tokens[name] = {"stored_head_tokens": stored, "read_head_tokens_per_step": read}
    for batch in batches:
        for name, model in models.items():
            for p, sec in time_cached(model, batch, positions, steps, reps).items():
                rows.append(dict(method=f"cached-{name}", batch=batch, position=p, seconds=sec))
                _print_row(rows[-1], header=len(rows) == 1)
        for p in positions:
            if batch * p > naive_max:
                notes.append(f"naive batch {batch} position {p}: skipped (batch * position > --naive_max_tokens)")
                continue
            rows.append(dict(method="naive-strided", batch=batch, position=p,
                             seconds=time_naive(models["strided"], batch, p, reps)))
            _print_row(rows[-1], header=False)
    for r in rows:
        r["ms_per_step"] = 1000 * r["seconds"]
        r["tokens_per_s"] = r["batch"] / r["seconds"]

    def seconds(method, batch, p):
        return next((r["seconds"] for r in rows if (r["method"], r["batch"], r["position"]) == (method, batch, p)),
                    None)

    ratios = {}
    for batch in batches:
        first, last, mid = positions[0], positions[-1], positions[-2]
        growth = seconds("cached-strided", batch, last) / seconds("cached-strided", batch, first)
        naive = seconds("naive-strided", batch, mid)
        ratios[f"batch{batch}"] = {
            f"strided_step_{last}_over_{first}": growth,
            f"naive_over_cached_strided_at_{mid}": None if naive is None else naive / seconds(
                "cached-strided", batch, mid),
            f"dense_cache_over_strided_cache_at_{last}": seconds("cached-dense", batch, last) / seconds(
                "cached-strided", batch, last),
        }
    print("ratios (targets: strided step growth <= 1.3, naive / cached >= 50):")
    for batch, values in ratios.items():
        print(f"  {batch}: " + ", ".join(f"{k} = {'-' if v is None else format(v, '.2f')}" for k, v in values.items()))
    for note in notes:
        print(f"note: {note}")
    report = {
        "benchmark": "decoding: KV-cached step vs naive",
        "config": {**{k: v for k, v in sizes.items() if k not in ("positions", "batches", "naive_max_tokens")},
                   "vocab_size": vocab_size, "positions": list(positions), "batches": list(batches),
                   "steps": steps, "repeats": reps, "naive_max_tokens": naive_max, "quick": _QUICK.value,
                   "dtype": "float32", "combination": "interleaved"},
        "cache_tokens": cache_tokens,
        "machine": {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "platform": platform.platform(),
                    "jax": jax.__version__},
        "rows": rows,
        "ratios": ratios,
        "targets": {"strided_step_growth_max": 1.3, "naive_over_cached_min": 50.0},
        "notes": notes,
    }
    if _OUT.value:
        outputs.write_atomic(_OUT.value, json.dumps(report, indent=1) + "\n")
        print(f"wrote {_OUT.value}")


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'method':>15} {'batch':>5} {'position':>8} {'ms/step':>9} {'tok/s':>9}")
    print(f"{r['method']:>15} {r['batch']:>5} {r['position']:>8} {1000 * r['seconds']:>9.3f} "
          f"{r['batch'] / r['seconds']:>9.1f}")


if __name__ == "__main__":
    cli.run(main)
