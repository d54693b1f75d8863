r"""musenet-serve: an exported model behind a JSON API and the co-composer page, on one port.

    musenet-serve --model=runs/main_job/export            # then open http://127.0.0.1:8000/
    musenet-serve --model=EXPORT --host=0.0.0.0 --port=8080 --token=SECRET --max_batch=8

The API (`musenet_jax.web`; OpenAPI at /v1/openapi.json) queues generation jobs; waiting jobs are decoded together
in batches of up to --max_batch pieces (`musenet_jax.serving`). At most --queue_size jobs wait (then 429 with
Retry-After); a job decoding longer than --max_job_seconds fails; pieces are at most --max_seconds long (and
the model's own limit); an uploaded primer is at most --max_upload_bytes.

Safe by default: it listens on loopback (127.0.0.1) only. Any other --host needs a bearer token (--token, or the
MUSENET_SERVE_TOKEN environment variable, which keeps it out of process listings); the page then takes it from
its URL: http://HOST:PORT/#token=SECRET. No CORS headers are sent. Ctrl-C or SIGTERM stops it.

Exit codes: 0 stopped; 2 a usage error; 1 an unreadable export or a port that cannot be bound.
"""

from __future__ import annotations

import ipaddress
import os

from absl import flags

from launch import cli

_MODEL = flags.DEFINE_string("model", None, "Export directory written by musenet-export (required).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; other than loopback needs --token.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at start).")
_TOKEN = flags.DEFINE_string("token", None, "Bearer token every API call must carry (default: "
                             "$MUSENET_SERVE_TOKEN; required off loopback).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4, "Most pieces decoded together; also the most one job may ask.")
_QUEUE_SIZE = flags.DEFINE_integer("queue_size", 32, "Most jobs waiting to be decoded.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 240.0, "Longest piece a request may ask for, in seconds.")
_MAX_JOB_SECONDS = flags.DEFINE_float("max_job_seconds", 600.0, "A job decoding longer than this (wall seconds) "
                                      "fails.")
_MAX_UPLOAD_BYTES = flags.DEFINE_integer("max_upload_bytes", 2 << 20, "Largest primer MIDI upload, in bytes.")
_WARMUP = flags.DEFINE_bool("warmup", False, "Compile the decode loop for every batch size before serving.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_flags() -> str | None:
    """Usage errors before the model loads; returns the token."""
    if not _MODEL.value:
        raise cli.UsageError("--model is required")
    if not 0 <= _PORT.value <= 65535:
        raise cli.UsageError(f"--port must be in 0..65535, got {_PORT.value}")
    for flag, low in ((_MAX_BATCH, 1), (_QUEUE_SIZE, 1), (_MAX_UPLOAD_BYTES, 1)):
        if flag.value < low:
            raise cli.UsageError(f"--{flag.name} must be >= {low}, got {flag.value}")
    if not _MAX_SECONDS.value > 0 or not _MAX_JOB_SECONDS.value > 0:
        raise cli.UsageError("--max_seconds and --max_job_seconds must be > 0")
    token = _TOKEN.value or os.environ.get("MUSENET_SERVE_TOKEN") or None
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        raise cli.UsageError("the token must be at least 8 printable characters without spaces")
    if not is_loopback(_HOST.value) and token is None:
        raise cli.UsageError(f"--host {_HOST.value} is reachable from other machines: give --token (or set "
                             "MUSENET_SERVE_TOKEN), or serve on 127.0.0.1")
    return token


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    token = check_flags()
    import uvicorn  # after flag checks: these imports (JAX) take seconds

    from data_pipeline import rendering
    from musenet_jax import export, sampling, serving, web
    from musenet_jax import model as model_lib

    meta, _, _ = export.read_export_config(_MODEL.value)  # ExportError (a ValueError): one line
    model, vocab = export.load_export(_MODEL.value)
    cfg = model.config
    max_seconds = min(_MAX_SECONDS.value, sampling.max_seconds(cfg, vocab))
    fluidsynth, soundfont = rendering.find_fluidsynth(), rendering.find_soundfont()
    audio = (fluidsynth, soundfont) if fluidsynth and soundfont else None
    scheduler = serving.Scheduler(model, vocab, max_batch=_MAX_BATCH.value, queue_size=_QUEUE_SIZE.value,
                                  max_job_seconds=_MAX_JOB_SECONDS.value, audio=audio, max_seconds=max_seconds)
    try:
        if _WARMUP.value:
            serving.warm_up(scheduler)
        info = {"step": int(meta["step"]), "model": {
            "parameters": model_lib.count_params(model), "layers": cfg.num_layers, "d_model": cfg.d_model,
            "heads": cfg.num_heads, "context_tokens": cfg.max_len, "vocab_size": cfg.vocab_size}}
        limits = web.Limits(max_seconds=max_seconds, max_num_samples=_MAX_BATCH.value,
                            max_upload_bytes=_MAX_UPLOAD_BYTES.value, max_job_seconds=_MAX_JOB_SECONDS.value)
        app = web.create_app(scheduler, model_info=info, limits=limits, token=token)
        # uvicorn's own log stays quiet: requests are not logged, and errors of the app print their traceback
        # through the app's handler; a port that cannot be bound is said once, below.
        config = uvicorn.Config(app, host=_HOST.value, port=_PORT.value, log_level="critical", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        if not _run_server(config):
            raise OSError(f"could not listen on {_HOST.value}:{_PORT.value} (in use, or not an address here)")
    finally:
        scheduler.close()


def _run_server(config) -> bool:
    """Runs uvicorn until it stops, printing the address it listens on once it does (the port, when --port=0);
    False if it never listened (uvicorn exits 1 when it cannot bind)."""
    import uvicorn

    listened = False

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            nonlocal listened
            await super().startup(sockets)
            listened = self.started
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"musenet-serve: http://{shown}:{port}/ ({_MODEL.value}; Ctrl-C stops)", flush=True)

    server = Server(config)
    try:
        server.run()
    except SystemExit:
        pass
    return listened


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
