"""Jobs: create, list, inspect, cancel; their trials, Pareto set, and ask/tell."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from bocompress.schemas import (
    IMPORT_PATH_RE,
    ZOO_DATA,
    ZOO_MODELS,
    AskRequest,
    AskResponse,
    JobCreate,
    JobOut,
    Page,
    TellRequest,
    TrialOut,
)
from service.api.deps import MAX_ID, ClientDep, Context, CtxDep, Cursor, RowId
from service.api.errors import APIError, bad_request
from service.api.serialize import decode_cursor, encode_cursor, job_out, trial_out, trial_page_sql
from service.auth import Principal
from service.db.models import Blob, Job, Trial, utcnow
from service.db.session import read_session, run_tx
from service.db.trials import (
    NotFound,
    add_event,
    cancel_job,
    claim_next,
    complete,
    fail,
    lock_trial,
    pareto_front,
)

router = APIRouter(prefix="/api/v1", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no or bad token"}, 403: {"description": "wrong role"},
    404: {"description": "not found"}, 409: {"description": "conflict"}, 422: {"description": "invalid input"},
}


def _may_see(owner: str, p: Principal) -> bool:
    return p.is_admin or p.role == "worker" or owner == p.owner


def visible_job(s: Session, job_id: int, p: Principal) -> Job:
    """The job, if the caller may see it (admins: all; clients: their own); else 404."""
    job = s.get(Job, job_id)
    if job is None or not _may_see(job.owner, p):
        raise NotFound("job", job_id)
    return job


def visible_job_seq(s: Session, job_id: int, p: Principal) -> int:
    """:func:`visible_job` reading only the job's ``seq`` (polling: no JSON columns loaded)."""
    row = s.execute(select(Job.owner, Job.seq).where(Job.id == job_id)).first()
    if row is None or not _may_see(row.owner, p):
        raise NotFound("job", job_id)
    return int(row.seq)


def _check_refs(s: Session, body: JobCreate, p: Principal) -> None:
    c = body.compression
    assert c is not None
    if c.model.startswith("mdl_"):
        blob = s.get(Blob, c.model)
        if blob is None or blob.kind != "model" or (not p.is_admin and blob.owner != p.owner):
            raise bad_request("compression.model", f"no uploaded model {c.model!r}")
    elif c.model not in ZOO_MODELS and not IMPORT_PATH_RE.match(c.model):
        raise bad_request("compression.model",
                          f"{c.model!r} is neither an uploaded model id (mdl_...), a zoo model "
                          f"({', '.join(ZOO_MODELS)}) nor an import path 'package.module:factory'")
    if c.data.startswith("ds_"):
        blob = s.get(Blob, c.data)
        if blob is None or blob.kind != "dataset" or (not p.is_admin and blob.owner != p.owner):
            raise bad_request("compression.data", f"no uploaded dataset {c.data!r}")
    elif c.data not in ZOO_DATA:
        raise bad_request("compression.data",
                          f"{c.data!r} is neither an uploaded dataset id (ds_...) nor a built-in set "
                          f"({', '.join(ZOO_DATA)})")


#: The optimizer engines that allocate from a compression job's profile (service.optimizer.allocators).
ONE_SHOT_ENGINES = ("uniform", "energy", "global", "knapsack")


def _same_request(prior: Job, spec: dict[str, Any], key: str) -> None:
    """A reused ``Idempotency-Key`` must come with the same job: else 409 ``idempotency_mismatch``
    (as payment APIs answer), never the first job in silence."""
    if prior.spec != spec:
        raise APIError(409, f"Idempotency-Key {key[:60]!r} was already used for job {prior.id} with a different "
                            "body: send a new key for a different job", "idempotency_mismatch")


@router.post("/jobs", status_code=201, response_model=JobOut, responses={**ERRORS, 200: {
    "model": JobOut, "description": "the job an earlier request with the same Idempotency-Key made"}})
