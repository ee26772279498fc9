"""Auth: the full role matrix (admin / client / worker / none x every route of the app), table-driven;
ownership (a client cannot read, cancel or export another client's job); worker tokens cannot
create jobs; revoked tokens stop working at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save

from tests.conftest import LiveServer, start_server
from tests.service.helpers import compression_job, lease, profile_job

A, C, W = "admin", "client", "worker"
PUBLIC = "public"  # anyone, no token
PAGE = "page"  # a dashboard page: authenticated by its cookie only; without it, a redirect to /login

# (method, path) -> the roles allowed. Every route of the app must be here (see the first test).
MATRIX: dict[tuple[str, str], set[str] | str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/api/v1/tokens"): {A},
    ("GET", "/api/v1/tokens"): {A},
    ("POST", "/api/v1/tokens/{token_id}/revoke"): {A},
    ("POST", "/api/v1/jobs"): {A, C},
    ("GET", "/api/v1/jobs"): {A, C},
    ("GET", "/api/v1/jobs/{job_id}"): {A, C},
    ("POST", "/api/v1/jobs/{job_id}/cancel"): {A, C},
    ("GET", "/api/v1/jobs/{job_id}/trials"): {A, C},
    ("GET", "/api/v1/jobs/{job_id}/pareto"): {A, C},
    ("POST", "/api/v1/jobs/{job_id}/ask"): {A, C},
    ("GET", "/api/v1/trials/{trial_id}"): {A, C},
    ("POST", "/api/v1/trials/{trial_id}/tell"): {A, C},
    ("POST", "/api/v1/workers/lease"): {A, W},
    ("POST", "/api/v1/trials/{trial_id}/heartbeat"): {A, W},
    ("POST", "/api/v1/trials/{trial_id}/complete"): {A, W},
    ("POST", "/api/v1/trials/{trial_id}/fail"): {A, W},
    ("POST", "/api/v1/models"): {A, C},
    ("POST", "/api/v1/datasets"): {A, C},
    ("GET", "/api/v1/models/{model_id}"): {A, C, W},
    ("GET", "/api/v1/models/{model_id}/file"): {A, C, W},
    ("GET", "/api/v1/datasets/{dataset_id}"): {A, C, W},
    ("GET", "/api/v1/datasets/{dataset_id}/file"): {A, C, W},
    ("POST", "/api/v1/jobs/{job_id}/trials/{trial_id}/export"): {A, C},
    ("GET", "/api/v1/jobs/{job_id}/trials/{trial_id}/export"): {A, C},
    ("POST", "/api/v1/jobs/{job_id}/trials/{trial_id}/export/cancel"): {A, C},
    ("GET", "/api/v1/jobs/{job_id}/trials/{trial_id}/artifact"): {A, C},
    ("POST", "/api/v1/trials/{task_id}/artifact"): {A, W},
    # the dashboard
    ("GET", "/static/{name}"): PUBLIC,
    ("GET", "/"): PAGE,
    ("GET", "/jobs/{job_id}"): PAGE,
    ("GET", "/login"): PUBLIC,
    ("POST", "/login"): {A, C},  # the form's token, not a header: worker tokens may not sign in
    ("POST", "/logout"): PUBLIC,
    ("GET", "/jobs/{job_id}/snapshot.json"): {A, C},
    ("GET", "/jobs/{job_id}/trials.csv"): {A, C},
}
SKIP_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # FastAPI's own, public by design


def app_routes(app: Any) -> set[tuple[str, str]]:
    """Every (method, path) the app serves, walking included routers."""
    out: set[tuple[str, str]] = set()

    def walk(routes: Any) -> None:
        for r in routes:
            if hasattr(r, "original_router"):
                walk(r.original_router.routes)
            elif hasattr(r, "path") and hasattr(r, "methods"):
                for m in r.methods or ():
                    if m != "HEAD" and r.path not in SKIP_ROUTES:
                        out.add((m, r.path))

    walk(app.routes)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A service with alice's job (one completed trial, an export task), uploads, and tokens."""
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('auth')) / 'auth.db'}"
    srv = start_server(url, scheduler_interval=0.1, ask_wait_seconds=0.5)
    try:
        tok = {A: srv.admin_token, C: srv.token("client", "alice"), W: srv.token("worker", "pool"),
               "bob": srv.token("client", "bob")}
        with srv.client(tok[C]) as alice, srv.client(tok[W]) as worker, srv.client(tok[A]) as adm:
            job = compression_job(alice, max_trials=3, max_parallel=3)
            profile_job(adm, job["id"])
            got = None
            while got is None:
                got = lease(worker, "w", ["evaluate"])
            tid = got["trial"]["id"]
            r = worker.post(f"/api/v1/trials/{tid}/complete",
                            json={"values": {"distill_l2": 0.1}, "lease_token": got["lease"]["token"]})
            assert r.status_code == 200, r.text
            r = alice.post(f"/api/v1/jobs/{job['id']}/trials/{tid}/export", json={})
            assert r.status_code == 202, r.text
            export_task = r.json()["id"]
            victim = compression_job(alice, max_trials=2)  # for the cancel route
            model = alice.post("/api/v1/models", files={"file": ("w", save({"w": torch.zeros(2, 2)}))},
                               data={"arch": "digits-mlp"}).json()["id"]
            ds = alice.post("/api/v1/datasets", files={"file": ("d", save({"inputs": torch.zeros(4, 2)}))}
                            ).json()["id"]
        yield {"srv": srv, "tok": tok, "job": job["id"], "trial": tid, "export_task": export_task,
               "victim": victim["id"], "model": model, "dataset": ds}
    finally:
        srv.stop()


