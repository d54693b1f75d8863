r"""Train-step throughput: tokens/s and achieved FLOP/s as a fraction of this machine's matmul FLOP/s.

    python -m benchmarks.train_step [--configs tiny,small] [--batch_size 2] [--seq_len 512] [--dtype float32]
        [--steps 5] [--out results.json]

For each config, the real `musenet_jax.train` step (forward, backward, AdamW; the configured attention
and remat) runs on random tokens on all local devices. FLOPs per token are counted by
`musenet_jax.flops.train_flops_per_token` (matmuls plus only the attention blocks computed). The
baseline, measured in the same process just before, is the best FLOP/s of a jitted square matmul in
the same dtype. The issue's target: >= 50 % of the matmul FLOP/s for `small`.

On CPU, `--dtype float32` is the meaningful choice (bf16 matmuls are emulated and slow there), and
`--batch_size` / `--seq_len` overrides keep a step to seconds; both are recorded in the output.
"""

from __future__ import annotations

import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from data_pipeline import outputs
from data_pipeline.vocab import Vocab
from launch import cli
from musenet_jax import flops as flops_lib
from musenet_jax import model as model_lib
from musenet_jax import optim, train
from musenet_jax import sharding as sharding_lib

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small"], "Config modules under configs/.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch override (default: the config's).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Context length override (default: the config's).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype override ('' keeps the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one compiling step).")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Vocabulary size of a config with a token table (default: the "
                             "musenet10 vocabulary's 21773 ids); factored configs use that vocabulary's layout.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def matmul_flops_per_second(dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n jitted matmul (the machine's practical peak for this dtype)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def bench_config(name: str) -> dict:
    try:
        config = importlib.import_module(f"configs.{name}").get_config()
    except ModuleNotFoundError:
        raise cli.UsageError(f"--configs: no config module configs/{name}.py") from None
    config.unlock()
    if _SEQ.value:
        config.data.seq_len = _SEQ.value  # a FieldReference: model.max_len follows
    if _BATCH.value:
        config.train.batch_size = _BATCH.value
    if _DTYPE.value:
        config.model.dtype = _DTYPE.value
    # The default musenet10 vocabulary (21773 ids): its output layer is part of the step.
    fields = model_lib.vocab_fields(Vocab())
    if _VOCAB.value:
        if config.model.get("token_embedding") == "factored":
            raise cli.UsageError(f"--vocab_size: config {name} factors the default vocabulary's ids; leave it out")
        fields = {"vocab_size": _VOCAB.value}
    model_config = model_lib.ModelConfig.from_config_dict(config.model, **fields)
    b, t = config.train.batch_size, config.data.seq_len
    mesh = sharding_lib.make_mesh(-1, 1, 1)
    tx = optim.make_optimizer(config.train)
    graphdef, _, shardings = train.abstract_train_state(model_config, tx, mesh)
    state = train.init_train_state(model_config, tx, mesh, seed=0)
    batch_sharding = sharding_lib.data_sharding(mesh, batch_size=b)
    step = train.jit_train_step(graphdef, shardings, batch_sharding, microbatches=config.train.microbatches,
                                schedule=optim.learning_rate_schedule(config.train))
    rng = np.random.default_rng(0)
    host = {"inputs": rng.integers(3, model_config.vocab_size, (b, t)),
            "targets": rng.integers(3, model_config.vocab_size, (b, t)),
            "loss_mask": np.ones((b, t), np.float32), "timing": np.cumsum(rng.integers(0, 3, (b, t)), axis=1),
            "chord": rng.integers(0, 4, (b, t)), "part": np.tile(np.arange(t) * 128 // t, (b, 1)),
            "countdown": np.tile(127 - np.arange(t) * 128 // t, (b, 1)), "sounding": rng.integers(0, 6, (b, t))}
    batch = {k: jax.device_put(v if k == "loss_mask" else v.astype(np.int32), batch_sharding) for k, v in host.items()}
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        try:
            state, metrics = step(state, batch, key)
            jax.block_until_ready(metrics)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise cli.UsageError(f"{name}: a {b} x {t}-token step does not fit in memory here; pass a smaller "
                              "--batch_size / --seq_len") from None
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(_STEPS.value):
            t0 = time.perf_counter()
            state, metrics = step(state, batch, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    flops_per_token = flops_lib.train_flops_per_token(model_config, t)
    return {"config": name, "params": model_lib.count_params(nnx.to_pure_dict(state)[0]), "batch_size": b,
            "seq_len": t, "dtype": model_config.dtype, "attention": model_config.attention_pattern,
            "compile_s": compile_s, "step_s": step_s, "tokens_per_s": b * t / step_s,
            "gflop_per_token": flops_per_token / 1e9, "achieved_gflops": b * t * flops_per_token / step_s / 1e9}


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}")
    if _STEPS.value < 1 or any(v is not None and v < 1 for v in (_BATCH.value, _SEQ.value)):
        raise cli.UsageError("--steps, --batch_size and --seq_len must be >= 1")
    cli.prepare_output_file(_OUT.value)
    try:
        dtype = jnp.dtype(_DTYPE.value or "float32")
    except TypeError:
        raise cli.UsageError(f"--dtype must be a JAX dtype such as float32 or bfloat16, got {_DTYPE.value!r}") from None
    peak = matmul_flops_per_second(dtype)
    rows = [bench_config(name) for name in _CONFIGS.value]
    for r in rows:
        r["fraction_of_matmul"] = r["achieved_gflops"] * 1e9 / peak
    print(f"matmul baseline ({dtype.name}, 2048^3, {jax.device_count()} device(s) of {jax.devices()[0].platform}): "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':8} {'params':>11} {'B x T':>10} {'dtype':>8} {'step s':>8} {'tok/s':>9} {'GFLOP/s':>9} "
          f"{'of matmul':>9}")
    for r in rows:
        print(f"{r['config']:8} {r['params']:>11,} {str(r['batch_size']) + ' x ' + str(r['seq_len']):>10} "
              f"{r['dtype']:>8} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['achieved_gflops']:>9.1f} "
              f"{100 * r['fraction_of_matmul']:>8.1f}%")
    if _OUT.value:
        outputs.write_atomic(_OUT.value, json.dumps({"matmul_gflops": peak / 1e9, "platform": jax.devices()[0].platform,
                                                 "device_count": jax.device_count(), "results": rows}, indent=2))
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
