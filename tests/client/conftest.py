"""A small stand-in for the bocompress service, served over real sockets for the client tests.

It implements just enough of the v1 wire contract (DESIGN.md) to exercise the client: job
creation with idempotency keys, cursor pagination, ``?since=`` trial polling over a simulated job
that advances one step per poll, uploads (multipart), ask/tell, the worker calls and artifact
download; plus knobs to inject failures (503s, a retryable 409, a slow endpoint). Every request is
recorded so tests can check what went over the wire.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

PREFIX = "/api/v1"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class StubState:
    """Everything the stub service holds; tests read and set it directly."""

    token: str | None = None
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    trials: dict[int, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, int] = field(default_factory=dict)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    upload_parts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_create: int = 0          # next N job creations answer 503 (after storing the job)
    fail_get: int = 0             # next N GET /jobs/{id} answer 502 without Retry-After
    conflict_complete: int = 0    # next N completes answer 409 with Retry-After
    artifact_pending: int = 0     # artifact answers 409 this many times before the file
    artifact: bytes = b""
    page_size: int = 2            # trials per page, to exercise cursors together with since
    served_trials: list[int] = field(default_factory=list)  # items in each trials answer
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_trial_id: int = 100

    # ---------------------------------------------------------------- simulation

    def new_job(self, spec: dict[str, Any], owner: str = "alice") -> dict[str, Any]:
        job_id = len(self.jobs) + 1
        kind = "compression" if "compression" in spec else "generic"
        job = {
            "id": job_id, "name": spec["name"], "state": "running", "owner": owner, "kind": kind,
            "counts": {}, "best": None, "created_at": _now(), "updated_at": _now(), "reason": None,
            "seq": 0, "spec": spec, "layers": None, "search_space": None, "totals": None,
        }
        self.jobs[job_id] = job
        return job

    def bump(self, job: dict[str, Any], trial: dict[str, Any]) -> None:
        job["seq"] += 1
        trial["seq"] = job["seq"]

    def new_trial(self, job: dict[str, Any], params: dict[str, float], state: str) -> dict[str, Any]:
        number = sum(1 for t in self.trials.values() if t["job_id"] == job["id"])
        self.next_trial_id += 1
        trial = {
            "id": self.next_trial_id, "job_id": job["id"], "seq": 0, "number": number, "state": state,
            "params": params, "values": {}, "sem": {}, "attempt": 0, "worker": "w0" if state == "running" else None,
            "created_at": _now(), "started_at": _now() if state == "running" else None,
            "finished_at": None, "error": None,
        }
        self.trials[trial["id"]] = trial
        self.bump(job, trial)
        return trial

    def job_trials(self, job_id: int) -> list[dict[str, Any]]:
        return [t for t in self.trials.values() if t["job_id"] == job_id]

    def refresh_job(self, job: dict[str, Any]) -> None:
        trials = self.job_trials(job["id"])
        counts: dict[str, int] = {}
        for t in trials:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        job["counts"] = counts
        done = [t for t in trials if t["state"] == "completed"]
        metric = job["spec"].get("objective", {}).get("metric") or "objective"
        if done:
            job["best"] = min(done, key=lambda t: t["values"].get(metric, float("inf")))
        job["updated_at"] = _now()

    def advance(self, job: dict[str, Any]) -> None:
        """One simulated step of a compression job: finish the running trial, start the next."""
        if job["kind"] != "compression" or job["state"] != "running":
            return
        max_trials = job["spec"].get("budget", {}).get("max_trials", 60)
        kappa = job["spec"].get("objective", {}).get("kappa", 1.0)
        trials = self.job_trials(job["id"])
        for t in trials:
            if t["state"] == "running":
                n = t["number"]
                theta = t["params"]
                dl2 = round(0.02 * (1.0 - theta["conv1"]) + 0.05 * (1.0 - theta["fc"]) + 0.001 * n, 6)
                ratio = round(0.3 * theta["conv1"] + 0.7 * theta["fc"], 6)
                t.update(state="completed", finished_at=_now(),
                         values={"distill_l2": dl2, "ratio": ratio, "objective": kappa * dl2 + ratio},
                         sem={"distill_l2": 0.0001})
                self.bump(job, t)
        if len(trials) < max_trials:
            n = len(trials)
            self.new_trial(job, {"conv1": round(0.1 + 0.8 * ((n * 0.37) % 1), 4),
                                 "fc": round(0.1 + 0.8 * ((n * 0.61) % 1), 4)}, "running")
        elif all(t["state"] == "completed" for t in trials):
            job["state"] = "completed"
        self.refresh_job(job)


class _Handler(BaseHTTPRequestHandler):
    state: StubState  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # ---------------------------------------------------------------- helpers

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-ID", uuid.uuid4().hex[:12])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            self.close_connection = True

    def _error(self, status: int, detail: str, code: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"detail": detail, "code": code}, headers)

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        st = self.state
        with st.lock:
            st.requests.append(Recorded(method, parts.path, query, dict(self.headers.items()), body))
        if parts.path == "/healthz":
            return self._send(200, {"status": "ok"})
        if st.token is not None and self.headers.get("Authorization") != f"Bearer {st.token}":
            return self._error(401, "missing or unknown token", "unauthorized")
        if not parts.path.startswith(PREFIX):
            return self._error(404, f"no route {parts.path}", "not_found")
        segs = parts.path[len(PREFIX):].strip("/").split("/")
        with st.lock:
            return self._dispatch(method, segs, query, body)

    def _dispatch(self, method: str, segs: list[str], query: dict[str, str], body: bytes) -> None:
        st = self.state
        if segs == ["slow"]:
            st.lock.release()
            try:
                time.sleep(1.0)
            finally:
                st.lock.acquire()
            return self._send(200, {"slow": True})
        if segs == ["jobs"] and method == "POST":
            return self._create_job(body)
        if segs == ["jobs"] and method == "GET":
            limit = int(query.get("limit", 100))
            start = int(query.get("cursor") or 0)
            ids = sorted(st.jobs)
            page = ids[start:start + limit]
            nxt = str(start + limit) if start + limit < len(ids) else None
            return self._send(200, {"items": [st.jobs[i] for i in page], "next_cursor": nxt})
        if segs[0] == "jobs" and len(segs) >= 2:
            job = st.jobs.get(int(segs[1])) if segs[1].isdigit() else None
            if job is None:
                return self._error(404, f"job {segs[1]} not found", "not_found")
            rest = segs[2:]
            if rest == [] and method == "GET":
                if st.fail_get > 0:
                    st.fail_get -= 1
                    return self._error(502, "bad gateway", "unavailable")
                st.advance(job)
                return self._send(200, job)
            if rest == ["trials"] and method == "GET":
                since = int(query["since"]) if "since" in query else -1
                changed = sorted((t for t in st.job_trials(job["id"]) if t["seq"] > since), key=lambda t: t["seq"])
                start = int(query.get("cursor") or 0)
                page = changed[start:start + st.page_size]
                nxt = str(start + st.page_size) if start + st.page_size < len(changed) else None
                st.served_trials.append(len(page))
                return self._send(200, {"items": page, "next_cursor": nxt})
            if rest == ["pareto"] and method == "GET":
                done = [t for t in st.job_trials(job["id"]) if t["state"] == "completed"]
                front = [t for t in done if not any(
                    o["values"]["ratio"] <= t["values"]["ratio"] and o["values"]["distill_l2"] <= t["values"]["distill_l2"]
                    and o is not t and (o["values"]["ratio"], o["values"]["distill_l2"])
                    != (t["values"]["ratio"], t["values"]["distill_l2"]) for o in done)]
                return self._send(200, {"items": front, "next_cursor": None})
            if rest == ["cancel"] and method == "POST":
                job["state"] = "cancelled"
                return self._send(200, job)
            if rest == ["ask"] and method == "POST":
                count = json.loads(body or b"{}").get("count", 1)
                budget = job["spec"].get("budget", {}).get("max_trials", 60)
                out = []
                for _ in range(count):
                    if len(st.job_trials(job["id"])) >= budget:
                        break
                    n = len(st.job_trials(job["id"]))
                    params = {p["name"]: p["low"] + (p["high"] - p["low"]) * ((n + 1) * 0.29 % 1)
                              for p in job["spec"]["parameters"]}
                    out.append(st.new_trial(job, params, "running"))
                st.refresh_job(job)
                return self._send(200, {"trials": out})
            if len(rest) == 3 and rest[0] == "trials" and rest[2] == "artifact" and method == "GET":
                if st.artifact_pending > 0:
                    st.artifact_pending -= 1
                    return self._error(409, "the export is being built", "artifact_pending")
                return self._send(200, raw=st.artifact)
            if len(rest) == 3 and rest[0] == "trials" and rest[2] == "export" and method == "POST":
                return self._send(202, {"trial_id": int(rest[1]), "state": "queued", **json.loads(body)})
        if segs[0] == "trials" and len(segs) == 3 and method == "POST":
            trial = st.trials.get(int(segs[1]))
            if trial is None:
                return self._error(404, f"trial {segs[1]} not found", "not_found")
            job = st.jobs[trial["job_id"]]
            action = segs[2]
            if action == "heartbeat":
                return self._error(409, "lease lost", "lease_lost")
            if action == "complete":
                if st.conflict_complete > 0:
                    st.conflict_complete -= 1
                    return self._error(409, "row locked, try again", "busy", {"Retry-After": "0.01"})
                payload = json.loads(body)
                trial.update(state="completed", values=payload["values"], sem=payload["sem"], finished_at=_now())
                st.bump(job, trial)
                return self._send(200, trial)
            if action == "tell":
                payload = json.loads(body)
                if not payload.get("failed") and not payload.get("values"):
                    return self._error(422, "values: give at least one metric, or failed=true", "validation_error")
                trial.update(state="failed" if payload.get("failed") else "completed",
                             values=payload.get("values", {}), sem=payload.get("sem", {}),
                             error=payload.get("error"), finished_at=_now())
                st.bump(job, trial)
                st.refresh_job(job)
                return self._send(200, trial)
            if action == "fail":
                payload = json.loads(body)
                trial.update(state="queued" if payload["retry"] else "failed", error=payload["error"])
                st.bump(job, trial)
                return self._send(200, trial)
        if segs == ["workers", "lease"] and method == "POST":
            return self._send(204)
        if segs[0] in ("models", "datasets") and len(segs) == 1 and method == "POST":
            return self._upload(segs[0][:-1], body)
        if segs[0] in ("models", "datasets") and len(segs) == 3 and segs[2] == "file" and method == "GET":
            parts = st.upload_parts.get(segs[1])
            if parts is None:
                return self._error(404, f"{segs[0][:-1]} {segs[1]} not found", "not_found")
            return self._send(200, raw=parts["file"])
        return self._error(404, f"no route {method} /{'/'.join(segs)}", "not_found")

    def _create_job(self, body: bytes) -> None:
        st = self.state
        key = self.headers.get("Idempotency-Key")
        spec = json.loads(body)
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            return self._error(422, "name: field required", "validation_error")
        if key in st.by_key:
            job = st.jobs[st.by_key[key]]
        else:
            job = st.new_job(spec)
            if key:
                st.by_key[key] = job["id"]
        if st.fail_create > 0:  # stored, but the answer is lost: the client must retry with the same key
            st.fail_create -= 1
            return self._error(503, "service restarting", "unavailable", {"Retry-After": "0.01"})
        return self._send(201, job)

    def _upload(self, kind: str, body: bytes) -> None:
        st = self.state
        ctype = self.headers.get("Content-Type", "")
        msg = BytesParser(policy=email_policy).parsebytes(
            f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode() + body)
        parts: dict[str, bytes] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            parts[name] = part.get_payload(decode=True)
        if "file" not in parts:
            return self._error(422, "file: field required", "validation_error")
        upload_id = f"{kind[0]}{len(st.uploads) + 1}"
        record = {"id": upload_id, "kind": kind, "arch": parts.get("arch", b"").decode() or None,
                  "size": len(parts["file"]), "sha256": hashlib.sha256(parts["file"]).hexdigest(),
                  "created_at": _now(), "tensors": {}}
        st.uploads[upload_id] = record
        st.upload_parts[upload_id] = parts
        return self._send(201, record)

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")


@dataclass
class Stub:
    url: str
    state: StubState

    def posts(self, path: str) -> list[Recorded]:
        return [r for r in self.state.requests if r.method == "POST" and r.path == PREFIX + path]

    def gets(self, path: str) -> list[Recorded]:
        return [r for r in self.state.requests if r.method == "GET" and r.path == PREFIX + path]


@pytest.fixture()
def stub() -> Stub:
    """A stub service on 127.0.0.1:<free port>, stopped after the test."""
    state = StubState()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Stub(url=f"http://127.0.0.1:{server.server_address[1]}", state=state)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep retry backoff short and the environment clean."""
    from bocompress.client import Client

    monkeypatch.setattr(Client, "initial_retry_delay", 0.01)
    monkeypatch.setattr(Client, "max_retry_delay", 0.05)
    monkeypatch.delenv("BOCOMPRESS_URL", raising=False)
    monkeypatch.delenv("BOCOMPRESS_TOKEN", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
