"""The HTTP face of `musenet_jax.serving`: a JSON API over the scheduler, and the co-composer page.

Routes (the OpenAPI document at /v1/openapi.json describes the API):
- `GET /v1/model`: labels, instruments, limits, model size, context, step, openings, whether WAV is served, whether
  the model can infill.
- `POST /v1/generate` (JSON, `parse_generate`): 202 and a job; `GET /v1/jobs/{id}`: its state and, once done,
  its results; `GET /v1/jobs/{id}/events`: server-sent events (`progress` ..., then `done` / `failed` /
  `cancelled` with the job); `GET /v1/jobs/{id}/samples/{i}.mid` / `.wav`; `DELETE /v1/jobs/{id}`.
  A client that leaves an event stream before its job is final cancels the job (its rows stop at the next
  window); jobs nobody streams are bounded by the scheduler's time limit.
- `POST /v1/infill` (JSON, `parse_infill`): a result's piece with a span rewritten (`musenet_jax.infilling`), as a
  job like generate's; each result also says its `span` (seconds).
- `GET /v1/stats`: the scheduler's counters. `GET /`: the page; `/static/...`: its files (package data).

Safety: every /v1 call needs `Authorization: Bearer <token>` when the app has a token (the server requires one
off loopback); request bodies over the limit are refused while they are read (413); every parameter is checked
and errors are one-line JSON `{"error": ...}` with a 4xx status (a 500 only for a bug, also one line, the
traceback on the server's stderr); no path comes from the client (samples are addressed by job id and index);
no CORS headers, so other sites' pages cannot read the API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import math
import mimetypes
import os
import random
import re
import sys
import traceback
import zipfile

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from data_pipeline import encoding, infill
from data_pipeline.midi_io import MidiError
from data_pipeline.musenet_midi.sources import CORPUS_ZIP
from data_pipeline.vocab import Vocab
from musenet_jax import infilling, sampling, serving

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page's scripts are ES modules, which browsers run only when served with a JavaScript type. StaticFiles
# takes types from `mimetypes`, which reads the system's tables (some map .js to text/plain): set them here.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")
OPENING_SECONDS = 8.0  # the first bars of a bundled piece, offered as an opening
OPENINGS_PER_LABEL = 2
KEEPALIVE_S = 15.0  # an event stream sends a comment this often, so proxies and clients see it alive
_SAMPLE_NAME = re.compile(r"^(\d{1,3})\.(mid|wav)$")
_FIELDS = {"label", "instruments", "seconds", "temperature", "top_p", "top_k", "seed", "num_samples",
           "primer_midi", "primer_seconds", "opening", "continue_from"}
_INFILL_FIELDS = {"label", "tokens", "from_seconds", "to_seconds", "instruments", "temperature", "top_p", "top_k",
                  "seed", "num_samples"}


class BadRequest(HTTPException):
    def __init__(self, message: str, status: int = 400):
        super().__init__(status_code=status, detail=message)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask: piece length (seconds of music), pieces per job, upload size (bytes)."""

    max_seconds: float
    max_num_samples: int
    max_upload_bytes: int
    max_job_seconds: float


@dataclasses.dataclass(frozen=True)
class Opening:
    """The first `OPENING_SECONDS` of a bundled piece: its name, suggested label, instruments and body tokens, and
    the whole piece's MIDI (a shorter `primer_seconds` cuts it again)."""

    name: str
    label: str | None
    instruments: tuple[str, ...]
    seconds: float
    tokens: tuple[int, ...]
    midi: bytes


