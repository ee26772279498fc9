"""The trial list (the dashboard's poll): every item as ``GET /trials/{id}`` shows it, on both backends.

On PostgreSQL the items' JSON is built by the database; these tests pin it to the Python view
(:func:`bocompress.service.api.serialize.trial_out`) field by field, including nulls, error text that needs
escaping, timestamps with and without microseconds, and paging.
"""

from __future__ import annotations

import datetime as dt
import time

import httpx
from sqlalchemy import update

from bocompress.service.db.models import Trial
from bocompress.service.db.session import make_engine
from tests.conftest import LiveServer
from tests.service.test_generic_jobs import BRANIN


def _settled(admin: httpx.Client, jid: int) -> httpx.Response:
    """The full list once the scheduler has refilled the buffer (two reads 0.3 s apart agree)."""
    prev = admin.get(f"/api/v1/jobs/{jid}/trials")
    for _ in range(50):
        time.sleep(0.3)
        cur = admin.get(f"/api/v1/jobs/{jid}/trials")
        if cur.headers["X-Job-Seq"] == prev.headers["X-Job-Seq"]:
            return cur
        prev = cur
    raise AssertionError("the job kept changing")


def test_trial_list_items_equal_the_single_trial_view(server: LiveServer, admin: httpx.Client) -> None:
    jid = admin.post("/api/v1/jobs", json={**BRANIN, "budget": {"max_trials": 12, "max_parallel": 6}}).json()["id"]
    asked = admin.post(f"/api/v1/jobs/{jid}/ask", json={"count": 3}).json()["trials"]
    assert len(asked) == 3
    done, failed, running = asked
    r = admin.post(f"/api/v1/trials/{done['id']}/tell", json={"values": {"y": 0.1 + 0.2}, "sem": {"y": 1e-300}})
    assert r.status_code == 200, r.text
    error = 'out of memory: "layer\\fc1"\n\tünïcode ✓ \u2028'
    r = admin.post(f"/api/v1/trials/{failed['id']}/tell", json={"failed": True, "error": error})
    assert r.status_code == 200, r.text
    # a timestamp on a whole second: isoformat writes no fraction then, nor must the database
    engine = make_engine(server.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(Trial).where(Trial.id == running["id"])
                         .values(created_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)))
    finally:
        engine.dispose()

    page = _settled(admin, jid)
    assert page.status_code == 200 and page.headers["content-type"] == "application/json"
    items = page.json()["items"]
    assert page.json()["next_cursor"] is None
    assert {done["id"], failed["id"], running["id"]} <= {i["id"] for i in items}
    assert [i["seq"] for i in items] == sorted(i["seq"] for i in items)
    states = {i["state"] for i in items}
    assert {"completed", "failed", "running"} <= states
    for item in items:
        assert item == admin.get(f"/api/v1/trials/{item['id']}").json()
    by_id = {i["id"]: i for i in items}
    assert by_id[failed["id"]]["error"] == error
    assert by_id[done["id"]]["values"]["y"] == 0.1 + 0.2 and by_id[done["id"]]["sem"]["y"] == 1e-300
    assert by_id[running["id"]]["created_at"] == "2026-01-02T03:04:05Z"
    assert by_id[running["id"]]["finished_at"] is None and by_id[running["id"]]["values"] == {}

    # paging by cursor gives the same items, in the same order, once each
    paged, cursor = [], None
    while True:
        params: dict[str, object] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        got = admin.get(f"/api/v1/jobs/{jid}/trials", params=params).json()
        paged += got["items"]
        cursor = got["next_cursor"]
        if cursor is None:
            break
    assert paged == items

    # since: only what changed after it
    seq = int(page.headers["X-Job-Seq"])
    admin.post(f"/api/v1/trials/{running['id']}/tell", json={"values": {"y": 2.0}})
    newer = admin.get(f"/api/v1/jobs/{jid}/trials", params={"since": seq}).json()["items"]
    assert [i["id"] for i in newer] == [running["id"]] and newer[0]["state"] == "completed"
