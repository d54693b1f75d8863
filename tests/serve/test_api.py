"""musenet-serve's JSON API against a real server (uvicorn on a free loopback port) over the small test export:
fields, reproducible seeds, instruments, primers and continuations, batching under concurrent clients, a full
queue, clients that leave, the job time limit, bad input and the bearer token."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from data_pipeline import encoding
from data_pipeline.musenet_midi.sources import CORPUS_ZIP
from data_pipeline.vocab import Vocab
from launch.serve_client import serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PIANO_PRIMER = "bach_bwv1.6.mid"  # piano only


@pytest.fixture(scope="module")
def vocab(trained_run) -> Vocab:
    return Vocab.load(str(trained_run.export / "vocab.json"))


def one_line_error(status: int, data: bytes, expected_status: int, *fragments: str) -> str:
    assert status == expected_status, (status, data)
    body = json.loads(data)
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def test_model_describes_labels_instruments_limits_and_openings(server, trained_run, vocab):
    status, info = server.json("GET", "/v1/model")
    assert status == 200
    assert info["labels"] == list(vocab.config.labels) == ["classical", "freedoom"]
    assert info["instruments"] == list(vocab.instruments.names) and info["infill"] is True
    assert info["step"] == trained_run.steps[-1]
    assert info["model"]["context_tokens"] == 64 and info["model"]["parameters"] > 0
    assert info["limits"]["max_num_samples"] == 4 and 0 < info["limits"]["max_seconds"] <= 240
    # Openings: the first bars of the bundled corpus's pieces, labelled where the model knows the label.
    names = {o["name"]: o for o in info["openings"]}
    assert "freedoom/freedoom1_D_BUNNY" in names and names["freedoom/freedoom1_D_BUNNY"]["label"] == "freedoom"
    assert all(0 < o["seconds"] <= 8.0 and set(o["instruments"]) <= set(vocab.instruments.names)
               for o in info["openings"])
    status, doc = server.json("GET", "/v1/openapi.json")
    assert status == 200 and {"/v1/model", "/v1/generate", "/v1/jobs/{job_id}/events"} <= set(doc["paths"])


def test_generate_streams_progress_and_gives_playable_reproducible_pieces(server, vocab):
    body = {"label": "freedoom", "instruments": ["bass", "drums"], "seconds": 2.0, "num_samples": 3, "seed": 11,
            "temperature": 0.8}
    status, queued = server.json("POST", "/v1/generate", body)
    assert status == 202 and queued["seed"] == 11 and queued["urls"]["events"].endswith("/events")
    events = server.events(queued["id"])
    assert [name for name, _ in events][-1] == "done" and all(name == "progress" for name, _ in events[:-1])
    assert all(len(data["progress"]) == 3 and data["target_seconds"] == 2.0 for _, data in events[:-1])
    job = events[-1][1]
    assert job["status"] == "done" and len(job["results"]) == 3
    chosen = {vocab.instruments.index("bass"), vocab.drums_index}
    for result in job["results"]:
        assert result["seconds"] <= 2.0 and result["primer_tokens"] == 0
        assert {n["instrument"] for n in result["notes"]} <= {"bass", "drums"}
        # The MIDI parses and holds the notes the JSON lists.
        status, headers, midi = server.request("GET", result["midi_url"])
        assert status == 200 and headers["content-type"] == "audio/midi" and midi[:4] == b"MThd"
        notes, _ = encoding.decode_tokens(encoding.encode_midi(midi, vocab).body, vocab)
        assert set(notes.instrument.tolist()) <= chosen and len(notes) == len(result["notes"])
        tokens_notes, _ = encoding.decode_tokens(np.asarray(result["tokens"]), vocab)
        assert len(tokens_notes) == len(result["notes"])
    # The same seed gives the same pieces (also in another batch); another seed, others.
    again = server.generate(**body)
    assert [r["tokens"] for r in again["results"]] == [r["tokens"] for r in job["results"]]
    other = server.generate(**{**body, "seed": 12})
    assert [r["tokens"] for r in other["results"]] != [r["tokens"] for r in job["results"]]
    assert len({tuple(r["tokens"]) for r in job["results"]}) == 3  # samples, not copies


def test_primer_upload_opening_and_continuation_are_kept_verbatim(server, midi_fixtures, vocab):
    primer = (midi_fixtures / PIANO_PRIMER).read_bytes()
    body = {"label": "classical", "instruments": ["piano"], "seconds": 3.0, "num_samples": 2, "seed": 3,
            "primer_midi": base64.b64encode(primer).decode(), "primer_seconds": 1.5}
    job = server.generate(**body)
    expected, _, units = encoding.opening_body(primer, vocab, 1.5, ["piano"])
    assert units == 150
    for result in job["results"]:
        assert result["primer_tokens"] == len(expected)
        assert result["tokens"][: len(expected)] == expected.tolist()
        assert len(result["tokens"]) > len(expected)
    # Continue the first piece by 1 s: the new pieces start with all of its tokens.
    first = job["results"][0]
    longer = server.generate(label="classical", instruments=["piano"], seconds=first["seconds"] + 1.0, seed=4,
                             continue_from=first["tokens"])
    [cont] = longer["results"]
    assert cont["tokens"][: len(first["tokens"])] == first["tokens"] and cont["primer_tokens"] == len(first["tokens"])
    assert first["seconds"] < cont["seconds"] <= first["seconds"] + 1.0
    # A bundled opening (a Freedoom piece's first bars), on the instruments it plays.
    info = server.json("GET", "/v1/model")[1]
    opening = next(o for o in info["openings"] if o["name"] == "freedoom/freedoom1_D_BUNNY")
    job = server.generate(label="freedoom", instruments=opening["instruments"], seconds=opening["seconds"] + 1.0,
                          opening=opening["name"], seed=5)
    [result] = job["results"]
    assert result["primer_tokens"] > 0 and result["seconds"] > opening["seconds"]
    # Its first 2 s only: the bundled piece cut there.
    with zipfile.ZipFile(CORPUS_ZIP) as z:
        cut, _, _ = encoding.opening_body(z.read("freedoom/freedoom1_D_BUNNY.mid"), vocab, 2.0,
                                          opening["instruments"])
    job = server.generate(label="freedoom", instruments=opening["instruments"], seconds=3.0, opening=opening["name"],
                          primer_seconds=2.0, seed=5)
    [short] = job["results"]
    assert short["primer_tokens"] == len(cut) < result["primer_tokens"]
    assert short["tokens"][: len(cut)] == cut.tolist()


def test_infill_rewrites_a_span_of_a_result_and_keeps_the_rest(server, vocab):
    """POST /v1/infill on a generated piece: each result is the piece with the span rewritten, the notes outside it
    the piece's own, the written ones inside it, its length unchanged; the same seed gives the same rewrite."""
    piece = server.generate(label="freedoom", instruments=["bass", "drums"], seconds=3.0, seed=21,
                            temperature=0.8)["results"][0]
    body = {"tokens": piece["tokens"], "from_seconds": 1.0, "to_seconds": 2.0, "label": "freedoom", "seed": 5,
            "num_samples": 2, "temperature": 1.0}
    job = server.generate(path="/v1/infill", **body)
    assert job["status"] == "done" and len(job["results"]) == 2, job
    assert job["settings"]["from_seconds"] == 1.0 and job["target_seconds"] == 1.0

    def outside(notes):
        return sorted((n["instrument"], n["pitch"], n["start"], n["end"]) for n in notes
                      if not 1.0 <= n["start"] < 2.0)

    for result in job["results"]:
        assert result["span"] == [1.0, 2.0] and result["seconds"] == pytest.approx(piece["seconds"])
        assert outside(result["notes"]) == outside(piece["notes"])
        inside = [n for n in result["notes"] if 1.0 <= n["start"] < 2.0]
        assert all(n["end"] <= 2.0 + 1e-6 for n in inside if not n["drum"])
        assert {n["instrument"] for n in inside} <= {"bass", "drums"}
        notes, duration = encoding.decode_tokens(np.asarray(result["tokens"]), vocab)
        assert len(notes) == len(result["notes"]) and duration * vocab.config.time_unit_ms / 1000 == pytest.approx(
            piece["seconds"])
        status, _, midi = server.request("GET", result["midi_url"])
        assert status == 200 and midi[:4] == b"MThd"
    again = server.generate(path="/v1/infill", **body)
    assert [r["tokens"] for r in again["results"]] == [r["tokens"] for r in job["results"]]
    # One part only: the drums stay as they were.
    drums = server.generate(path="/v1/infill", **{**body, "instruments": ["bass"], "num_samples": 1})
    [result] = drums["results"]
    assert sorted((n["pitch"], n["start"]) for n in result["notes"] if n["drum"]) == sorted(
        (n["pitch"], n["start"]) for n in piece["notes"] if n["drum"])
    bad = [
        ({**body, "to_seconds": 99.0}, "after the piece's"),
        ({**body, "from_seconds": 2.0}, "empty or negative"),
        ({**body, "from_seconds": None}, "from_seconds and to_seconds are required"),
        ({**body, "instruments": ["violin"]}, "instruments must be a non-empty list of the piece's instruments"),
        ({**body, "tokens": [1, 2, "x"]}, "tokens must be a result's tokens"),
        ({**body, "tokens": [vocab.hole, 5]}, "tokens must be a piece's body"),
        ({**body, "label": "polka"}, "unknown label 'polka'"),
        ({**body, "opening": "x"}, "unknown field 'opening'"),
        ({**body, "num_samples": 9}, "num_samples must be in 1..4"),
    ]
    for payload, fragment in bad:
        got, _, data = server.request("POST", "/v1/infill", payload)
        one_line_error(got, data, 400, fragment)
    assert not [line for line in server.output if "Traceback" in line], server.output