def load_openings(vocab: Vocab) -> dict[str, Opening]:
    """The first pieces of each folder of the bundled corpus, cut to `OPENING_SECONDS`, in this vocabulary."""
    openings: dict[str, Opening] = {}
    if not os.path.isfile(CORPUS_ZIP):
        return openings
    with zipfile.ZipFile(CORPUS_ZIP) as z:
        by_folder: dict[str, list[str]] = {}
        for name in sorted(z.namelist()):
            if name.lower().endswith((".mid", ".midi")) and "/" in name:
                by_folder.setdefault(name.split("/")[0], []).append(name)
        for folder, names in sorted(by_folder.items()):
            for name in names[:OPENINGS_PER_LABEL]:
                midi = z.read(name)
                try:
                    body, notes, units = encoding.opening_body(midi, vocab, OPENING_SECONDS,
                                                               list(vocab.instruments.names))
                except (MidiError, ValueError):
                    continue
                used = tuple(vocab.instruments.names[i] for i in sorted(set(notes.instrument.tolist())))
                key = f"{folder}/{os.path.splitext(os.path.basename(name))[0]}"
                label = folder if folder in vocab.config.labels else None
                openings[key] = Opening(key, label, used, units * vocab.config.time_unit_ms / 1000.0,
                                        tuple(int(t) for t in body), midi)
    return openings


# -- request checking -----------------------------------------------------------------------------------
def _number(body: dict, key: str, default=None, *, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}")
    if not integer and not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number")
    return value


