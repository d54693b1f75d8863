"""A `musenet-serve` process and a small HTTP client for it (standard library only), for the tests and
`benchmarks/serve.py`: `serve(export_dir, *flags)` starts one on a free loopback port and yields a `Server`."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

START_TIMEOUT_S = 180


@dataclasses.dataclass
class Server:
    """A running server: its base URL (http://127.0.0.1:PORT), process and everything it printed so far."""

    url: str
    process: subprocess.Popen
    token: str | None = None
    output: list[str] = dataclasses.field(default_factory=list)

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None,
                timeout: float = 300.0) -> tuple[int, dict, bytes]:
        """(status, headers, body bytes). `body` is sent as JSON; `raw` as is."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        send = dict(headers or {})
        if self.token and "Authorization" not in send:
            send["Authorization"] = f"Bearer {self.token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            send.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=send)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, **kwargs) -> tuple[int, dict]:
        status, _, data = self.request(method, path, body, **kwargs)
        return status, json.loads(data)

    def events(self, job_id: str, timeout: float = 300.0) -> list[tuple[str, dict]]:
        """Reads a job's event stream to its end: [(event name, data)]."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            conn.request("GET", f"/v1/jobs/{job_id}/events", headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"events of job {job_id}: HTTP {response.status} {response.read()[:200]!r}")
            out, name = [], None
            for line in response:
                line = line.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    out.append((name, json.loads(line[6:])))
            return out
        finally:
            conn.close()

    def generate(self, timeout: float = 300.0, path: str = "/v1/generate", **body) -> dict:
        """Queues a job (`path`: /v1/generate, or /v1/infill), follows its events to the end and returns the final
        job JSON."""
        status, job = self.json("POST", path, body)
        if status != 202:
            raise RuntimeError(f"POST {path}: HTTP {status} {job}")
        events = self.events(job["id"], timeout=timeout)
        if not events or events[-1][0] not in ("done", "failed", "cancelled"):
            raise RuntimeError(f"job {job['id']}: the event stream ended without a final event")
        return events[-1][1]


def _pump(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@contextlib.contextmanager
def serve(export_dir: str, *flags: str, token: str | None = None):
    """Starts `python -m launch.serve --model=export_dir --port=0 *flags` and yields a `Server` once it listens;
    stops it (SIGTERM) afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "launch.serve", f"--model={export_dir}", "--port=0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while url is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("musenet-serve did not start:\n" + "\n".join(lines))
        url = next((ln.split()[1] for ln in lines if ln.startswith("musenet-serve: http://")), None)
        time.sleep(0.1)
    server = Server(url.rstrip("/"), process, token, lines)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise RuntimeError("musenet-serve did not stop on SIGTERM") from None