def test_sixteen_concurrent_clients_are_batched_and_all_served(server):
    before = server.json("GET", "/v1/stats")[1]

    def client(i):
        return server.generate(label="freedoom", instruments=["piano", "drums"], seconds=1.0, seed=100 + i)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(client, range(16)))
    assert [j["status"] for j in jobs] == ["done"] * 16
    assert all(len(j["results"]) == 1 and j["results"][0]["tokens"] for j in jobs)
    after = server.json("GET", "/v1/stats")[1]
    formed = {int(k): v - before["windows_by_rows"].get(k, 0) for k, v in after["windows_by_rows"].items()}
    assert after["jobs"]["rows"] - before["jobs"].get("rows", 0) == 16  # nothing lost, nothing decoded twice
    assert max(rows for rows, n in formed.items() if n) >= 2, formed  # requests were decoded together
    assert after["jobs"]["done"] - before["jobs"].get("done", 0) == 16
    assert after["compiled_decode_loops"] <= 2 * len(after["buckets"])  # batch shapes are bucketed


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(trained_run):
    with serve(str(trained_run.export), "--max_batch=1", "--queue_size=1") as server:
        long = {"label": "freedoom", "instruments": ["piano"], "seconds": 60.0, "seed": 1, "temperature": 0.3}
        status, running = server.json("POST", "/v1/generate", long)
        assert status == 202
        deadline = time.monotonic() + 120
        while server.json("GET", f"/v1/jobs/{running['id']}")[1]["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        status, waiting = server.json("POST", "/v1/generate", long)
        assert status == 202
        status, headers, data = server.request("POST", "/v1/generate", long)
        one_line_error(status, data, 429, "queue is full")
        assert int(headers["retry-after"]) >= 1
        # The waiting job's client opens its event stream and leaves: the job is cancelled, its slot free.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"/v1/jobs/{waiting['id']}/events")
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"event: progress")
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 30
        while server.json("GET", f"/v1/jobs/{waiting['id']}")[1]["status"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status, third = server.json("POST", "/v1/generate", long)
        assert status == 202
        # DELETE stops the running job at its next window.
        status, _ = server.json("DELETE", f"/v1/jobs/{running['id']}")
        assert status == 200
        assert server.events(running["id"])[-1][0] == "cancelled"
        server.json("DELETE", f"/v1/jobs/{third['id']}")


def test_a_job_past_the_time_limit_fails_in_one_line(trained_run):
    with serve(str(trained_run.export), "--max_job_seconds=1", "--max_batch=1") as server:
        job = server.generate(instruments=["piano"], seconds=120.0, seed=2, temperature=0.3)
        assert job["status"] == "failed" and "limit of 1 s" in job["error"] and job["results"] == []
        assert server.json("GET", "/v1/model")[0] == 200


BAD_BODIES = [
    ({"instruments": ["piano"], "seconds": 2, "label": "polka"}, 400, "unknown label 'polka'"),
    ({"instruments": ["kazoo"], "seconds": 2}, 400, "unknown instrument(s) 'kazoo'"),
    ({"instruments": ["piano"], "seconds": 100000}, 400, "seconds must be in"),
    ({"instruments": ["piano"], "seconds": -1}, 400, "seconds must be in"),
    ({"instruments": ["piano"]}, 400, "seconds is required"),
    ({"instruments": [], "seconds": 2}, 400, "instruments must be"),
    ({"instruments": "piano", "seconds": 2}, 400, "instruments must be"),
    ({"instruments": ["piano"], "seconds": True}, 400, "seconds must be a number"),
    ({"instruments": ["piano"], "seconds": 2, "num_samples": 99}, 400, "num_samples must be in 1..4"),
    ({"instruments": ["piano"], "seconds": 2, "temperature": 0}, 400, "temperature must be in"),
    ({"instruments": ["piano"], "seconds": 2, "top_p": 1.5}, 400, "top_p must be in"),
    ({"instruments": ["piano"], "seconds": 2, "seed": -3}, 400, "seed must be in"),
    ({"instruments": ["piano"], "seconds": 2, "path": "/etc/passwd"}, 400, "unknown field 'path'"),
    ({"instruments": ["piano"], "seconds": 2, "primer_midi": base64.b64encode(b"not a midi file").decode()}, 400,
     "the primer is not a usable MIDI file"),
    ({"instruments": ["piano"], "seconds": 2, "primer_midi": "%%%"}, 400, "not valid base64"),
    ({"instruments": ["piano"], "seconds": 2, "opening": "../../etc/passwd"}, 400, "unknown opening"),
    ({"instruments": ["piano"], "seconds": 2, "continue_from": [1, "x"]}, 400, "continue_from must be"),
    ({"instruments": ["piano"], "seconds": 2, "continue_from": [10 ** 9]}, 400, "continue_from must be"),
    ({"instruments": ["piano"], "seconds": 2, "continue_from": [1], "opening": "x"}, 400, "at most one of"),
    ({"instruments": ["piano"], "seconds": 2, "primer_seconds": 3}, 400, "primer_seconds must be"),
    ([1, 2], 400, "must be a JSON object"),
]


def test_bad_input_is_a_one_line_4xx_and_the_server_goes_on(server, midi_fixtures):
    for body, status, fragment in BAD_BODIES:
        got, _, data = server.request("POST", "/v1/generate", body)
        one_line_error(got, data, status, fragment)
    # A primer playing instruments that were not chosen is named.
    freedoom = base64.b64encode((midi_fixtures / "freedoom1_D_E1M9.mid").read_bytes()).decode()
    got, _, data = server.request("POST", "/v1/generate", {"instruments": ["piano"], "seconds": 30,
                                                             "primer_midi": freedoom})
    one_line_error(got, data, 400, "the primer plays", "not in instruments")
    cases = [
        ("POST", "/v1/generate", b"{not json", {"Content-Type": "application/json"}, 400, "malformed JSON"),
        ("POST", "/v1/generate", b'{"seconds": 1}', {"Content-Type": "text/plain"}, 415, "as JSON"),
        ("POST", "/v1/generate", b"x" * (4 << 20), {"Content-Type": "application/json"}, 413, "larger than"),
        ("GET", "/v1/jobs/nope", None, {}, 404, "no such job"),
        ("GET", "/v1/jobs/nope/events", None, {}, 404, "no such job"),
        ("GET", "/v1/nothing", None, {}, 404, ""),
        ("PUT", "/v1/model", None, {}, 405, ""),
        ("GET", "/static/../../setup.py", None, {}, 404, ""),
    ]
    for method, path, raw, headers, status, fragment in cases:
        got, _, data = server.request(method, path, raw=raw, headers=headers)
        assert got == status, (method, path, got, data[:200])
        if path.startswith("/v1"):
            one_line_error(got, data, status, fragment)
    # An upload over the limit is refused while it is read, whatever Content-Length claims.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/generate")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(64):
            conn.send(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except OSError:  # the server may close the connection once it has answered
        pass
    response = conn.getresponse()
    one_line_error(response.status, response.read(), 413, "larger than")
    conn.close()
    # A finished job's samples: bad names and indices.
    job = server.generate(instruments=["piano"], seconds=1.0, seed=1)
    base = job["results"][0]["midi_url"].rsplit("/", 1)[0]
    for name, status in (("7.mid", 404), ("0.exe", 404), ("..%2f0.mid", 404)):
        got, _, data = server.request("GET", f"{base}/{name}")
        one_line_error(got, data, status)
    assert server.json("GET", "/v1/model")[0] == 200
    assert not [line for line in server.output if "Traceback" in line], server.output


def test_the_token_is_required_when_set_and_off_loopback(trained_run):
    token = "s3cret-token"
    with serve(str(trained_run.export), f"--token={token}") as server:
        server.token = None
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": token}):
            got, _, data = server.request("GET", "/v1/model", headers=headers)
            one_line_error(got, data, 401, "bearer token")
        assert server.request("GET", "/v1/model", headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert server.request("GET", "/")[0] == 200  # the page loads; it sends the token it is given
    # Off loopback without a token: refused before anything listens.
    res = subprocess.run([sys.executable, "-m", "launch.serve", f"--model={trained_run.export}", "--host=0.0.0.0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "give --token" in res.stderr, res.stderr


@pytest.mark.parametrize(("args", "code", "fragment"), [
    ([], 2, "--model is required"),
    (["--model=/nonexistent/export"], 1, "not a musenet export"),
    (["--model=x", "--max_batch=0"], 2, "--max_batch must be >= 1"),
    (["--model=x", "--token=short"], 2, "at least 8"),
])
def test_bad_flags_are_one_line_errors(args, code, fragment):
    res = subprocess.run([sys.executable, "-m", "launch.serve", "--port=0", *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == code and res.stderr.startswith("error: ") and fragment in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
