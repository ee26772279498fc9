"""Every wrong call gets a clear 4xx naming the field; none gets a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import LiveServer
from tests.service.test_generic_jobs import BRANIN


def _job(**over: object) -> dict:
    spec = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in BRANIN.items()}
    spec.update(over)
    return spec


def _cjob(objective: dict | None = None, **compression: object) -> dict:
    c = {"model": "digits-cnn", "data": "digits", "method": "svd", **compression}
    return {"name": "c", "compression": c, "objective": objective or {"kind": "scalarized"}}


BAD_JOBS = [
    ("low >= high", _job(parameters=[{"name": "x", "low": 1.0, "high": 1.0}]), "parameters.0"),
    ("empty parameters", _job(parameters=[]), "parameters"),
    ("unknown objective kind", _cjob({"kind": "cheapest"}), "objective.kind"),
    ("negative budget", _job(budget={"max_trials": -3}), "budget.max_trials"),
    ("zero parallel", _job(budget={"max_trials": 3, "max_parallel": 0}), "budget.max_parallel"),
    ("unknown field", _job(budgets={"max_trials": 3}), "budgets"),
    ("log with low <= 0", _job(parameters=[{"name": "x", "low": 0.0, "high": 1.0, "log": True}]), "parameters.0"),
    ("both forms", {**_job(), "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"}}, "compression"),
    ("no name", {k: v for k, v in _job().items() if k != "name"}, "name"),
    ("unknown method", _cjob(method="zip"), "compression.method"),
    ("unknown zoo model", _cjob(model="resnet9000"), "compression.model"),
    ("unknown upload id", _cjob(model="mdl_000000000000000000000000"), "compression.model"),
    ("unknown dataset", _cjob(data="imagenet"), "compression.data"),
    ("theta_min out of range", _cjob(theta_min=1.5), "compression.theta_min"),
    ("constrained without budget", _cjob({"kind": "constrained"}), "objective"),
    ("metric on a compression job", _cjob({"kind": "scalarized", "metric": "y"}), "objective.metric"),
    ("path tricks in a name", _job(parameters=[{"name": "../../etc/passwd", "low": 0, "high": 1}]), "parameters.0.name"),
]


@pytest.mark.parametrize("case,spec,field", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_specs_are_422_naming_the_field(admin: httpx.Client, case: str, spec: dict, field: str) -> None:
    r = admin.post("/api/v1/jobs", json=spec)
    assert r.status_code == 422, (case, r.status_code, r.text)
    body = r.json()
    assert body["code"] == "invalid" and field in body["detail"], (case, body)


def test_not_found_and_bad_ids(admin: httpx.Client) -> None:
    for method, path in [("GET", "/api/v1/jobs/999999"), ("POST", "/api/v1/jobs/999999/cancel"),
                         ("GET", "/api/v1/jobs/999999/trials"), ("GET", "/api/v1/jobs/999999/pareto"),
                         ("GET", "/api/v1/trials/999999"), ("POST", "/api/v1/trials/999999/heartbeat"),
                         ("GET", "/api/v1/models/mdl_000000000000000000000000")]:
        r = admin.request(method, path)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    r = admin.post("/api/v1/jobs/999999/ask", json={"count": 1})
    assert r.status_code == 404
    r = admin.post("/api/v1/trials/999999/tell", json={"values": {"y": 1}})
    assert r.status_code == 404
    r = admin.get("/api/v1/jobs/abc")
    assert r.status_code == 422 and "job_id" in r.json()["detail"]


def test_tell_rejects_non_finite_and_missing_metric(admin: httpx.Client) -> None:
    jid = admin.post("/api/v1/jobs", json=_job(budget={"max_trials": 2, "max_parallel": 1})).json()["id"]
    t = admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1}).json()["trials"][0]
    for raw in ('{"values": {"y": NaN}}', '{"values": {"y": Infinity}}', '{"values": {"y": 1e999}}',
                '{"values": {"y": 1.0}, "sem": {"y": -1}}'):
        r = admin.post(f"/api/v1/trials/{t['id']}/tell", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert "values" in r.json()["detail"] or "sem" in r.json()["detail"]
    r = admin.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"z": 1.0}})
    assert r.status_code == 422 and "'y'" in r.json()["detail"]
    r = admin.post(f"/api/v1/trials/{t['id']}/tell", json={})
    assert r.status_code == 422
    r = admin.post(f"/api/v1/trials/{t['id']}/tell", content="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert admin.get(f"/api/v1/trials/{t['id']}").json()["state"] == "running"


def test_bad_query_values(admin: httpx.Client) -> None:
    for params in ({"limit": 0}, {"limit": 10**9}, {"cursor": "garbage!"}, {"limit": "x"}):
        r = admin.get("/api/v1/jobs", params=params)
        assert r.status_code == 422, (params, r.text)
    r = admin.post("/api/v1/jobs/1/ask", json={"count": 0})
    assert r.status_code in (404, 422)


def test_auth_roles(server: LiveServer) -> None:
    with server.client() as anon:
        r = anon.get("/api/v1/jobs")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    with server.client("bct_not-a-real-token") as bad:
        assert bad.get("/api/v1/jobs").status_code == 401
    alice, bob, worker = server.token("client", "alice"), server.token("client", "bob"), server.token("worker", "w")
    with server.client(alice) as a, server.client(bob) as b, server.client(worker) as w:
        jid = a.post("/api/v1/jobs", json=_job()).json()["id"]
        assert b.get(f"/api/v1/jobs/{jid}").status_code == 404  # invisible, not merely forbidden
        assert b.post(f"/api/v1/jobs/{jid}/cancel").status_code == 404
        assert jid not in [j["id"] for j in b.get("/api/v1/jobs").json()["items"]]
        r = w.post("/api/v1/jobs", json=_job())
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        assert a.post("/api/v1/workers/lease", json={"worker": "x"}).status_code == 403
        assert a.post("/api/v1/tokens", json={"role": "admin"}).status_code == 403
        assert w.post("/api/v1/workers/lease", json={"worker": "x"}).status_code in (200, 204)
    # revocation
    with server.client(server.admin_token) as adm:
        tokens = adm.get("/api/v1/tokens").json()["items"]
        tid = next(t["id"] for t in tokens if t["owner"] == "bob")
        assert adm.post(f"/api/v1/tokens/{tid}/revoke").status_code == 200
    with server.client(bob) as b:
        assert b.get("/api/v1/jobs").status_code == 401


def test_healthz_and_metrics(server: LiveServer, admin: httpx.Client) -> None:
    with server.client() as anon:
        assert anon.get("/healthz").json()["status"] == "ok"
        text = anon.get("/metrics").text
    assert "bocompress_trials" in text and "bocompress_lease_latency_seconds" in text