def parse_generate(body, vocab: Vocab, model_config, limits: Limits, openings: dict[str, Opening]
                   ) -> tuple[list[sampling.Request], float, dict]:
    """A /v1/generate body -> (one `sampling.Request` per sample, target seconds, the settings understood).

    Raises BadRequest (400, one line) for anything the sampler would refuse or the server's limits forbid.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(_FIELDS))}")
    label = _label_field(body)
    instruments = body.get("instruments")
    if (not isinstance(instruments, list) or not instruments or len(instruments) > 64
            or not all(isinstance(x, str) for x in instruments)):
        raise BadRequest("instruments must be a non-empty list of instrument names")
    seconds = _number(body, "seconds")
    if seconds is None:
        raise BadRequest("seconds is required")
    if not 0 < seconds <= limits.max_seconds:
        raise BadRequest(f"seconds must be in (0, {limits.max_seconds:g}] on this server, got {seconds:g}")
    config, seed, num_samples, drawn = _sampling_fields(body, vocab, limits)

    primer, given = None, [k for k in ("primer_midi", "opening", "continue_from") if body.get(k) is not None]
    if len(given) > 1:
        raise BadRequest(f"give at most one of primer_midi, opening, continue_from (got {', '.join(given)})")
    primer_seconds = _number(body, "primer_seconds")
    if primer_seconds is not None and not (primer_seconds > 0 and given and given[0] != "continue_from"):
        raise BadRequest("primer_seconds must be > 0 and needs primer_midi or opening")
    names = [x.strip() for x in instruments]
    if given == ["primer_midi"]:
        data = body["primer_midi"]
        if not isinstance(data, str) or len(data) > 4 * (limits.max_upload_bytes // 3 + 2):
            raise BadRequest(f"primer_midi must be base64 MIDI of at most {limits.max_upload_bytes} bytes", 413
                             if isinstance(data, str) else 400)
        try:
            midi = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("primer_midi is not valid base64") from None
        primer = _opening(midi, vocab, primer_seconds, names)
    elif given == ["opening"]:
        opening = openings.get(body["opening"]) if isinstance(body["opening"], str) else None
        if opening is None:
            raise BadRequest(f"unknown opening {str(body['opening'])[:60]!r}; see /v1/model for the openings")
        primer = list(opening.tokens)
        if primer_seconds is not None:
            primer = _opening(opening.midi, vocab, min(primer_seconds, OPENING_SECONDS), names)
    elif given == ["continue_from"]:
        primer = _result_tokens(body, "continue_from", vocab, model_config, limits)
    settings = {"label": label, "instruments": names, "seconds": seconds, **drawn,
                "primer": given[0] if given else None, "primer_seconds": primer_seconds}
    if given == ["opening"]:
        settings["opening"] = body["opening"]
    primer_array = None if primer is None else np.asarray(primer, np.int32)
    requests = [sampling.Request(label, tuple(names), float(seconds), primer_array, config, seed, i)
                for i in range(num_samples)]
    try:
        sampling.check_request(model_config, vocab, requests[0])
    except sampling.GenerationError as e:
        raise BadRequest(str(e)) from None
    return requests, float(seconds), settings


def _result_tokens(body: dict, key: str, vocab: Vocab, model_config, limits: Limits) -> list[int]:
    """body[key], checked as a result's tokens: 1..cap ids of the vocabulary (cap: the longest piece's tokens)."""
    tokens = body.get(key)
    cap = sampling.default_max_tokens(limits.max_seconds, model_config)
    if (not isinstance(tokens, list) or not tokens or len(tokens) > cap
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab.size for t in tokens)):
        raise BadRequest(f"{key} must be a result's tokens: 1..{cap} token ids in 0..{vocab.size - 1}")
    return tokens


def _label_field(body: dict) -> str | None:
    label = body.get("label")
    if label is not None and not isinstance(label, str):
        raise BadRequest("label must be a string or null")
    return label


def _sampling_fields(body: dict, vocab: Vocab, limits: Limits) -> tuple[sampling.SamplingConfig, int, int, dict]:
    """(sampling config, seed, num_samples, the settings as understood) of a request body; BadRequest if bad."""
    num_samples = _number(body, "num_samples", 1, integer=True)
    if not 1 <= num_samples <= limits.max_num_samples:
        raise BadRequest(f"num_samples must be in 1..{limits.max_num_samples}, got {num_samples}")
    seed = _number(body, "seed", integer=True)
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    if not 0 <= seed < 1 << 31:
        raise BadRequest(f"seed must be in 0..{(1 << 31) - 1}")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _number(body, "top_k", 0, integer=True)
    if not 0 < temperature <= 100:
        raise BadRequest(f"temperature must be in (0, 100], got {temperature:g}")
    if not 0 <= top_k <= vocab.size:
        raise BadRequest(f"top_k must be in 0..{vocab.size} (0: off), got {top_k}")
    try:
        config = sampling.SamplingConfig(float(temperature), int(top_k), float(top_p))
    except sampling.GenerationError as e:
        raise BadRequest(str(e)) from None
    return config, seed, num_samples, {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                                       "num_samples": num_samples}


def parse_infill(body, vocab: Vocab, model_config, limits: Limits) -> tuple[list, float, dict]:
    """A /v1/infill body -> (one `infilling.InfillTask` per sample, the span's seconds, the settings understood).

    The body names a result's piece (`tokens`, its body tokens), the span (`from_seconds`, `to_seconds`) and
    optionally the `instruments` to regenerate in it (default: every one); the rest is as for /v1/generate.
    Raises BadRequest (400, one line) for anything the infiller would refuse.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _INFILL_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(_INFILL_FIELDS))}")
    if not vocab.config.infill:
        raise BadRequest("this model's vocabulary has no infilling tokens (format v1, from before infilling): it can "
                         "only continue a piece")
    label = _label_field(body)
    tokens = np.asarray(_result_tokens(body, "tokens", vocab, model_config, limits), np.int64)
    if not np.isin(vocab.kind[tokens], sampling.BODY_KINDS).all():
        raise BadRequest("tokens must be a piece's body (waits and notes), as a result gives them")
    notes, duration = encoding.decode_tokens(tokens, vocab)
    unit_s = vocab.config.time_unit_ms / 1000.0
    lo, hi = _number(body, "from_seconds"), _number(body, "to_seconds")
    if lo is None or hi is None:
        raise BadRequest("from_seconds and to_seconds are required")
    if not 0 <= lo < hi:
        raise BadRequest(f"the span {lo:g}..{hi:g} s is empty or negative")
    if hi > duration * unit_s + 1e-9:
        raise BadRequest(f"the span ends at {hi:g} s, after the piece's {duration * unit_s:g} s")
    span = infill.Span(round(lo / unit_s), round(hi / unit_s))
    names = body.get("instruments")
    if names is not None:
        present = {vocab.instruments.names[i] for i in np.unique(notes.instrument).tolist()}
        if (not isinstance(names, list) or not names or len(names) > 64
                or not all(isinstance(x, str) and x.strip() in present for x in names)):
            raise BadRequest(f"instruments must be a non-empty list of the piece's instruments "
                             f"({', '.join(sorted(present)) or 'none'}) or null")
        span = infill.Span(span.start, span.end, tuple(sorted({vocab.instruments.index(x.strip()) for x in names})))
    config, seed, num_samples, drawn = _sampling_fields(body, vocab, limits)
    try:
        tasks = [infilling.InfillTask(model_config.max_len, vocab, notes, duration, span, label=label,
                                      sampling_config=config, seed=seed, sample=i) for i in range(num_samples)]
        sampling.check_request(model_config, vocab, tasks[0].next_request())  # asking again gives the same chunk
    except sampling.GenerationError as e:
        raise BadRequest(str(e)) from None
    settings = {"label": label, "from_seconds": lo, "to_seconds": hi, "instruments": names, **drawn}
    return tasks, (span.end - span.start) * unit_s, settings


