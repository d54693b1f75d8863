r"""Serving throughput and latency: batched decoding against one request at a time, on one machine, one run.

    python -m benchmarks.serve --model=runs/main_job/export [--out=DIR] [--seconds=20] [--clients=1,4,16]

Two real `musenet-serve` processes over the same export, one after the other: `one-at-a-time` (--max_batch=1)
and `batched` (--max_batch=--max_batch), both started with --warmup so that compiling the decode loop is not
timed. For each number of concurrent clients C in --clients, C threads each ask --requests_per_client pieces of
--seconds (one piece per request, distinct seeds, the main job's settings: bach on piano, temperature 0.8,
nucleus 0.9) over HTTP and follow each job's event stream to its end, as the page does. Rows: pieces/s over the
wall time of the round, latency (submit to final event) p50 / p95, the pieces decoded and the windows by
the number of rows decoded together. The ratio
is batched pieces/s over one-at-a-time pieces/s at the same C.

Writes DIR/serve.json: {"model", "seconds", "settings", "rows": [{"server", "clients", "pieces", "wall_s",
"pieces_per_s", "latency_p50_s", "latency_p95_s", "rows", "windows_by_rows"}], "ratios": {C: ratio}, "machine"}.
--quick: 1 s pieces, one request per client (a smoke run, not a measurement).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import time

import numpy as np
from absl import flags

from data_pipeline import outputs
from launch import cli

_MODEL = flags.DEFINE_string("model", None, "Export directory (musenet-export); required.")
_OUT = flags.DEFINE_string("out", None, "Output folder for serve.json (none: table only).")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Length of each requested piece (seconds of music).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16"], "Numbers of concurrent clients, one round each.")
_REQUESTS = flags.DEFINE_integer("requests_per_client", 1, "Pieces each client asks for, one after the other.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "The batched server's --max_batch.")
_LABEL = flags.DEFINE_string("label", "bach", "Label of the requested pieces (none: no label).")
_INSTRUMENTS = flags.DEFINE_list("instruments", ["piano"], "Instruments of the requested pieces.")
_QUICK = flags.DEFINE_bool("quick", False, "1 s pieces: a smoke run.")


def round_of(server, clients: int, requests_per_client: int, seconds: float, label, instruments, seed0: int) -> dict:
    """C clients, each asking `requests_per_client` pieces in turn; pieces/s and latency percentiles."""
    before = server.json("GET", "/v1/stats")[1]

    def client(c: int) -> list[float]:
        latencies = []
        for r in range(requests_per_client):
            t0 = time.perf_counter()
            job = server.generate(label=label, instruments=instruments, seconds=seconds, temperature=0.8,
                                  top_p=0.9, seed=seed0 + c * requests_per_client + r)
            if job["status"] != "done":
                raise RuntimeError(f"a benchmark job ended {job['status']}: {job.get('error')}")
            latencies.append(time.perf_counter() - t0)
        return latencies

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [x for per_client in pool.map(client, range(clients)) for x in per_client]
    wall = time.perf_counter() - t0
    after = server.json("GET", "/v1/stats")[1]
    formed = {k: v - before["windows_by_rows"].get(k, 0) for k, v in after["windows_by_rows"].items()
              if v - before["windows_by_rows"].get(k, 0)}
    return {"clients": clients, "pieces": len(latencies), "wall_s": wall, "pieces_per_s": len(latencies) / wall,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p95_s": float(np.percentile(latencies, 95)),
            "rows": after["jobs"].get("rows", 0) - before["jobs"].get("rows", 0), "windows_by_rows": formed}


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value:
        raise cli.UsageError("--model is required")
    try:
        clients = [int(c) for c in _CLIENTS.value]
    except ValueError:
        raise cli.UsageError(f"--clients must be integers, got {','.join(_CLIENTS.value)}") from None
    if not clients or min(clients) < 1 or _REQUESTS.value < 1 or _MAX_BATCH.value < 1:
        raise cli.UsageError("--clients, --requests_per_client and --max_batch must be >= 1")
    seconds = 1.0 if _QUICK.value else _SECONDS.value
    if not seconds > 0:
        raise cli.UsageError("--seconds must be > 0")
    if _OUT.value:
        cli.prepare_output_dir(_OUT.value)
    from launch.serve_client import serve

    label = None if _LABEL.value.lower() == "none" else _LABEL.value
    rows = []
    queue = str(max(clients) * _REQUESTS.value + 1)  # never refuse a benchmark client
    for name, batch in (("one-at-a-time", 1), ("batched", _MAX_BATCH.value)):
        with serve(_MODEL.value, f"--max_batch={batch}", f"--queue_size={queue}", "--warmup") as server:
            for c in clients:
                row = {"server": name, "max_batch": batch,
                       **round_of(server, c, _REQUESTS.value, seconds, label, _INSTRUMENTS.value, seed0=1000 * c)}
                rows.append(row)
                print(f"{name:<14} clients {c:>3}: {row['pieces']:>3} pieces in {row['wall_s']:7.1f} s = "
                      f"{row['pieces_per_s']:6.3f} pieces/s; latency p50 {row['latency_p50_s']:6.1f} s, "
                      f"p95 {row['latency_p95_s']:6.1f} s; windows by rows {row['windows_by_rows']}", flush=True)
    ratios = {}
    for c in clients:
        one, many = (next(r for r in rows if r["server"] == s and r["clients"] == c)
                     for s in ("one-at-a-time", "batched"))
        ratios[str(c)] = many["pieces_per_s"] / one["pieces_per_s"]
        print(f"clients {c:>3}: batched / one-at-a-time throughput {ratios[str(c)]:.2f}x")
    if _OUT.value:
        report = {"model": _MODEL.value, "seconds": seconds, "quick": _QUICK.value,
                  "settings": {"label": label, "instruments": _INSTRUMENTS.value, "temperature": 0.8, "top_p": 0.9,
                               "max_batch": _MAX_BATCH.value, "requests_per_client": _REQUESTS.value},
                  "rows": rows, "ratios": ratios,
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
        path = os.path.join(_OUT.value, "serve.json")
        outputs.write_atomic(path, json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