def create_job(body: JobCreate, ctx: CtxDep, p: ClientDep, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    """Create a compression job (profiled by a worker first) or a generic ask/tell job.

    A repeated request with the same ``Idempotency-Key`` returns the job the first one made.
    """
    spec = body.model_dump(mode="json", exclude_none=True)

    def _create(s: Session) -> dict[str, Any]:
        if idempotency_key:
            prior = s.execute(select(Job).where(Job.owner == p.owner, Job.idempotency_key == idempotency_key)
                              ).scalars().first()
            if prior is not None:
                _same_request(prior, spec, idempotency_key)
                response.status_code = 200
                return job_out(s, prior)
        now = utcnow()
        if not body.is_compression and body.optimizer.engine in ONE_SHOT_ENGINES:
            raise bad_request("optimizer.engine", f"{body.optimizer.engine!r} is a one-shot allocator for "
                              "compression jobs; a generic job takes 'auto', 'sobol' or 'gp'")
        if body.is_compression:
            _check_refs(s, body, p)
            job = Job(name=body.name, owner=p.owner, kind="compression", state="profiling", spec=spec,
                      idempotency_key=idempotency_key, created_at=now, updated_at=now, seq=0, n_created=0)
        else:
            space = [prm.model_dump() for prm in body.parameters or []]
            job = Job(name=body.name, owner=p.owner, kind="generic", state="running", spec=spec,
                      search_space=space, idempotency_key=idempotency_key, created_at=now, updated_at=now,
                      seq=0, n_created=0)
        s.add(job)
        s.flush()
        add_event(s, job.id, "job_created", detail=p.owner)
        if body.is_compression:
            s.add(Trial(job_id=job.id, kind="profile", number=0, seq=0, state="queued", params={}, values={},
                        sem={}, attempt=1, created_at=now))
        s.flush()
        return job_out(s, job, with_best=False)

    try:
        out = run_tx(ctx.factory, _create)
    except IntegrityError:
        # Two concurrent creates with one idempotency key: the other won; return its job.
        with read_session(ctx.factory) as s:
            prior = s.execute(select(Job).where(Job.owner == p.owner, Job.idempotency_key == idempotency_key)
                              ).scalars().first()
            if prior is None:
                raise
            _same_request(prior, spec, idempotency_key)
            response.status_code = 200
            out = job_out(s, prior)
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out


@router.get("/jobs", response_model=Page, responses=ERRORS)
def list_jobs(ctx: CtxDep, p: ClientDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              cursor: Cursor = None,
              state: Annotated[str | None, Query(max_length=20)] = None) -> Any:
    """Jobs, newest first, in pages: ``{"items": [...], "next_cursor": ...}``."""
    before = decode_cursor(cursor)
    with read_session(ctx.factory) as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit + 1)
        if not p.is_admin:
            q = q.where(Job.owner == p.owner)
        # a cursor above every id (PostgreSQL's INTEGER would refuse it) filters nothing
        if before is not None and before <= MAX_ID:
            q = q.where(Job.id < before)
        if state is not None:
            q = q.where(Job.state == state)
        rows = s.execute(q).scalars().all()
        items = [job_out(s, j) for j in rows[:limit]]
    nxt = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": items, "next_cursor": nxt}


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Job state, counts per trial state, the best trial, and (compression) the layer table."""
    with read_session(ctx.factory) as s:
        return job_out(s, visible_job(s, job_id, p))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
def cancel(job_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Stop a job: queued trials are cancelled, running ones stop at their next heartbeat."""

    def _cancel(s: Session) -> dict[str, Any]:
        job = visible_job(s, job_id, p)
        if job.state in ("completed", "failed", "cancelled"):
            return job_out(s, job)
        cancel_job(s, job, ctx.dialect)
        return job_out(s, job)

    return run_tx(ctx.factory, _cancel)


@router.get("/jobs/{job_id}/trials", response_model=Page, responses=ERRORS)
async def list_trials(job_id: RowId, ctx: CtxDep, p: ClientDep, response: Response,
                      since: Annotated[int, Query(ge=0, le=2**62)] = 0,
                      limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                      cursor: Cursor = None) -> Any:
    """Trials changed after ``since`` (a ``seq``), oldest change first.

    ``next_cursor`` is set when more changes remain; the ``X-Job-Seq`` header is the job's
    current ``seq``, the value to pass as ``since`` next time.
    """
    after = decode_cursor(cursor)
    since = max(since, after or 0)
    pg = ctx.hot_pg()
    if pg is not None:  # the dashboard's poll, on the event loop
        # The job's seq is read first: every change up to it has committed (a seq bump holds the
        # job row until its transaction ends), so the page that follows misses none of them.
        job = await pg.job_seq(job_id)
        if job is None or not _may_see(job.owner, p):
            raise NotFound("job", job_id)
        job_seq, rows = int(job.seq), await pg.trial_page(job_id, since, limit + 1)
    else:
        job_seq, rows = await run_in_threadpool(_trial_page, ctx, p, job_id, since, limit)
    if ctx.dialect == "postgresql":  # the items' JSON, built by the database
        items = "[" + ",".join(r[1] for r in rows[:limit]) + "]"
    else:
        items = json.dumps([trial_out(r) for r in rows[:limit]], ensure_ascii=False, separators=(",", ":"))
    nxt = encode_cursor(rows[limit - 1].seq) if len(rows) > limit else None
    body = '{"items":' + items + ',"next_cursor":' + json.dumps(nxt) + "}"
    return Response(body.encode(), media_type="application/json", headers={"X-Job-Seq": str(job_seq)})


def _trial_page(ctx: Context, p: Principal, job_id: int, since: int, limit: int) -> tuple[int, list[Any]]:
    """:func:`list_trials` in one read transaction: (the job's seq, up to limit + 1 rows).

    On PostgreSQL the rows are ``(seq, JSON)`` (:func:`trial_page_sql`); on SQLite, the columns
    :func:`trial_out` reads.
    """
    with read_session(ctx.factory) as s:
        job_seq = visible_job_seq(s, job_id, p)
        conn = s.connection()
        if ctx.dialect == "postgresql":
            return job_seq, conn.execute(trial_page_sql(), {"job": job_id, "since": since, "n": limit + 1}).all()
        t = Trial.__table__.c  # Core columns: no ORM row processing (a poll may carry thousands of rows)
        cols = [t.id, t.job_id, t.seq, t.number, t.state, t.params, t["values"], t.sem, t.attempt, t.worker,
                t.created_at, t.started_at, t.finished_at, t.error]
        return job_seq, conn.execute(select(*cols).where(t.job_id == job_id, t.kind == "evaluate", t.seq > since)
                                     .order_by(t.seq).limit(limit + 1)).all()


