"""One conformance suite for every storage backend: the same calls, the same answers.

Each backend (:func:`bocompress.service.db.store.open_store`'s SQLite and PostgreSQL, with their hot paths,
and the ORM reference both fall back to) runs on a real database: a compression job from its
profiling task through leases, heartbeats, results, retries and failures to cancel; a generic
job through ask/tell; proposals, pages of trials, reaping, and the exact errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import update

from bocompress.objective import job_objective
from bocompress.schemas import JobCreate, ProfileReport
from bocompress.states import JobState, TrialState
from bocompress.service.db.errors import Invalid, NotFound, TransitionError
from bocompress.service.db.migrate import upgrade
from bocompress.service.db.models import Trial
from bocompress.service.db.session import make_engine, make_sessionmaker, run_tx
from bocompress.service.db.sql_store import OrmStore
from bocompress.service.db.store import Result, Store, Viewer, open_store
from tests.conftest import run_coroutine
from tests.service.helpers import synthetic_profile

ME = Viewer("me")
OTHER = Viewer("other")
ADMIN = Viewer("admin", sees_all=True)


@pytest.fixture(params=["backend", "orm"])
def store(request: pytest.FixtureRequest, database_url: str) -> Iterator[Store]:
    upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    s = open_store(engine, factory, database_url) if request.param == "backend" else OrmStore(engine, factory)
    yield s
    engine.dispose()


def run(store: Store, fn: Any) -> Any:
    """``fn(store)`` on one event loop, with the backend's pools open on it (the hot paths)."""
    async def go() -> Any:
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return run_coroutine(go())


def _spec(**kw: Any) -> JobCreate:
    body = {"name": "j", "budget": {"max_trials": 3, "max_parallel": 3, "max_attempts": 2}, **kw}
    return JobCreate.model_validate(body)


async def _compression_job(s: Store, objective: dict[str, Any]) -> dict[str, Any]:
    body = _spec(compression={"model": "digits-cnn", "data": "digits", "method": "svd"}, objective=objective)
    job, created = await s.create_job(ME, body.name, body.model_dump(mode="json", exclude_none=True), None, None)
    assert created and job["state"] == JobState.PROFILING and job["kind"] == "compression"
    return job


