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
from datetime import datetime
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


def _cheap(space: list[dict[str, Any]], compression: bool, incumbent: dict[str, float] | None, n_created: int,
           optimizer: dict[str, Any]) -> dict[str, float]:
    """A cheap proposer that shows what it was given: the incumbent's x plus 0.01, or 0.25 before one."""
    return {p["name"]: (incumbent[p["name"]] + 0.01 if incumbent else 0.25) for p in space}


def test_an_empty_buffer_is_answered_by_a_cheap_proposal(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ask or lease on an empty buffer while another consumer holds a trial: a cheap trial at once
    (marked), never past max_trials; the engine's batch computed meanwhile goes in after it (what
    still fits), not thrown away as raced. A lone sequential consumer waits for the engine."""
    from bocompress.service.db import sql_store

    store.set_cheap_proposer(_cheap)
    monkeypatch.setattr(sql_store, "FIRST_BATCH_GRACE_S", 3600.0)  # a just-profiled job: the engine's first

    async def go(s: Store) -> None:
        body = _spec(parameters=[{"name": "x", "type": "float", "low": 0.0, "high": 1.0}],
                     objective={"metric": "y", "direction": "minimize"},
                     budget={"max_trials": 4, "max_parallel": 2})
        spec = body.model_dump(mode="json", exclude_none=True)
        job, _ = await s.create_job(ME, "c", spec, [p.model_dump() for p in body.parameters or []], None)
        assert await s.ask(job["id"], ME, 1, wait_seconds=0.0) == []  # a lone asker waits for the engine
        assert await asyncio.to_thread(s.propose, job["id"], 0, [{"x": 0.1}]) == 1
        (a,) = await s.ask(job["id"], ME, 1, wait_seconds=0.0)
        assert (a["number"], a["proposal"]) == (0, "engine")
        (b,) = await s.ask(job["id"], ME, 1, wait_seconds=30.0)  # a second consumer while a runs: at once
        assert (b["number"], b["params"], b["proposal"]) == (1, {"x": 0.25}, "cheap")
        await s.tell(a["id"], ME, {"y": 0.5}, {}, False, None)
        await s.tell(b["id"], ME, {"y": 0.6}, {}, False, None)
        # the engine computed 3 points at n_created = 1; 1 trial went in meanwhile: 2 still fit, first kept
        assert await asyncio.to_thread(s.propose, job["id"], 1, [{"x": 0.2}, {"x": 0.3}, {"x": 0.4}]) == 2
        got = await s.ask(job["id"], ME, 3, wait_seconds=0.0)
        assert [(t["number"], t["params"]["x"], t["proposal"]) for t in got] == [(2, 0.2, "engine"), (3, 0.3, "engine")]
        with pytest.raises(TransitionError) as raced:  # nothing fits any more
            await asyncio.to_thread(s.propose, job["id"], 2, [{"x": 0.9}])
        assert raced.value.code == "raced"
        assert await s.ask(job["id"], ME, 1, wait_seconds=0.0) == []  # budget created: no cheap one either
        page = json.loads((await s.trial_page(job["id"], ME, 0, 100)).items_json)
        assert sorted(t["number"] for t in page) == [0, 1, 2, 3]
        assert {t["number"]: t["proposal"] for t in page} == {0: "engine", 1: "cheap", 2: "engine", 3: "engine"}

        # a worker with nothing queued gets a cheap proposal of a running compression job, near its
        # incumbent, while another worker holds one of its trials
        profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")
        cj = await _compression_job(s, {"kind": "scalarized", "kappa": 1.0})
        task = await s.lease("w1", ["profile"])
        assert task is not None
        await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
        assert await s.lease("w1", ["evaluate"]) is None  # the first batch is the engine's (for the grace)
        monkeypatch.setattr(sql_store, "FIRST_BATCH_GRACE_S", 0.0)
        assert await s.lease("w1", ["evaluate"]) is None  # a lone worker waits for the engine too
        assert await asyncio.to_thread(s.propose, cj["id"], 0, [{"fc0": 0.5, "fc1": 0.5}]) == 1
        a = await s.lease("w1", ["evaluate"])
        assert a is not None and a["trial"]["job_id"] == cj["id"] and a["trial"]["proposal"] == "engine"
        await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.1}))
        assert await asyncio.to_thread(s.propose, cj["id"], 1, [{"fc0": 0.3, "fc1": 0.3}]) == 1
        c = await s.lease("w2", ["evaluate"])
        assert c is not None and c["trial"]["number"] == 1 and c["trial"]["proposal"] == "engine"
        b = await s.lease("w3", ["evaluate"])  # the buffer is empty, w2 is busy: a cheap one, near the incumbent
        assert b is not None and b["trial"]["number"] == 2 and b["trial"]["proposal"] == "cheap"
        assert b["trial"]["params"] == {"fc0": 0.51, "fc1": 0.51} and b["lease"]["lease_seconds"] == 60.0
        assert await s.lease("w4", ["profile"]) is None  # only evaluations are made up
        assert await s.lease("w5", ["evaluate"]) is None  # max_trials 3: the budget is all created
        assert (await s.get_job(cj["id"], ME))["counts"]["running"] == 2

    run(store, go)


def test_asks_that_start_together_are_parallel_demand(store: Store) -> None:
    """Many askers starting at once on an empty buffer (no trial running yet) are answered by cheap
    proposals at once, not after the engine's first batch; a lone asker still waits for the engine."""
    store.set_cheap_proposer(_cheap)

    async def go(s: Store) -> None:
        body = _spec(parameters=[{"name": "x", "type": "float", "low": 0.0, "high": 1.0}],
                     objective={"metric": "y", "direction": "minimize"}, budget={"max_trials": 8, "max_parallel": 4})
        spec = body.model_dump(mode="json", exclude_none=True)
        job, _ = await s.create_job(ME, "crowd", spec, [p.model_dump() for p in body.parameters or []], None)
        assert await s.ask(job["id"], ME, 1, wait_seconds=0.0) == []  # alone: it waits for the engine
        t0 = asyncio.get_running_loop().time()
        got = await asyncio.gather(*(s.ask(job["id"], ME, 1, wait_seconds=20.0) for _ in range(3)))
        assert asyncio.get_running_loop().time() - t0 < 10.0  # not the 20 s wait: no engine runs here
        assert sorted(t["number"] for (t,) in got) == [0, 1, 2] and {t["proposal"] for (t,) in got} == {"cheap"}

    run(store, go)


