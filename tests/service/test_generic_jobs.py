"""A generic job driven only by HTTP ask/tell, on SQLite and PostgreSQL."""

from __future__ import annotations

import math

import httpx


def branin(x0: float, x1: float) -> float:
    a, b, c, r, s, t = 1, 5.1 / (4 * math.pi**2), 5 / math.pi, 6, 10, 1 / (8 * math.pi)
    return a * (x1 - b * x0**2 + c * x0 - r) ** 2 + s * (1 - t) * math.cos(x0) + s


BRANIN = {
    "name": "branin",
    "parameters": [{"name": "x0", "type": "float", "low": -5.0, "high": 10.0},
                   {"name": "x1", "type": "float", "low": 0.0, "high": 15.0}],
    "objective": {"metric": "y", "direction": "minimize"},
    "budget": {"max_trials": 12, "max_parallel": 2},
    "optimizer": {"n_initial": 12, "seed": 0},
}


def test_branin_ask_tell_completes_and_since_returns_only_changes(admin: httpx.Client) -> None:
    job = admin.post("/api/v1/jobs", json=BRANIN).json()
    jid = job["id"]
    assert job["state"] == "running" and job["kind"] == "generic"
    seen_seq = 0
    told: dict[int, float] = {}
    while True:
        r = admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 2})
        assert r.status_code == 200, r.text
        trials = r.json()["trials"]
        if not trials:
            break
        for t in trials:
            assert t["state"] == "running"
            y = branin(t["params"]["x0"], t["params"]["x1"])
            r = admin.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y": y}, "sem": {"y": 0.0}})
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "completed"
            told[t["id"]] = y
        # since polling: only what changed after the last seq we saw
        page = admin.get(f"/api/v1/jobs/{jid}/trials", params={"since": seen_seq})
        items = page.json()["items"]
        assert all(i["seq"] > seen_seq for i in items)
        assert {t["id"] for t in trials} <= {i["id"] for i in items}
        seen_seq = int(page.headers["X-Job-Seq"])
        again = admin.get(f"/api/v1/jobs/{jid}/trials", params={"since": seen_seq}).json()["items"]
        assert again == [] or all(i["seq"] > seen_seq for i in again)
    job = admin.get(f"/api/v1/jobs/{jid}").json()
    assert job["state"] == "completed", job
    assert job["counts"]["completed"] == 12 and len(told) == 12
    everything = admin.get(f"/api/v1/jobs/{jid}/trials").json()["items"]
    assert sorted(t["id"] for t in everything) == sorted(told)
    for t in everything:
        assert t["values"]["y"] == told[t["id"]]
        assert admin.get(f"/api/v1/trials/{t['id']}").json()["values"]["y"] == told[t["id"]]
    assert job["best"]["values"]["y"] == min(told.values())
    # asking a finished job gives an empty list, not an error
    assert admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1}).json() == {"trials": []}


def test_tell_is_idempotent_and_conflicting_tell_is_409(admin: httpx.Client) -> None:
    jid = admin.post("/api/v1/jobs", json={**BRANIN, "budget": {"max_trials": 3, "max_parallel": 1}}).json()["id"]
    t = admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1}).json()["trials"][0]
    body = {"values": {"y": 1.5}}
    a = admin.post(f"/api/v1/trials/{t['id']}/tell", json=body)
    b = admin.post(f"/api/v1/trials/{t['id']}/tell", json=body)
    assert a.status_code == b.status_code == 200 and a.json()["seq"] == b.json()["seq"]
    c = admin.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y": 2.5}})
    assert c.status_code == 409 and c.json()["code"] == "duplicate"
    assert admin.get(f"/api/v1/trials/{t['id']}").json()["values"]["y"] == 1.5


def test_cancel_stops_a_job(admin: httpx.Client) -> None:
    jid = admin.post("/api/v1/jobs", json=BRANIN).json()["id"]
    t = admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1}).json()["trials"][0]
    r = admin.post(f"/api/v1/jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    late = admin.post(f"/api/v1/trials/{t['id']}/tell", json={"values": {"y": 1.0}})
    assert late.status_code == 409
    r = admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 1})  # a stopped job proposes nothing: 409
    assert r.status_code == 409 and r.json()["code"] == "job_finished", r.text
    assert admin.get(f"/api/v1/trials/{t['id']}").json()["state"] == "cancelled"


def test_idempotency_key_makes_one_job(admin: httpx.Client) -> None:
    h = {"Idempotency-Key": "create-once-123"}
    a = admin.post("/api/v1/jobs", json=BRANIN, headers=h)
    b = admin.post("/api/v1/jobs", json=BRANIN, headers=h)
    assert a.status_code == 201 and b.status_code == 200 and a.json()["id"] == b.json()["id"]


def test_list_jobs_cursor_pagination(admin: httpx.Client) -> None:
    ids = [admin.post("/api/v1/jobs", json={**BRANIN, "name": f"j{i}"}).json()["id"] for i in range(5)]
    got, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = admin.get("/api/v1/jobs", params=params).json()
        got += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(ids) == sorted(set(got) & set(ids)) and len(got) == len(set(got))