def test_a_compression_job_through_every_transition(store: Store) -> None:
    profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")

    async def go(s: Store) -> None:
        job = await _compression_job(s, {"kind": "constrained", "budget": 0.5})
        task = await s.lease("w1", ["profile", "evaluate"])
        assert task is not None and task["task"] == "profile" and task["job"]["id"] == job["id"]
        assert await s.lease("w2", ["profile", "evaluate"]) is None  # nothing else queued
        with pytest.raises(Invalid, match="profile"):  # a profiling result must carry the table
            await s.complete(task["trial"]["id"], task["lease"]["token"], Result())
        done = await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
        assert done["state"] == TrialState.COMPLETED
        job = await s.get_job(job["id"], ME)
        assert job["state"] == JobState.RUNNING and [p["name"] for p in job["search_space"]] == ["fc0", "fc1"]

        # proposals: guarded on n_created
        pts = [{"fc0": 0.125, "fc1": 0.125}, {"fc0": 0.5, "fc1": 0.5}, {"fc0": 0.25, "fc1": 0.25}]
        assert await asyncio.to_thread(s.propose, job["id"], 0, pts) == 3
        with pytest.raises(TransitionError) as raced:
            await asyncio.to_thread(s.propose, job["id"], 0, pts[:1])
        assert raced.value.code == "raced"

        # lease → heartbeat → complete; the stored objective is J
        a = await s.lease("w1", ["evaluate"])
        assert a is not None and a["trial"]["number"] == 0 and a["trial"]["state"] == TrialState.RUNNING
        assert a["lease"]["lease_seconds"] == 60.0 and a["job"]["spec"]["objective"]["budget"] == 0.5
        hb = await s.heartbeat(a["trial"]["id"], a["lease"]["token"])
        assert hb["lease"]["token"] == a["lease"]["token"] and hb["lease"]["attempt"] == 1
        with pytest.raises(TransitionError) as lost:
            await s.heartbeat(a["trial"]["id"], "not-the-token")
        assert lost.value.code == "lease_lost"
        with pytest.raises(Invalid, match="distill_l2"):
            await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"accuracy": 0.9}))
        out = await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.02}))
        v = out["values"]
        assert out["state"] == TrialState.COMPLETED and v["feasible"] == 1.0
        assert v["objective"] == job_objective("constrained", 0.02, v["ratio"], budget=0.5) == 0.02
        again = await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.02}))
        assert again["seq"] == out["seq"]  # the same result twice is stored once
        with pytest.raises(TransitionError) as dup:
            await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.5}))
        assert dup.value.code == "duplicate"

        # fail with retry → queued again (attempt 2); then fail for good
        b = await s.lease("w1", ["evaluate"])
        assert b is not None and b["trial"]["number"] == 1
        requeued = await s.fail(b["trial"]["id"], b["lease"]["token"], "CUDA out of memory", retry=True)
        assert requeued["state"] == TrialState.QUEUED and requeued["attempt"] == 2
        with pytest.raises(TransitionError) as stale:  # the old lease is gone
            await s.complete(b["trial"]["id"], b["lease"]["token"], Result(values={"distill_l2": 0.1}))
        assert stale.value.code == "lease_lost"
        b2 = await s.lease("w2", ["evaluate"])
        assert b2 is not None and b2["trial"]["id"] == b["trial"]["id"] and b2["lease"]["attempt"] == 2
        failed = await s.fail(b2["trial"]["id"], b2["lease"]["token"], "broken", retry=True)  # attempts spent
        assert failed["state"] == TrialState.FAILED and failed["error"] == "broken"

        # pages of trials: every change after a seq, oldest first, in pages
        first = await s.trial_page(job["id"], ME, 0, 2)
        items = json.loads(first.items_json)
        assert len(items) == 2 and first.next_seq == items[-1]["seq"] and first.job_seq >= items[-1]["seq"]
        rest = json.loads((await s.trial_page(job["id"], ME, first.next_seq, 10)).items_json)
        assert {t["number"] for t in items + rest} == {0, 1, 2} and [t["seq"] for t in items + rest] == sorted(
            t["seq"] for t in items + rest)
        assert (await s.get_trial(a["trial"]["id"], ME))["values"] == v
        assert [t["id"] for t in await s.pareto(job["id"], ME)] == [a["trial"]["id"]]
        with pytest.raises(NotFound):
            await s.trial_page(job["id"], OTHER, 0, 10)
        with pytest.raises(NotFound):
            await s.get_job(job["id"], OTHER)
        assert (await s.get_job(job["id"], ADMIN))["counts"] == {
            "queued": 1, "running": 0, "completed": 1, "failed": 1, "cancelled": 0, "abandoned": 0}

        # cancel: the open trial is cancelled, nothing is leased any more, a lease holder hears it
        c = await s.lease("w1", ["evaluate"])
        assert c is not None
        cancelled = await s.cancel(job["id"], ME)
        assert cancelled["state"] == JobState.CANCELLED
        assert await s.lease("w1", ["evaluate"]) is None
        with pytest.raises(TransitionError) as gone:
            await s.heartbeat(c["trial"]["id"], c["lease"]["token"])
        assert gone.value.code == "cancelled"
        assert (await s.cancel(job["id"], ME))["state"] == JobState.CANCELLED  # idempotent

    run(store, go)


def test_a_generic_job_through_ask_and_tell(store: Store) -> None:
    async def go(s: Store) -> None:
        body = _spec(parameters=[{"name": "x", "type": "float", "low": 0.0, "high": 1.0}],
                     objective={"metric": "y", "direction": "maximize"})
        spec = body.model_dump(mode="json", exclude_none=True)
        space = [p.model_dump() for p in body.parameters or []]
        job, created = await s.create_job(ME, "g", spec, space, "key-1")
        assert created and job["state"] == JobState.RUNNING
        same, created = await s.create_job(ME, "g", spec, space, "key-1")
        assert not created and same["id"] == job["id"]
        with pytest.raises(TransitionError) as mismatch:
            await s.create_job(ME, "g", {**spec, "name": "other"}, space, "key-1")
        assert mismatch.value.code == "idempotency_mismatch"
        assert await asyncio.to_thread(s.propose, job["id"], 0, [{"x": 0.1}, {"x": 0.9}, {"x": 0.5}]) == 3
        assert await s.lease("w", ["evaluate"]) is None  # workers never lease ask/tell trials
        got = await s.ask(job["id"], ME, 2, wait_seconds=0.0)
        assert [t["number"] for t in got] == [0, 1] and all(t["worker"] == "client:me" for t in got)
        with pytest.raises(NotFound):  # nor report them
            await s.complete(got[0]["id"], "x", Result(values={"y": 1.0}))
        with pytest.raises(Invalid, match="metric 'y'"):
            await s.tell(got[0]["id"], ME, {"z": 1.0}, {}, False, None)
        low = await s.tell(got[0]["id"], ME, {"y": 0.2}, {}, False, None)
        high = await s.tell(got[1]["id"], ME, {"y": 0.7}, {}, False, None)
        assert low["state"] == high["state"] == TrialState.COMPLETED
        assert (await s.get_job(job["id"], ME))["best"]["id"] == high["id"]  # maximized
        with pytest.raises(NotFound):
            await s.tell(got[0]["id"], OTHER, {"y": 1.0}, {}, False, None)
        last = await s.ask(job["id"], ME, 5, wait_seconds=0.0)
        assert [t["number"] for t in last] == [2]
        failed = await s.tell(last[0]["id"], ME, {}, {}, True, "diverged")
        assert failed["state"] == TrialState.FAILED
        assert (await s.get_job(job["id"], ME))["state"] == JobState.COMPLETED  # budget spent, nothing open
        assert await s.ask(job["id"], ME, 1, wait_seconds=0.0) == []
        page = await s.list_jobs(ME, 10, None, None)
        assert [j["id"] for j in page.items] == [job["id"]] and page.next_id is None
        assert (await s.list_jobs(OTHER, 10, None, None)).items == []

    run(store, go)