def test_hot_ask_and_tell_write_what_the_orm_path_writes(database_url: str) -> None:
    """The backend's hot ask/tell and the ORM reference, on the same calls, leave the same trials
    (numbers, states, seqs, proposals, values) and the same event log, and answer the same."""
    from sqlalchemy import select

    from bocompress.service.db.models import Event, Job

    upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)

    async def scenario(s: Store) -> tuple[int, list[dict[str, Any]]]:
        s.set_cheap_proposer(_cheap)
        body = _spec(parameters=[{"name": "x", "type": "float", "low": 0.0, "high": 1.0}],
                     objective={"metric": "y", "direction": "minimize"}, budget={"max_trials": 3, "max_parallel": 2})
        spec = body.model_dump(mode="json", exclude_none=True)
        job, _ = await s.create_job(ME, "h", spec, [p.model_dump() for p in body.parameters or []], None)
        assert await asyncio.to_thread(s.propose, job["id"], 0, [{"x": 0.1}]) == 1
        answers = []
        (a,) = await s.ask(job["id"], ME, 1, wait_seconds=0.0)  # the engine's
        (b,) = await s.ask(job["id"], ME, 1, wait_seconds=0.0)  # a cheap one: a is running
        answers += [a, b, await s.tell(a["id"], ME, {"y": 0.5}, {"y": 0.01}, False, None)]
        (c,) = await s.ask(job["id"], ME, 1, wait_seconds=0.0)  # cheap, near the incumbent a
        answers += [c, await s.tell(b["id"], ME, {"y": 0.7}, {}, False, None),
                    await s.tell(c["id"], ME, {"y": 0.4}, {}, False, None)]
        assert await s.ask(job["id"], ME, 1, wait_seconds=0.0) == []
        assert (await s.get_job(job["id"], ME))["state"] == JobState.COMPLETED
        return job["id"], answers

    def drop(d: dict[str, Any]) -> dict[str, Any]:  # what differs between two jobs by nature
        return {k: v for k, v in d.items() if k not in ("id", "job_id", "created_at", "started_at", "finished_at")}

    async def both() -> list[tuple[int, list[dict[str, Any]]]]:
        out = []
        for s in (open_store(engine, factory, database_url), OrmStore(engine, factory)):
            await s.open()
            try:
                out.append(await scenario(s))
            finally:
                await s.close()
        return out

    try:
        (hot_job, hot_answers), (orm_job, orm_answers) = run_coroutine(both())
        assert [drop(t) for t in hot_answers] == [drop(t) for t in orm_answers]
        assert [t["proposal"] for t in hot_answers[:2]] == ["engine", "cheap"] and hot_answers[3]["params"] == {"x": 0.11}

        def log(job_id: int) -> tuple[Any, list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            def go(s: Any) -> Any:
                number = dict(s.execute(select(Trial.id, Trial.number).where(Trial.job_id == job_id)).all())
                events = [(number.get(e.trial_id), e.kind, e.from_state, e.to_state, e.detail)
                          for e in s.execute(select(Event).where(Event.job_id == job_id).order_by(Event.id)).scalars()]
                trials = [(t.number, t.state, t.seq, t.proposal, t.values, t.sem, t.worker, t.result_hash is not None)
                          for t in s.execute(select(Trial).where(Trial.job_id == job_id).order_by(Trial.number)).scalars()]
                j = s.execute(select(Job.seq, Job.n_created, Job.state).where(Job.id == job_id)).one()
                return tuple(j), events, trials
            return run_tx(factory, go)

        assert log(hot_job) == log(orm_job)
    finally:
        engine.dispose()


def test_without_a_cheap_proposer_an_empty_buffer_answers_nothing(store: Store) -> None:
    async def go(s: Store) -> None:
        body = _spec(parameters=[{"name": "x", "type": "float", "low": 0.0, "high": 1.0}])
        spec = body.model_dump(mode="json", exclude_none=True)
        job, _ = await s.create_job(ME, "n", spec, [p.model_dump() for p in body.parameters or []], None)
        assert await s.ask(job["id"], ME, 1, wait_seconds=0.0) == []
        assert await asyncio.to_thread(s.propose, job["id"], 0, [{"x": 0.5}]) == 1
        (t,) = await s.ask(job["id"], ME, 1, wait_seconds=0.0)
        assert t["proposal"] == "engine"

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


def test_uploads_are_kept_and_shown_only_to_their_owner(store: Store) -> None:
    tensors = {f"t{i:03d}": {"dtype": "F32", "shape": [i + 1], "data_offsets": [0, 4]} for i in range(105)}

    async def go(s: Store) -> None:
        model = await s.add_upload(ME, "model", b"weights", tensors, "digits-cnn",
                                   {"arch_spec": {"factory": "pkg.mod:make"}})
        assert model["id"].startswith("mdl_") and model["kind"] == "model" and model["arch"] == "digits-cnn"
        assert model["size"] == len(b"weights") and model["n_tensors"] == 105 and model["tensors_truncated"]
        assert len(model["tensors"]) == 100 and model["tensors"]["t000"] == [1]
        assert model["arch_spec"] == {"factory": "pkg.mod:make"}
        assert await s.get_upload(model["id"], "model", ME) == model
        assert await s.get_upload(model["id"], "model", ADMIN) == model  # admins and workers see all
        data, sha = await s.upload_file(model["id"], "model", ME)
        assert data == b"weights" and sha == model["sha256"]
        ds = await s.add_upload(ME, "dataset", b"inputs", {"inputs": {"dtype": "F32", "shape": [4, 2]}})
        assert ds["id"].startswith("ds_") and ds["arch"] is None and "arch_spec" not in ds
        assert not ds["tensors_truncated"] and ds["tensors"] == {"inputs": [4, 2]}
        for blob_id, kind, who in ((model["id"], "model", OTHER), (model["id"], "dataset", ME),
                                   (ds["id"], "model", ME), ("mdl_" + "0" * 24, "model", ME)):
            with pytest.raises(NotFound):
                await s.get_upload(blob_id, kind, who)
            with pytest.raises(NotFound):
                await s.upload_file(blob_id, kind, who)

    run(store, go)


def test_tokens_are_minted_listed_revoked_and_looked_up(store: Store) -> None:
    async def go(s: Store) -> None:
        before = len(await s.list_tokens())
        minted = await s.create_token("client", "alice", "laptop")
        assert minted["role"] == "client" and minted["owner"] == "alice" and minted["name"] == "laptop"
        assert minted["token"].startswith("bct_") and minted["revoked_at"] is None
        worker = await s.create_token("worker", None, None)
        assert worker["owner"] == "worker"
        who = await asyncio.to_thread(s.principal, minted["token"])
        assert who is not None and (who.role, who.owner, who.token_id) == ("client", "alice", minted["id"])
        assert await asyncio.to_thread(s.principal, "bct_unknown") is None
        listed = await s.list_tokens()
        assert len(listed) == before + 2 and [t["id"] for t in listed] == sorted(t["id"] for t in listed)
        assert all(t["token"] is None for t in listed)  # the secret is shown once
        gone = await s.revoke_token(minted["id"])
        assert gone["id"] == minted["id"] and gone["revoked_at"] is not None and gone["token"] is None
        assert (await s.revoke_token(minted["id"]))["revoked_at"] == gone["revoked_at"]  # again: a no-op
        assert await asyncio.to_thread(s.principal, minted["token"]) is None
        assert await asyncio.to_thread(s.principal, worker["token"]) is not None
        with pytest.raises(NotFound):
            await s.revoke_token(10**6)
        assert await s.ping() in ("sqlite", "postgresql")

    run(store, go)


def test_the_dashboard_reads_a_job_whole(store: Store) -> None:
    profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")

    async def go(s: Store) -> None:
        job = await _compression_job(s, {"kind": "scalarized"})
        bare = json.loads(await s.job_snapshot(job["id"], ME, with_trials=False))
        assert bare["job"]["id"] == job["id"] and bare["job"]["best"] is None and "trials" not in bare
        assert bare["job"]["warnings"] == [] and bare["job"]["collapsed"] is False
        task = await s.lease("w", ["profile"])
        await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
        await asyncio.to_thread(s.propose, job["id"], 0, [{"fc0": 0.25, "fc1": 0.5}, {"fc0": 0.5, "fc1": 0.75}])
        a = await s.lease("w", ["evaluate"])
        done = await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.1},
                                                                               sem={"distill_l2": 0.01}))
        snap = json.loads(await s.job_snapshot(job["id"], ME))
        page = await s.trial_page(job["id"], ME, 0, 100)
        assert snap["seq"] == page.job_seq and snap["job"]["state"] == JobState.RUNNING
        assert snap["job"]["best"] is None and snap["job"]["counts"]["completed"] == 1  # best: the page's to find
        trials = snap["trials"]
        assert trials["n"] == 2 and trials["id"] == [t["id"] for t in json.loads(page.items_json)]
        i = trials["id"].index(done["id"])
        assert trials["state"][i] == TrialState.COMPLETED and trials["values"][i] == done["values"]
        assert trials["sem"][i] == {"distill_l2": 0.01} and trials["params"][i] == {"fc0": 0.25, "fc1": 0.5}
        assert isinstance(trials["finished_at"][i], int) and trials["finished_at"][1 - i] is None
        assert abs(trials["created_at"][i] / 1000 - datetime.fromisoformat(done["created_at"]).timestamp()) < 1
        table = await s.trial_table(job["id"], ME)
        assert table.job_name == "j" and table.param_names == ["fc0", "fc1"]
        assert [r.number for r in table.rows] == [0, 1]
        row = next(r for r in table.rows if r.id == done["id"])
        assert row.values == done["values"] and row.state == TrialState.COMPLETED
        assert row.finished_at == done["finished_at"] and row.created_at == done["created_at"]
        for other in (s.job_snapshot(job["id"], OTHER), s.trial_table(job["id"], OTHER)):
            with pytest.raises(NotFound):
                await other

    run(store, go)


