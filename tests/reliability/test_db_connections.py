"""The database drops every connection mid-job (what a PostgreSQL restart does to the service).

The worker hot path's async pools and the ORM engine must both notice, reconnect and carry on:
no request may fail with a 5xx, and the cycle after the drop stores its result.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.conftest import _pg_conninfo, drop_pg_database, make_pg_database, start_server
from tests.service.helpers import compression_job, lease, profile_job


def _drop_connections(database_url: str) -> int:
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(_pg_conninfo(database_url).rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
    return len(rows)


@pytest.mark.parametrize("rounds", [3])
def test_worker_cycles_survive_dropped_connections(rounds: int) -> None:
    db = make_pg_database("drop")
    srv = start_server(db, scheduler_interval=0.1)
    try:
        with srv.client(srv.admin_token) as c:
            job = compression_job(c, max_trials=40, max_parallel=4, lease_seconds=600)
            profile_job(c, job["id"])
            done = 0
            for r in range(rounds):
                assert _drop_connections(db) > 0  # the service's pooled connections, all of them
                got, deadline = None, time.time() + 20
                while got is None and time.time() < deadline:  # 204 until the scheduler has proposals
                    got = lease(c, kinds=["evaluate"])
                    time.sleep(0 if got else 0.1)
                assert got is not None, f"round {r}: nothing to lease"
                tid, tok = got["trial"]["id"], got["lease"]["token"]
                hb = c.post(f"/api/v1/trials/{tid}/heartbeat", json={"lease_token": tok})
                assert hb.status_code == 200, hb.text
                _drop_connections(db)
                res = c.post(f"/api/v1/trials/{tid}/complete",
                             json={"values": {"distill_l2": 0.5}, "lease_token": tok})
                assert res.status_code == 200, res.text
                assert res.json()["state"] == "completed"
                done += 1
                _drop_connections(db)
                page = c.get(f"/api/v1/jobs/{job['id']}/trials")
                assert page.status_code == 200, page.text
                assert sum(t["state"] == "completed" for t in page.json()["items"]) == done
    finally:
        srv.stop()
        drop_pg_database(db)