def _opening(midi: bytes, vocab: Vocab, seconds: float | None, instruments: list[str]) -> list[int]:
    unknown = [n for n in instruments if n not in vocab.instruments.names]
    if unknown:  # named before the primer is read, as the sampler would name it
        raise BadRequest(f"unknown instrument(s) {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(vocab.instruments.names)}")
    try:
        body, _, _ = encoding.opening_body(midi, vocab, seconds, instruments)
    except MidiError as e:
        raise BadRequest(f"the primer is not a usable MIDI file: {e.reason}") from None
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return body.tolist()


# -- the application ------------------------------------------------------------------------------------
def create_app(scheduler: serving.Scheduler, *, model_info: dict, limits: Limits, token: str | None = None,
               openings: dict[str, Opening] | None = None) -> Starlette:
    """The ASGI application (module doc). `model_info`: what /v1/model says of the model (size, step...)."""
    vocab, model_config = scheduler.vocab, scheduler.model.config
    openings = load_openings(vocab) if openings is None else openings

    def job_or_404(request: Request) -> serving.Job:
        job = scheduler.get(request.path_params["job_id"])
        if job is None:
            raise BadRequest("no such job (finished jobs are kept for a while only)", 404)
        return job

    def job_json(job: serving.Job) -> dict:
        view = scheduler.view(job)
        base = f"/v1/jobs/{job.id}"
        view["results"] = [{"index": i, "tokens": r.tokens.tolist(), "primer_tokens": r.primer_tokens,
                            "seconds": r.seconds, "ended": r.ended, "notes": r.notes, "span": r.span,
                            "midi_url": f"{base}/samples/{i}.mid",
                            "wav_url": f"{base}/samples/{i}.wav" if scheduler.audio else None}
                           for i, r in enumerate(view["results"])]
        view["urls"] = {"self": base, "events": f"{base}/events"}
        return view

    async def model(request: Request):
        return JSONResponse({
            "labels": list(vocab.config.labels), "instruments": list(vocab.instruments.names), **model_info,
            "limits": dataclasses.asdict(limits), "audio": scheduler.audio is not None,
            "time_unit_ms": vocab.config.time_unit_ms, "infill": vocab.config.infill,
            "openings": [{"name": o.name, "label": o.label, "instruments": list(o.instruments),
                          "seconds": o.seconds} for o in openings.values()]})

    async def queue(request: Request, max_bytes: int, parse) -> JSONResponse:
        """A JSON body read (at most `max_bytes`), parsed off the event loop (reading MIDI and checking primers is
        CPU work) into the scheduler's arguments, and queued: 202 and the job's address."""
        if "json" not in request.headers.get("content-type", ""):
            raise BadRequest("send the request as JSON (Content-Type: application/json)", 415)
        raw = await _read_body(request, max_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON: {str(e).splitlines()[0][:120]}") from None
        submit = await asyncio.to_thread(parse, body)
        try:
            job = scheduler.submit(*submit)
        except serving.QueueFull as e:
            return JSONResponse({"error": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})
        return JSONResponse({"id": job.id, "status": job.status, "seed": job.settings["seed"],
                             "urls": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"}},
                            status_code=202)

    async def generate(request: Request):
        return await queue(request, 4 * (limits.max_upload_bytes // 3 + 2) + 65536,
                           lambda body: parse_generate(body, vocab, model_config, limits, openings))

    async def infill_span(request: Request):
        def parse(body):
            tasks, seconds, settings = parse_infill(body, vocab, model_config, limits)
            return [], seconds, settings, tasks

        return await queue(request, 8 * sampling.default_max_tokens(limits.max_seconds, model_config) + 65536, parse)

    async def get_job(request: Request):
        return JSONResponse(job_json(job_or_404(request)))

    async def delete_job(request: Request):
        job = job_or_404(request)
        scheduler.cancel(job)
        return JSONResponse({"id": job.id, "status": scheduler.view(job)["status"]})

    async def events(request: Request):
        job = job_or_404(request)

        async def stream():
            event = job.listen()
            final, sent = False, None
            try:
                while True:
                    view = scheduler.view(job)
                    if view["status"] in serving.FINAL:
                        final = True
                        yield f"event: {view['status']}\ndata: {json.dumps(job_json(job))}\n\n"
                        return
                    progress = {"status": view["status"], "progress": view["progress"],
                                "target_seconds": view["target_seconds"]}
                    if progress != sent:
                        sent = progress
                        yield f"event: progress\ndata: {json.dumps(progress)}\n\n"
                    event.clear()
                    try:
                        await asyncio.wait_for(event.wait(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": still working\n\n"
            finally:
                job.unlisten(event)
                if not final:  # the client left before the end: nobody is waiting for these pieces
                    scheduler.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sample(request: Request):
        job = job_or_404(request)
        match = _SAMPLE_NAME.match(request.path_params["name"])
        if match is None:
            raise BadRequest("samples are named <index>.mid or <index>.wav", 404)
        view = scheduler.view(job)
        if view["status"] != "done":
            raise BadRequest(f"the job is {view['status']}, not done", 409)
        index, kind = int(match.group(1)), match.group(2)
        if index >= len(view["results"]):
            raise BadRequest(f"the job has samples 0..{len(view['results']) - 1}", 404)
        result = view["results"][index]
        filename = f"musenet-{job.id[:8]}-{index}.{kind}"
        headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
        if kind == "mid":
            return Response(result.midi, media_type="audio/midi", headers=headers)
        if scheduler.audio is None:
            raise BadRequest("this server does not render audio (fluidsynth or a soundfont is missing)", 404)
        try:
            data = await asyncio.to_thread(scheduler.wav, result)
        except Exception as e:  # fluidsynth failing is the server's problem, said in one line
            return JSONResponse({"error": f"audio rendering failed: {str(e).splitlines()[0][:200]}"}, 500)
        return Response(data, media_type="audio/wav", headers=headers)

    async def stats(request: Request):
        return JSONResponse(scheduler.stats())

    async def openapi(request: Request):
        return JSONResponse(openapi_document(limits))

    async def page(request: Request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail if isinstance(exc.detail, str) else "bad request"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server goes on"}, 500)

    routes = [
        Route("/", page),
        Route("/v1/model", model),
        Route("/v1/openapi.json", openapi),
        Route("/v1/stats", stats),
        Route("/v1/generate", generate, methods=["POST"]),
        Route("/v1/infill", infill_span, methods=["POST"]),
        Route("/v1/jobs/{job_id}", get_job),
        Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/events", events),
        Route("/v1/jobs/{job_id}/samples/{name}", sample),
    ]
    if os.path.isdir(STATIC_DIR):
        routes.append(Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"))
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    return _Guard(app, token)


class _Guard:
    """ASGI middleware: the bearer token on /v1 and a one-line JSON 4xx for requests that fail it."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.token and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                response = JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"the request body is larger than this server's limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is larger than this server's limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def openapi_document(limits: Limits) -> dict:
    """The OpenAPI 3.1 description of the /v1 API."""
    error = {"description": "one-line error", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
    job_ref = {"$ref": "#/components/schemas/Job"}
    generate_schema = {"type": "object", "additionalProperties": False, "required": ["instruments", "seconds"],
                       "properties": {
                           "label": {"type": ["string", "null"], "description": "one of /v1/model labels"},
                           "instruments": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": limits.max_seconds,
                                       "description": "length of the music, primer included"},
                           "temperature": {"type": "number", "default": 1.0},
                           "top_p": {"type": "number", "default": 1.0}, "top_k": {"type": "integer", "default": 0},
                           "seed": {"type": ["integer", "null"], "description": "null: the server picks one"},
                           "num_samples": {"type": "integer", "minimum": 1, "maximum": limits.max_num_samples},
                           "primer_midi": {"type": ["string", "null"], "contentEncoding": "base64",
                                           "description": f"a MIDI file, at most {limits.max_upload_bytes} bytes"},
                           "primer_seconds": {"type": ["number", "null"]},
                           "opening": {"type": ["string", "null"], "description": "a /v1/model opening name"},
                           "continue_from": {"type": ["array", "null"], "items": {"type": "integer"},
                                             "description": "an earlier result's tokens, to continue it"}}}
    infill_schema = {"type": "object", "additionalProperties": False,
                     "required": ["tokens", "from_seconds", "to_seconds"], "properties": {
                         "tokens": {"type": "array", "items": {"type": "integer"},
                                    "description": "a result's tokens: the piece whose span is rewritten"},
                         "from_seconds": {"type": "number", "minimum": 0},
                         "to_seconds": {"type": "number", "description": "the span's end, within the piece"},
                         "instruments": {"type": ["array", "null"], "items": {"type": "string"},
                                         "description": "the piece's instruments to regenerate (null: all)"},
                         **{k: generate_schema["properties"][k] for k in ("label", "temperature", "top_p", "top_k",
                                                                           "seed", "num_samples")}}}
    result = {"type": "object", "properties": {
        "index": {"type": "integer"}, "tokens": {"type": "array", "items": {"type": "integer"}},
        "primer_tokens": {"type": "integer"}, "seconds": {"type": "number"}, "ended": {"type": "boolean"},
        "notes": {"type": "array", "items": {"type": "object"}}, "midi_url": {"type": "string"},
        "wav_url": {"type": ["string", "null"]},
        "span": {"type": ["array", "null"], "items": {"type": "number"}, "description": "an infill's (from, to) s"}}}
    job = {"type": "object", "properties": {
        "id": {"type": "string"}, "status": {"enum": ["queued", "running", *serving.FINAL]},
        "error": {"type": ["string", "null"]}, "progress": {"type": "array", "items": {"type": "number"}},
        "target_seconds": {"type": "number"}, "results": {"type": "array", "items": result}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": job_ref}}}
    job_param = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0", "info": {"title": "musenet-serve", "version": "1"},
        "components": {"schemas": {"Generate": generate_schema, "Infill": infill_schema, "Job": job},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/model": {"get": {"summary": "the model: labels, instruments, limits, openings",
                                  "responses": {"200": {"description": "OK"}, "401": error}}},
            "/v1/generate": {"post": {
                "summary": "queue a job of num_samples pieces",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Generate"}}}},
                "responses": {"202": {"description": "queued"}, "400": error, "401": error, "413": error,
                              "415": error, "429": error}}},
            "/v1/infill": {"post": {
                "summary": "queue a job of num_samples rewrites of a span of a result's piece",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Infill"}}}},
                "responses": {"202": {"description": "queued"}, "400": error, "401": error, "413": error,
                              "415": error, "429": error}}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "a job's state and results", "parameters": job_param,
                        "responses": {"200": ok, "404": error}},
                "delete": {"summary": "cancel a job", "parameters": job_param,
                           "responses": {"200": {"description": "OK"}, "404": error}}},
            "/v1/jobs/{job_id}/events": {"get": {
                "summary": "server-sent events: progress, then done / failed / cancelled with the job",
                "parameters": job_param,
                "responses": {"200": {"description": "text/event-stream"}, "404": error}}},
            "/v1/jobs/{job_id}/samples/{name}": {"get": {
                "summary": "a result as MIDI (<index>.mid) or WAV (<index>.wav)",
                "parameters": [*job_param, {"name": "name", "in": "path", "required": True,
                                            "schema": {"type": "string", "pattern": _SAMPLE_NAME.pattern}}],
                "responses": {"200": {"description": "audio/midi or audio/wav"}, "404": error, "409": error}}},
            "/v1/stats": {"get": {"summary": "pieces and windows decoded, rows decoded together, compiled loops, queue",
                                  "responses": {"200": {"description": "OK"}}}},
        },
    }