def _pipeline_job_spec(trials: int) -> dict[str, Any]:
    from bocompress.service.api.pipeline import recipe_spec

    body = _spec(compression={"model": "digits-cnn", "data": "digits", "method": {"Conv2d": "tucker2", "Linear": "svd"}},
                 objective={"kind": "scalarized"}, budget={"max_trials": trials, "max_parallel": trials},
                 recipe={"kind": "two-pass", "finetune": {"epochs": 2}})
    return recipe_spec(body, body.model_dump(mode="json", exclude_none=True))


async def _search(s: Store, job_id: int, profile: dict[str, Any], points: list[dict[str, float]]) -> list[dict]:
    """Play a worker: profile the job, then evaluate ``points`` (the job's whole budget)."""
    task = await s.lease("w", ["profile"])
    assert task is not None and task["job"]["id"] == job_id
    await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
    await asyncio.to_thread(s.propose, job_id, 0, points)
    out = []
    for i in range(len(points)):
        a = await s.lease("w", ["evaluate"])
        assert a is not None and a["job"]["id"] == job_id
        out.append(await s.complete(a["trial"]["id"], a["lease"]["token"], Result(values={"distill_l2": 0.01 * (i + 1)})))
    return out


def test_a_pipeline_advances_once_per_stage_and_fails_with_its_reason(store: Store, database_url: str) -> None:
    """A two-pass pipeline through every stage, each step taken once even by two replicas at once."""
    from concurrent.futures import ThreadPoolExecutor

    profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")
    engine2 = make_engine(database_url)
    replica = OrmStore(engine2, make_sessionmaker(engine2))

    def both() -> int:  # two replicas' schedulers advance at the same moment
        with ThreadPoolExecutor(2) as pool:
            return sum(pool.map(lambda st: st.advance_pipelines(), [store, replica]))

    async def go(s: Store) -> None:
        job, _ = await s.create_job(ME, "p", _pipeline_job_spec(2), None, None)
        assert job["pipeline"]["stage"] == "first" and job["spec"]["compression"]["method"] == {"Conv2d": "tucker2"}
        assert await asyncio.to_thread(both) == 0  # the first pass is still profiling
        t1 = await _search(s, job["id"], profile, [{"fc0": 0.25, "fc1": 0.25}, {"fc0": 0.5, "fc1": 0.5}])
        assert (await s.get_job(job["id"], ME))["state"] == JobState.COMPLETED
        assert await asyncio.to_thread(both) == 1 and await asyncio.to_thread(both) == 0
        pipe = (await s.get_job(job["id"], ME))["pipeline"]
        assert pipe["stage"] == "finetune" and pipe["export"]["trial_id"] == t1[0]["id"]  # the best (lowest L)
        assert pipe["ratios"] == [t1[0]["values"]["ratio"]]
        e = await s.lease("w", ["export"])
        assert e is not None and e["trial"]["id"] == pipe["export"]["task_id"]
        assert e["trial"]["params"]["retrain"] == {"mode": "finetune-distill", "epochs": 2, "batch_size": 64, "seed": 0}
        kept = await s.store_artifact(e["trial"]["id"], e["lease"]["token"], ADMIN, b"fine-tuned", {"w": {}})
        await s.complete(e["trial"]["id"], e["lease"]["token"], Result(values={"distill_l2": 0.005},
                                                                       artifact={"blob_id": kept["blob_id"]}))
        assert await asyncio.to_thread(both) == 1 and await asyncio.to_thread(both) == 0
        pipe = (await s.get_job(job["id"], ME))["pipeline"]
        assert pipe["stage"] == "second" and len(pipe["jobs"]) == 2
        listed = (await s.list_jobs(ME, 10, None, None)).items
        assert [j["id"] for j in listed] == [pipe["jobs"][1], job["id"]]  # exactly one second job
        job2 = await s.get_job(pipe["jobs"][1], ME)
        model = job2["spec"]["compression"]["model"]
        assert model == pipe["export"]["model"] and job2["spec"]["compression"]["method"] == {"Linear": "svd"}
        assert job2["pipeline"] == {**pipe, "pass": 2} and job2["owner"] == "me"
        assert await s.upload_file(model, "model", ME) == (b"fine-tuned", kept["sha256"])  # the owner's model
        t2 = await _search(s, job2["id"], profile, [{"fc0": 0.125, "fc1": 0.25}, {"fc0": 0.5, "fc1": 0.25}])
        assert await asyncio.to_thread(both) == 1
        pipe = (await s.get_job(job["id"], ME))["pipeline"]
        r1, r2 = t1[0]["values"]["ratio"], t2[0]["values"]["ratio"]
        assert pipe["stage"] == "done" and pipe["ratios"] == [r1, r2] and pipe["total_ratio"] == r1 * r2
        assert pipe["final"]["job_id"] == job2["id"] and pipe["final"]["trial_id"] == t2[0]["id"]
        assert await asyncio.to_thread(both) == 0

        # a failed fine-tune export fails the pipeline, with the reason; nothing follows
        bad, _ = await s.create_job(ME, "q", _pipeline_job_spec(1), None, None)
        await _search(s, bad["id"], profile, [{"fc0": 0.5, "fc1": 0.5}])
        assert await asyncio.to_thread(both) == 1
        e = await s.lease("w", ["export"])
        await s.fail(e["trial"]["id"], e["lease"]["token"], "CUDA out of memory", retry=False)
        assert await asyncio.to_thread(both) == 1
        pipe = (await s.get_job(bad["id"], ME))["pipeline"]
        assert pipe["stage"] == "failed" and "CUDA out of memory" in pipe["reason"] and pipe["jobs"] == [bad["id"]]

        # cancelling the first job cancels the export that waits, and the pipeline
        c, _ = await s.create_job(ME, "r", _pipeline_job_spec(1), None, None)
        await _search(s, c["id"], profile, [{"fc0": 0.5, "fc1": 0.5}])
        assert await asyncio.to_thread(both) == 1
        cancelled = await s.cancel(c["id"], ME)
        assert cancelled["pipeline"]["stage"] == "cancelled" and cancelled["state"] == JobState.COMPLETED
        assert await s.lease("w", ["export"]) is None

        # ... and at the second stage, the second job
        d, _ = await s.create_job(ME, "s", _pipeline_job_spec(1), None, None)
        await _search(s, d["id"], profile, [{"fc0": 0.5, "fc1": 0.5}])
        assert await asyncio.to_thread(both) == 1
        e = await s.lease("w", ["export"])
        kept = await s.store_artifact(e["trial"]["id"], e["lease"]["token"], ADMIN, b"ft", {"w": {}})
        await s.complete(e["trial"]["id"], e["lease"]["token"], Result(artifact={"blob_id": kept["blob_id"]}))
        assert await asyncio.to_thread(both) == 1
        second = (await s.cancel(d["id"], ME))["pipeline"]
        assert second["stage"] == "cancelled" and "'second'" in second["reason"]
        assert (await s.get_job(second["jobs"][1], ME))["state"] == JobState.CANCELLED
        assert await s.lease("w", ["profile", "evaluate"]) is None
        assert await asyncio.to_thread(both) == 0

    try:
        run(store, go)
    finally:
        engine2.dispose()


