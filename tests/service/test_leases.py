"""Leases: handed out exactly once under contention, expiry and re-lease, lost-lease results."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

from tests.conftest import LiveServer
from tests.service.helpers import compression_job, lease, profile_job

THREADS, PER_THREAD = 16, 500


def test_16_threads_x_500_leases_no_double_lease(server: LiveServer, admin: httpx.Client) -> None:
    total = THREADS * PER_THREAD
    job = compression_job(admin, max_trials=total, max_parallel=1024, lease_seconds=3600)
    profile_job(admin, job["id"], d=6)  # 6 rank fractions on a 64-step grid: room for 8000 distinct points
    wtok = server.token("worker", "pool")
    deadline = time.time() + 240

    got: list[tuple[int, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        mine = []
        with server.client(wtok, limits=httpx.Limits(max_connections=2)) as c:
            while len(mine) < PER_THREAD and time.time() < deadline:
                r = c.post("/api/v1/workers/lease", json={"worker": f"w{i}", "kinds": ["evaluate"]})
                if r.status_code == 204:  # buffer momentarily empty: the scheduler refills it
                    time.sleep(0.02)
                    continue
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                t = r.json()["trial"]
                mine.append((t["id"], t["attempt"]))
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert errors == [], errors[:5]
    assert len(got) == total
    dup = [k for k, n in Counter(tid for tid, _ in got).items() if n > 1]
    assert dup == [], f"trials leased twice: {dup[:10]}"
    counts = admin.get(f"/api/v1/jobs/{job['id']}").json()["counts"]
    assert counts["running"] == total and counts["queued"] == 0
    print(f"{total} leases by {THREADS} threads in {elapsed:.1f}s ({total / elapsed:.0f}/s)")


def test_expired_lease_is_handed_out_again_and_late_result_refused(server: LiveServer, admin: httpx.Client) -> None:
    job = compression_job(admin, max_trials=1, max_parallel=1, lease_seconds=1, max_attempts=3)
    profile_job(admin, job["id"])
    wtok = server.token("worker", "pool")
    with server.client(wtok) as w:
        first = None
        deadline = time.time() + 20
        while first is None and time.time() < deadline:
            first = lease(w, "old", ["evaluate"])
            time.sleep(0.05)
        assert first is not None and first["trial"]["attempt"] == 1
        tid = first["trial"]["id"]
        # let the lease expire; the reaper puts it back with attempt 2
        second = None
        deadline = time.time() + 20
        while second is None and time.time() < deadline:
            time.sleep(0.2)
            second = lease(w, "new", ["evaluate"])
        assert second is not None and second["trial"]["id"] == tid and second["trial"]["attempt"] == 2
        body = {"values": {"distill_l2": 0.1}, "sem": {"distill_l2": 0.01}}
        late = w.post(f"/api/v1/trials/{tid}/complete", json={**body, "lease_token": first["lease"]["token"]})
        assert late.status_code == 409 and late.json()["code"] == "lease_lost"
        hb = w.post(f"/api/v1/trials/{tid}/heartbeat", json={"lease_token": first["lease"]["token"]})
        assert hb.status_code == 409
        assert admin.get(f"/api/v1/trials/{tid}").json()["state"] == "running"
        ok1 = w.post(f"/api/v1/trials/{tid}/complete", json={**body, "lease_token": second["lease"]["token"]})
        ok2 = w.post(f"/api/v1/trials/{tid}/complete", json={**body, "lease_token": second["lease"]["token"]})
        assert ok1.status_code == ok2.status_code == 200, (ok1.text, ok2.text)
        assert ok1.json() == ok2.json()
        other = w.post(f"/api/v1/trials/{tid}/complete",
                       json={"values": {"distill_l2": 0.2}, "lease_token": second["lease"]["token"]})
        assert other.status_code == 409
    t = admin.get(f"/api/v1/trials/{tid}").json()
    assert t["state"] == "completed" and t["attempt"] == 2 and t["values"]["distill_l2"] == 0.1
    # exact R from the layer table, objective = kappa * L + R
    assert abs(t["values"]["objective"] - (0.1 + t["values"]["ratio"])) < 1e-12
    job = admin.get(f"/api/v1/jobs/{job['id']}").json()
    assert job["state"] == "completed" and job["counts"]["completed"] == 1


def test_lease_lost_too_often_is_abandoned(server: LiveServer, admin: httpx.Client) -> None:
    job = compression_job(admin, max_trials=1, max_parallel=1, lease_seconds=1, max_attempts=2)
    profile_job(admin, job["id"])
    attempts = []
    deadline = time.time() + 30
    while time.time() < deadline:
        got = lease(admin, "flaky", ["evaluate"])
        if got is not None:
            attempts.append(got["trial"]["attempt"])
        state = admin.get(f"/api/v1/jobs/{job['id']}").json()
        if state["counts"]["abandoned"] == 1:
            break
        time.sleep(0.2)
    assert attempts == [1, 2]
    # its only trial was abandoned: no evaluation completed, so the job failed, saying why
    assert state["state"] == "failed" and "every trial failed" in (state.get("reason") or ""), state


def test_heartbeat_extends_and_cancel_stops_running_trial(server: LiveServer, admin: httpx.Client) -> None:
    job = compression_job(admin, max_trials=2, max_parallel=2, lease_seconds=2)
    profile_job(admin, job["id"])
    got = None
    while got is None:
        got = lease(admin, "hb", ["evaluate"])
    tid, tok = got["trial"]["id"], got["lease"]["token"]
    for _ in range(4):  # 4 x 0.8 s > the 2 s lease: only heartbeats keep it
        time.sleep(0.8)
        r = admin.post(f"/api/v1/trials/{tid}/heartbeat", json={"lease_token": tok})
        assert r.status_code == 200, r.text
    assert admin.get(f"/api/v1/trials/{tid}").json()["attempt"] == 1
    admin.post(f"/api/v1/jobs/{job['id']}/cancel")
    r = admin.post(f"/api/v1/trials/{tid}/heartbeat", json={"lease_token": tok})
    assert r.status_code == 409 and r.json()["code"] == "cancelled"