@router.get("/jobs/{job_id}/pareto", response_model=Page, responses=ERRORS)
def pareto(job_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Non-dominated completed trials in (L, R) = (distill_l2, ratio), both minimized, by R."""
    with read_session(ctx.factory) as s:
        job = visible_job(s, job_id, p)
        rows = s.execute(
            select(Trial).where(Trial.job_id == job_id, Trial.kind == "evaluate", Trial.state == "completed")
        ).scalars().all()
        if job.kind == "compression":
            pts = [(float(t.values["distill_l2"]), float(t.values["ratio"])) for t in rows]
        else:
            metric = job.spec["objective"].get("metric") or "objective"
            sign = -1.0 if job.spec["objective"].get("direction") == "maximize" else 1.0
            pts = [(sign * float(t.values.get(metric, float("inf"))), 0.0) for t in rows]
        front = sorted((rows[i] for i in pareto_front(pts)), key=lambda t: float(t.values.get("ratio", 0.0)))
        return {"items": [trial_out(t) for t in front], "next_cursor": None}


@router.post("/jobs/{job_id}/ask", response_model=AskResponse, responses=ERRORS)
async def ask(job_id: RowId, body: AskRequest, ctx: CtxDep, p: ClientDep) -> Any:
    """Up to ``count`` trials to evaluate yourself; empty when the budget is spent; 409
    ``job_finished`` when the job was cancelled or failed.

    Proposals come from the job's buffer, filled in the background (never computed here);
    this call waits up to ``ask_wait_seconds`` for the buffer to hold them. It waits on the event
    loop, not in a thread: a few clients waiting for proposals never hold the thread pool.
    """
    def _check() -> None:
        with read_session(ctx.factory) as s:
            job = visible_job(s, job_id, p)
            if job.kind != "generic":
                raise APIError(409, f"job {job_id} is a compression job: its trials are evaluated by workers",
                               "not_generic")
            if job.state in ("cancelled", "failed"):
                # Stopped before its budget was spent: nothing will ever be proposed. (A completed
                # job's budget is spent: it answers an empty list, the contract's "no more trials".)
                raise APIError(409, f"job {job_id} is {job.state}: it proposes no more trials", "job_finished")

    await run_in_threadpool(_check)
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + ctx.settings.ask_wait_seconds
    delay = 0.005
    while len(got) < body.count:
        def _claim(s: Session) -> tuple[dict[str, Any] | None, bool]:
            c = claim_next(s, worker=f"client:{p.owner}", kinds=("evaluate",), lease_seconds=0, job_id=job_id,
                           dialect=ctx.dialect)
            if c is not None:
                return trial_out(c.trial), False
            j = s.get(Job, job_id)
            assert j is not None
            exhausted = j.state != "running" or j.n_created >= int(j.spec["budget"]["max_trials"])
            return None, exhausted

        t, exhausted = await run_in_threadpool(run_tx, ctx.factory, _claim)
        if t is not None:
            got.append(t)
            delay = 0.005
            continue
        if exhausted or time.monotonic() > deadline:
            break
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.1)
    return {"trials": got}


@router.get("/trials/{trial_id}", response_model=TrialOut, responses=ERRORS)
def get_trial(trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    with read_session(ctx.factory) as s:
        t = s.get(Trial, trial_id)
        if t is None or t.kind != "evaluate":
            raise NotFound("trial", trial_id)
        visible_job(s, t.job_id, p)
        return trial_out(t)


def _trial_for_client(s: Session, ctx: Context, trial_id: int, p: Principal) -> tuple[Trial, Job]:
    t = lock_trial(s, trial_id, ctx.dialect)
    if t.kind != "evaluate":
        raise NotFound("trial", trial_id)
    job = visible_job(s, t.job_id, p)
    return t, job


@router.post("/trials/{trial_id}/tell", response_model=TrialOut, responses=ERRORS)
def tell(trial_id: RowId, body: TellRequest, ctx: CtxDep, p: ClientDep) -> Any:
    """Report the result of an asked trial (idempotent), or its failure."""

    def _tell(s: Session) -> dict[str, Any]:
        t, job = _trial_for_client(s, ctx, trial_id, p)
        if job.kind != "generic":
            raise APIError(409, f"trial {trial_id} belongs to a compression job: workers report it", "not_generic")
        if body.failed:
            fail(s, t, body.error or "failed", retry=False, lease_token=t.lease_token)  # the owner's own lease
            return trial_out(t)
        metric = job.spec["objective"].get("metric") or "objective"
        if metric not in body.values:
            raise bad_request("values", f"missing the job's metric {metric!r}")
        complete(s, t, dict(body.values), dict(body.sem), lease_token=t.lease_token)
        return trial_out(t)

    out = run_tx(ctx.factory, _tell)
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out