def test_workers_idle_together_are_parallel_demand(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new compression job whose engine has not answered (its first batch, the initial design,
    long overdue: a busy engine): a lone worker waits for it, but a second worker that finds nothing
    while the first is idle gets a cheap trial at once, and so does the first on its next poll; a
    worker idle long ago is no demand. Before the first batch is overdue, idle workers wait for it."""
    from bocompress.service.db import sql_store

    store.set_cheap_proposer(_cheap)
    monkeypatch.setattr(sql_store, "FIRST_BATCH_GRACE_S", 0.0)
    profile = ProfileReport.model_validate(synthetic_profile(2, 16)).model_dump(mode="json")

    async def profiled(s: Store, worker: str) -> dict[str, Any]:
        job = await _compression_job(s, {"kind": "scalarized", "kappa": 1.0})
        task = await s.lease(worker, ["profile"])
        assert task is not None
        await s.complete(task["trial"]["id"], task["lease"]["token"], Result(profile=profile))
        return job

    async def go(s: Store) -> None:
        cj = await profiled(s, "w1")
        assert await s.lease("w1", ["evaluate"]) is None  # alone: it waits for the engine's first batch
        assert await s.lease("w1", ["evaluate"]) is None  # polling again does not make it a crowd
        b = await s.lease("w2", ["evaluate"])  # w1 is idle too: parallel demand, no trial running yet
        assert b is not None and b["trial"]["job_id"] == cj["id"]
        assert (b["trial"]["number"], b["trial"]["proposal"]) == (0, "cheap")
        a = await s.lease("w1", ["evaluate"])  # now one runs: w1's next poll is answered as well
        assert a is not None and (a["trial"]["number"], a["trial"]["proposal"]) == (1, "cheap")
        for t in (a, b):
            await s.complete(t["trial"]["id"], t["lease"]["token"], Result(values={"distill_l2": 0.1}))
        monkeypatch.setattr(sql_store, "IDLE_WORKER_WINDOW_S", 0.0)  # w1's idle poll is long past
        assert await s.lease("w1", ["evaluate"]) is None
        assert await s.lease("w2", ["evaluate"]) is None  # no trial runs, nobody else idle just now
        assert (await s.get_job(cj["id"], ME))["counts"]["running"] == 0
        await s.cancel(cj["id"], ME)

        monkeypatch.setattr(sql_store, "IDLE_WORKER_WINDOW_S", 60.0)
        monkeypatch.setattr(sql_store, "FIRST_BATCH_GRACE_S", 3600.0)
        cj = await profiled(s, "w3")
        assert await s.lease("w3", ["evaluate"]) is None
        assert await s.lease("w4", ["evaluate"]) is None  # idle together, but the first batch is the engine's
        assert (await s.get_job(cj["id"], ME))["n_created"] == 0

    run(store, go)


def test_the_hot_incumbent_follows_every_change_made_by_any_process(database_url: str) -> None:
    """The incumbent a cheap proposal starts from (kept per process and folded forward from the trials
    changed since it last looked) is the trial that ranking every completed trial in SQL picks, after
    every tell, whichever of two service processes told it: ties (lowest id wins), failures, a trial
    told out of order, and the incumbent's own value changed behind its back."""
    import random

    from sqlalchemy import select

    from bocompress.service.db import hot
    from bocompress.service.db.queries import best_query
    from bocompress.service.db.trials import bump_seq

    upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    rng = random.Random(3)

    async def go() -> None:
        a, b = open_store(engine, factory, database_url), open_store(engine, factory, database_url)
        for s in (a, b):
            s.set_cheap_proposer(_cheap)
            await s.open()
        try:
            body = _spec(parameters=[{"name": "x", "type": "float", "low": 0.0, "high": 1.0}],
                         objective={"metric": "y", "direction": "minimize"}, budget={"max_trials": 60, "max_parallel": 60})
            job, _ = await a.create_job(ME, "h", body.model_dump(mode="json", exclude_none=True),
                                        [p.model_dump() for p in body.parameters or []], None)
            assert await asyncio.to_thread(a.propose, job["id"], 0, [{"x": 0.5}]) == 1
            running = [t for s in (a, b) for t in await s.ask(job["id"], ME, 1, wait_seconds=0.0)]
            checked = 0
            while running:
                t = running.pop(rng.randrange(len(running)))
                s = rng.choice((a, b))
                failed = rng.random() < 0.15
                y = float(rng.choice((0.5, 0.25, 0.25, 0.75)) if rng.random() < 0.5 else rng.random())
                await s.tell(t["id"], ME, {} if failed else {"y": y}, {}, failed, "boom" if failed else None)
                if rng.random() < 0.1:  # the incumbent's value changes behind the cache's back
                    def worsen(ss: Any) -> None:
                        best = ss.execute(best_query("y", False), {"job": job["id"]}).scalars().first()
                        if best is not None:
                            ss.execute(update(Trial).where(Trial.id == best.id).values(
                                values={"y": 2.0}, seq=bump_seq(ss, job["id"])))
                    run_tx(factory, worsen)
                with engine.connect() as conn:
                    info = a.jobs.get(conn, job["id"])
                    got = hot._best_params(conn, info)
                    row = conn.execute(best_query("y", False, params_only=True), {"job": job["id"]}).first()
                    assert (info.best[0][1], got) == ((None, None) if row is None else (row.id, dict(row.params)))
                    checked += row is not None
                for s in rng.sample((a, b), 2):  # keep a few trials in flight: cheap points, told out of order
                    if len(running) < 4 and (await s.get_job(job["id"], ME))["state"] == JobState.RUNNING:
                        running += await s.ask(job["id"], ME, 1, wait_seconds=0.0)
            assert checked > 30
        finally:
            for s in (a, b):
                await s.close()

    run_coroutine(go())
    engine.dispose()