def test_matrix_covers_every_route(world: dict[str, Any]) -> None:
    routes = app_routes(world["srv"].app)
    api_missing = sorted(r for r in routes - set(MATRIX) if r[1].startswith("/api/"))
    assert api_missing == [], f"API routes without an auth expectation (add them to MATRIX): {api_missing}"
    stale = sorted(set(MATRIX) - routes)
    assert stale == [], f"MATRIX lists routes the app does not serve: {stale}"


def _fill(world: dict[str, Any], method: str, path: str) -> str:
    """A concrete URL: path parameters become ids of alice's real objects."""
    job = world["victim"] if path.endswith("/cancel") else world["job"]
    trial = world["export_task"] if path == "/api/v1/trials/{task_id}/artifact" else world["trial"]
    token_id = None
    if "{token_id}" in path:  # revoke a throwaway token, not one the test uses
        with world["srv"].client(world["tok"][A]) as c:
            c.post("/api/v1/tokens", json={"role": "client", "owner": "throwaway"})
            token_id = max(t["id"] for t in c.get("/api/v1/tokens").json()["items"])
    return (path.replace("{job_id}", str(job)).replace("{trial_id}", str(trial))
            .replace("{task_id}", str(trial)).replace("{token_id}", str(token_id))
            .replace("{model_id}", world["model"]).replace("{dataset_id}", world["dataset"])
            .replace("{name}", "app.css"))


def _body(method: str, path: str) -> dict[str, Any]:
    if method != "POST":
        return {}
    if path == "/api/v1/workers/lease":
        return {"json": {"worker": "matrix", "kinds": ["export"]}}  # nothing queued of that kind: 204
    if path in ("/api/v1/models", "/api/v1/datasets", "/api/v1/trials/{task_id}/artifact", "/logout"):
        return {}
    return {"json": {}}


CASES = [(m, p, role) for (m, p) in sorted(MATRIX) for role in (A, C, W, "none")]


@pytest.mark.parametrize("method,path,role", CASES, ids=[f"{r}-{m}-{p}" for m, p, r in CASES])
def test_role_matrix(world: dict[str, Any], method: str, path: str, role: str) -> None:
    allowed = MATRIX[(method, path)]
    url = _fill(world, method, path)
    with httpx.Client(base_url=world["srv"].url, timeout=30, follow_redirects=False,
                      headers={"Authorization": f"Bearer {world['tok'][role]}"} if role != "none" else {}) as c:
        if (method, path) == ("POST", "/login"):
            r = c.post(url, data={"token": world["tok"].get(role, ""), "next": "/"})
        else:
            r = c.request(method, url, **_body(method, path))
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if (method, path) == ("POST", "/login"):
        expect = {A: 303, C: 303, W: 403, "none": 401}[role]
        assert r.status_code == expect and (expect != 303 or "bocompress_token" in r.headers["set-cookie"])
    elif allowed == PUBLIC:
        assert r.status_code not in (401, 403), (r.status_code, r.text[:300])
    elif allowed == PAGE:
        # bearer headers do not open pages (the page reads its cookie); no data either way
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), r.status_code
    elif role == "none":
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", (r.status_code, r.text[:300])
    elif role in allowed:
        assert r.status_code not in (401, 403), (r.status_code, r.text[:300])
    else:
        assert r.status_code == 403 and r.json()["code"] == "forbidden", (r.status_code, r.text[:300])