def test_expired_leases_are_reaped(store: Store) -> None:
    profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")

    async def go(s: Store) -> None:
        job = await _compression_job(s, {"kind": "scalarized", "kappa": 2.0})
        task = await s.lease("w", ["profile"])
        await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
        await asyncio.to_thread(s.propose, job["id"], 0, [{"fc0": 0.25, "fc1": 0.5}])
        a = await s.lease("w", ["evaluate"])

        def expire(sess: Any) -> None:
            from datetime import timedelta

            from bocompress.service.db.models import utcnow

            sess.execute(update(Trial).where(Trial.id == a["trial"]["id"])
                         .values(lease_expires_at=utcnow() - timedelta(seconds=5)))

        run_tx(s.factory, expire)  # type: ignore[attr-defined]
        # the next lease finds the queue empty, reaps, and hands the trial out again (attempt 2)
        b = await s.lease("w2", ["evaluate"])
        assert b is not None and b["trial"]["id"] == a["trial"]["id"] and b["lease"]["attempt"] == 2
        with pytest.raises(TransitionError):
            await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.1}))
        out = await s.complete(b["trial"]["id"], b["lease"]["token"], Result(values={"distill_l2": 0.1}))
        assert out["values"]["objective"] == pytest.approx(2.0 * 0.1 + out["values"]["ratio"])
        assert (await s.get_job(job["id"], ME))["state"] == JobState.RUNNING  # 1 of 3 created

    run(store, go)


def test_an_export_task_from_request_to_artifact(store: Store) -> None:
    profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")

    async def go(s: Store) -> None:
        job = await _compression_job(s, {"kind": "scalarized"})
        task = await s.lease("w", ["profile"])
        await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
        await asyncio.to_thread(s.propose, job["id"], 0, [{"fc0": 0.25, "fc1": 0.5}])
        a = await s.lease("w", ["evaluate"])
        with pytest.raises(TransitionError) as early:  # only a completed trial is exported
            await s.request_export(job["id"], a["trial"]["id"], ME, 0, 1e-4)
        assert early.value.code == "not_completed"
        await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.1}))
        ex = await s.request_export(job["id"], a["trial"]["id"], ME, 10, 1e-3)
        assert ex["state"] == TrialState.QUEUED and ex["trial_id"] == a["trial"]["id"] and ex["finetune_steps"] == 10
        assert (await s.request_export(job["id"], a["trial"]["id"], ME, 10, 1e-3))["id"] == ex["id"]  # same again
        with pytest.raises(NotFound):
            await s.get_export(job["id"], a["trial"]["id"], OTHER)
        with pytest.raises(TransitionError) as pending:
            await s.artifact(job["id"], a["trial"]["id"], ME)
        assert pending.value.code == "export_pending" and pending.value.headers == {"Retry-After": "2"}
        e = await s.lease("w", ["export"])
        assert e is not None and e["task"] == "export" and e["source"]["id"] == a["trial"]["id"]
        with pytest.raises(TransitionError) as lost:
            await s.store_artifact(e["trial"]["id"], "stale", ADMIN, b"x", {})
        assert lost.value.code == "lease_lost"
        kept = await s.store_artifact(e["trial"]["id"], e["lease"]["token"], ADMIN, b"model bytes", {"w": {}})
        assert kept["size"] == len(b"model bytes") and kept["blob_id"].startswith("art_")
        done = await s.complete(e["trial"]["id"], e["lease"]["token"],
                                Result(values={"distill_l2_before": 0.1}, artifact={"blob_id": kept["blob_id"]}))
        assert done["state"] == TrialState.COMPLETED
        got = await s.get_export(job["id"], a["trial"]["id"], ME)
        assert got["state"] == TrialState.COMPLETED and got["artifact"] == {"blob_id": kept["blob_id"]}
        assert await s.artifact(job["id"], a["trial"]["id"], ME) == (b"model bytes", kept["sha256"])

    run(store, go)
