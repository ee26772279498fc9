"""The scheduler's incremental history (read by ``seq``) equals a full read of the job, through
leases, results, failures and lease expiry, on both backends."""

from __future__ import annotations

import time

import httpx

from bocompress.service.db.models import Job
from bocompress.service.db.session import read_session
from bocompress.service.optimizer import point_key
from bocompress.service.scheduler import History, job_problem, observations
from tests.conftest import LiveServer
from tests.service.helpers import compression_job, lease, profile_job


def _same(a: tuple, b: tuple) -> bool:
    (oa, pa), (ob, pb) = a, b
    return [(o.params, o.value, o.sem) for o in oa] == [(o.params, o.value, o.sem) for o in ob] and pa == pb


def test_incremental_history_matches_full_read(server: LiveServer, admin: httpx.Client) -> None:
    job = compression_job(admin, max_trials=30, max_parallel=6, max_attempts=2)
    profile_job(admin, job["id"])
    factory = server.app.state.ctx.factory
    with read_session(factory) as s:
        key = point_key(job_problem(s.get(Job, job["id"])))
    hist = History(key)

    def check() -> None:
        with read_session(factory) as s:
            j = s.get(Job, job["id"])
            full = observations(s, j)
            obs, pending, keys = hist.read(s, j)
            assert _same((obs, pending), full)
            assert keys == ([key(o.params) for o in full[0]], [key(p) for p in full[1]])

    check()
    done = 0
    for i in range(24):
        deadline = time.time() + 20
        while (got := lease(admin, kinds=["evaluate"])) is None:  # the buffer refills in the background
            assert time.time() < deadline, "no proposal within 20 s"
            time.sleep(0.05)
        tid, tok = got["trial"]["id"], got["lease"]["token"]
        if i % 5 == 3:  # a failure that is retried: back to queued
            r = admin.post(f"/api/v1/trials/{tid}/fail", json={"error": "oom", "retry": True, "lease_token": tok})
        elif i % 7 == 6:  # a failure for good: never reaches the GP
            r = admin.post(f"/api/v1/trials/{tid}/fail", json={"error": "bad", "lease_token": tok})
        else:
            r = admin.post(f"/api/v1/trials/{tid}/complete",
                           json={"values": {"distill_l2": 0.01 * (i + 1)}, "sem": {"distill_l2": 0.001},
                                 "lease_token": tok})
            done += 1
        assert r.status_code == 200, r.text
        check()
    assert done > 10
    with read_session(factory) as s:
        obs, pending, _ = hist.read(s, s.get(Job, job["id"]))
    assert len(obs) == done and pending