def test_client_cannot_touch_another_clients_job(world: dict[str, Any]) -> None:
    srv: LiveServer = world["srv"]
    job, trial = world["job"], world["trial"]
    with srv.client(world["tok"]["bob"]) as bob, srv.client(world["tok"][C]) as alice:
        for method, url, kw in [
            ("GET", f"/api/v1/jobs/{job}", {}),
            ("POST", f"/api/v1/jobs/{job}/cancel", {}),
            ("POST", f"/api/v1/jobs/{job}/trials/{trial}/export", {"json": {}}),
            ("GET", f"/api/v1/jobs/{job}/trials/{trial}/export", {}),
            ("GET", f"/api/v1/jobs/{job}/trials/{trial}/artifact", {}),
            ("GET", f"/api/v1/jobs/{job}/trials", {}),
            ("GET", f"/api/v1/jobs/{job}/pareto", {}),
            ("POST", f"/api/v1/jobs/{job}/ask", {"json": {"count": 1}}),
            ("GET", f"/api/v1/trials/{trial}", {}),
            ("POST", f"/api/v1/trials/{trial}/tell", {"json": {"values": {"y": 1.0}}}),
            ("GET", f"/jobs/{job}/snapshot.json", {}),
            ("GET", f"/jobs/{job}/trials.csv", {}),
            ("GET", f"/api/v1/models/{world['model']}", {}),
            ("GET", f"/api/v1/models/{world['model']}/file", {}),
            ("GET", f"/api/v1/datasets/{world['dataset']}/file", {}),
        ]:
            r = bob.request(method, url, **kw)
            assert r.status_code == 404, (method, url, r.status_code, r.text[:200])  # not even "it exists"
        assert all(j["id"] != job for j in bob.get("/api/v1/jobs").json()["items"])
        mine = alice.get(f"/api/v1/jobs/{job}").json()
        assert mine["state"] == "running"  # bob's cancel did nothing
        exports = alice.get(f"/api/v1/jobs/{job}/trials/{trial}/export").json()
        assert exports["id"] == world["export_task"]  # bob's export request queued nothing


def test_worker_cannot_create_jobs_or_mint_tokens(world: dict[str, Any]) -> None:
    srv: LiveServer = world["srv"]
    with srv.client(world["tok"][W]) as w:
        r = w.post("/api/v1/jobs", json={"name": "x", "parameters": [{"name": "x", "low": 0, "high": 1}]})
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        assert w.post("/api/v1/tokens", json={"role": "admin"}).status_code == 403
    with srv.client(world["tok"][C]) as c:
        assert c.post("/api/v1/tokens", json={"role": "admin"}).status_code == 403


def test_revoked_token_is_refused_at_once(world: dict[str, Any]) -> None:
    srv: LiveServer = world["srv"]
    with srv.client(srv.admin_token) as adm:
        made = adm.post("/api/v1/tokens", json={"role": "client", "owner": "carol"}).json()
        with srv.client(made["token"]) as carol:
            assert carol.get("/api/v1/jobs").status_code == 200  # now cached by the service
            with srv.client(world["tok"][C]) as alice:
                assert alice.post(f"/api/v1/tokens/{made['id']}/revoke").status_code == 403
            r = adm.post(f"/api/v1/tokens/{made['id']}/revoke")
            assert r.status_code == 200 and r.json()["revoked_at"] is not None
            r = carol.get("/api/v1/jobs")
            assert r.status_code == 401 and "revoked" in r.json()["detail"]
            assert adm.post(f"/api/v1/tokens/{made['id']}/revoke").status_code == 200  # idempotent
            assert adm.post("/api/v1/tokens/999999/revoke").status_code == 404
