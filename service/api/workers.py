"""The worker side: lease work, heartbeat, report results and failures."""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from bocompress import costs
from bocompress.schemas import CompleteRequest, FailRequest, HeartbeatRequest, LeaseRequest, LeaseResponse, TrialOut
from service.api.deps import Context, CtxDep, RowId, WorkerDep
from service.api.errors import APIError, bad_request
from service.api.jobs import ERRORS
from service.api.serialize import iso, job_light, job_out, trial_out
from service.db import hot
from service.db.hot import Finished
from service.db.models import Job, Trial
from service.db.session import read_session, run_conn, run_tx
from service.db.trials import (
    NotFound,
    add_event,
    claim_next,
    close_job_if_done,
    complete,
    compression_values,
    fail,
    heartbeat,
    lock_trial,
    reap_expired,
    result_hash,
    set_job_state,
)

router = APIRouter(prefix="/api/v1", tags=["workers"])
log = logging.getLogger("bocompress.trials")


class _Fallback(Exception):
    """The hot path met an unusual case: roll back and let the ORM path answer it exactly."""


def _lease_info(token: str | None, expires_at: Any, lease_seconds: float, attempt: int) -> dict[str, Any]:
    """The ``lease`` object of lease and heartbeat answers."""
    return {"token": token, "expires_at": iso(expires_at), "lease_seconds": lease_seconds, "attempt": attempt}


def _log_transition(event: str, row: Any, prev: str) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("trial %s", event, extra={"job_id": row.job_id, "trial_id": row.id, "from_state": prev,
                                            "to_state": row.state, "attempt": row.attempt, "worker": row.worker})


def _lease_answer(trial: Any, job_view: dict[str, Any], lease_seconds: float) -> dict[str, Any]:
    return {"task": trial.kind, "trial": trial_out(trial), "job": job_view,
            "lease": _lease_info(trial.lease_token, trial.lease_expires_at, lease_seconds, trial.attempt)}


def _lease_sync(ctx: Context, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
    """A lease off the event loop: SQLite's hot path, else the ORM's :func:`claim_next`."""
    if ctx.dialect == "sqlite":
        got = run_conn(ctx.engine, lambda c: hot.lease(c, ctx.jobs, worker, kinds))
        if got is None:
            return None
        row, dyn, info = got
        return row, _lease_answer(row, job_light(info, dyn), info.lease_seconds)

    def _claim(s: Session) -> tuple[Any, dict[str, Any]] | None:
        c = claim_next(s, worker, kinds, dialect=ctx.dialect)
        if c is None:
            return None
        return c.trial, _lease_answer(c.trial, job_out(None, c.job, light=True),
                                      float(c.job.spec["budget"]["lease_seconds"]))

    return run_tx(ctx.factory, _claim) if kinds else None


@router.post("/workers/lease", response_model=LeaseResponse, responses={**ERRORS, 204: {"description": "no work"}})
async def lease(ctx: CtxDep, p: WorkerDep, body: Annotated[LeaseRequest | None, Body()] = None) -> Any:
    """A trial (or a profiling/export task) with its job spec and lease, or 204 when none is queued."""
    body = body or LeaseRequest()
    t0 = time.perf_counter()
    worker = f"{p.owner}/{body.worker}" if p.owner not in ("local", body.worker) else body.worker
    kinds = list(body.kinds)
    pg = ctx.hot_pg()

    async def _lease() -> tuple[Any, dict[str, Any]] | None:
        if pg is None:
            return await run_in_threadpool(_lease_sync, ctx, worker, kinds)
        got = await pg.lease(worker, kinds)
        if got is None:
            return None
        row, dyn, info = got
        # Built after the commit: the job row, locked by the lease's seq bump, is not held while
        # Python encodes the answer.
        return row, _lease_answer(row, job_light(info, dyn), info.lease_seconds)

    got = await _lease()
    if got is None and await run_in_threadpool(run_tx, ctx.factory, lambda s: reap_expired(s, limit=50)) > 0:
        got = await _lease()
    ctx.metrics.observe_lease(time.perf_counter() - t0, worker, got is not None)
    if got is None:
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        return Response(status_code=204)
    row, out = got
    _log_transition("leased", row, "queued")
    if row.kind == "export":
        def _source() -> dict[str, Any] | None:
            with read_session(ctx.factory) as s:
                src = s.get(Trial, int(row.params["trial_id"]))
                return trial_out(src) if src is not None else None

        out["source"] = await run_in_threadpool(_source)
    return JSONResponse(out)


def _token(body_token: str | None, header_token: str | None) -> str | None:
    return body_token or header_token


def _worker_trial(s: Session, ctx: Context, trial_id: int) -> tuple[Trial, Job]:
    """The trial (locked) and its job, for a worker's call; 404 for a trial of a client-evaluated
    (ask/tell) job, which only its owner writes, through ``tell``."""
    t = lock_trial(s, trial_id, ctx.dialect)
    job = s.get(Job, t.job_id)
    assert job is not None
    if t.kind == "evaluate" and job.kind != "compression":
        raise NotFound("trial", trial_id)
    return t, job


@router.post("/trials/{trial_id}/heartbeat", responses=ERRORS)
async def heartbeat_route(trial_id: RowId, ctx: CtxDep, p: WorkerDep,
                          body: Annotated[HeartbeatRequest | None, Body()] = None,
                          x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """Extend the lease; 409 when it was lost or the job was cancelled."""
    tok = _token(body.lease_token if body else None, x_lease_token)
    pg = ctx.hot_pg()
    if pg is not None:
        got = await pg.heartbeat(trial_id, tok)
    elif ctx.dialect == "sqlite":
        got = await run_in_threadpool(run_conn, ctx.engine, lambda c: hot.heartbeat(c, ctx.jobs, trial_id, tok))
    else:
        got = None
    if got is not None:
        row, info = got
        return JSONResponse({"lease": _lease_info(row.lease_token, row.lease_expires_at, info.lease_seconds,
                                                  row.attempt)})

    def _hb(s: Session) -> dict[str, Any]:  # the unusual cases, with their exact errors
        t, job = _worker_trial(s, ctx, trial_id)
        heartbeat(s, t, tok)
        return {"lease": _lease_info(t.lease_token, t.lease_expires_at, float(job.spec["budget"]["lease_seconds"]),
                                     t.attempt)}

    return await run_in_threadpool(run_tx, ctx.factory, _hb)


def _validate_profile(job: Job, body: CompleteRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if body.profile is None:
        raise bad_request("profile", "a profiling task's result must carry the layer table")
    prof = body.profile.model_dump(mode="json")
    names = [sp["name"] for sp in prof["params"]]
    if len(set(names)) != len(names):
        raise bad_request("profile.params", "names must be unique")
    known = set(names)
    cost_kind = job.spec["objective"].get("cost", "params")
    for i, layer in enumerate(prof["layers"]):
        for kind, form in layer["costs"].items():
            if kind not in layer["dense"]:
                raise bad_request(f"profile.layers.{i}.dense", f"missing the dense cost of kind {kind!r}")
            for term in form["terms"]:
                for f in term["factors"]:
                    if f["param"] not in known:
                        raise bad_request(f"profile.layers.{i}.costs", f"unknown parameter {f['param']!r}")
    for kind, total in prof["totals"].items():
        if not (math.isfinite(total) and total > 0):
            raise bad_request(f"profile.totals.{kind}", "must be a positive number")
    space = []
    for sp in prof["params"]:
        if not (0.0 < sp["low"] < sp["high"] <= 1.0 + 1e-9):
            raise bad_request("profile.params", f"{sp['name']}: need 0 < low < high <= 1")
        space.append({"name": sp["name"], "type": "float", "low": sp["low"], "high": sp["high"], "log": False,
                      "size": sp.get("size", 0)})
    if cost_kind not in prof["totals"]:
        raise APIError(422, f"profile.totals: the method gives no {cost_kind!r} cost, which the objective uses",
                       "unsupported_cost")
    full = {sp["name"]: sp["high"] for sp in prof["params"]}
    r = costs.ratio(prof, full, cost_kind)
    if not math.isfinite(r):
        raise bad_request("profile", "the cost forms give a non-finite ratio")
    return prof, space


def _unreachable_budget(job: Job, prof: dict[str, Any], space: list[dict[str, Any]]) -> str | None:
    """Why a ``constrained`` job's budget cannot be met, or None: its budget is below the smallest R
    the space allows (every parameter at its lowest ``k / size`` step, as the engine rounds)."""
    obj = job.spec["objective"]
    if obj.get("kind") != "constrained" or obj.get("budget") is None:
        return None
    low = {}
    for sp in space:
        size = int(sp.get("size") or 0)
        low[sp["name"]] = (max(1, math.ceil(sp["low"] * size - 1e-9)) / size) if size > 0 else sp["low"]
    r_min = costs.ratio(prof, low, obj.get("cost", "params"))
    budget = float(obj["budget"])
    if r_min <= budget + 1e-12:
        return None
    return (f"the budget R <= {budget:g} is unreachable: the smallest R this search space allows "
            f"(theta_min everywhere) is {r_min:.4f}; raise objective.budget to at least {r_min:.4f}, "
            f"lower compression.theta_min, or select more layers")


def _evaluate_values(job: Any, params: dict[str, Any], values: dict[str, float]) -> dict[str, float]:
    """An evaluation's stored values: checked against the job's metric; for compression jobs, R and
    the objective computed here, exactly, from the layer table (a function of the report, so the
    same report twice hashes the same and is stored once)."""
    if job.kind == "compression":
        if "distill_l2" not in values or values["distill_l2"] < 0:
            raise bad_request("values.distill_l2", "required, a finite number >= 0")
        return compression_values(job, params, values)
    metric = job.spec["objective"].get("metric") or "objective"
    if metric not in values:
        raise bad_request("values", f"missing the job's metric {metric!r}")
    return values


def _hot_result_ok(t: Any, tok: str | None) -> bool:
    """Whether the hot path may store this result (an evaluation, running, the caller's lease)."""
    return (t is not None and t.kind == "evaluate" and t.state == "running"
            and tok is not None and t.lease_token is not None and tok == t.lease_token)


def _hot_values(info: Any, t: Any, body: CompleteRequest) -> tuple[dict[str, float], dict[str, float], str]:
    values = _evaluate_values(info, t.params, dict(body.values))
    sem = dict(body.sem)
    return values, sem, result_hash(values, sem, None)


@router.post("/trials/{trial_id}/complete", response_model=TrialOut, responses=ERRORS)
async def complete_route(trial_id: RowId, body: CompleteRequest, ctx: CtxDep, p: WorkerDep,
                         x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's result; idempotent (the same result twice is stored once); 409 if the lease was lost."""
    tok = _token(body.lease_token, x_lease_token)

    def _fast_sqlite(conn: Connection) -> tuple[Finished, bool] | None:
        t = hot.result_row(conn, trial_id)
        if not _hot_result_ok(t, tok):
            return None
        info = ctx.jobs.get(conn, t.job_id)
        if info is None or info.kind != "compression":
            return None  # an ask/tell trial: the ORM path refuses it
        done = hot.finish(conn, t, *_hot_values(info, t, body))
        if done is None:
            raise _Fallback  # roll back: the ORM path answers
        return done, done.spends_budget(info.max_trials) and hot.open_trials(conn, t.job_id) == 0

    async def _fast() -> tuple[Finished, bool] | None:
        pg = ctx.hot_pg()
        if pg is None:
            if ctx.dialect != "sqlite":
                return None
            try:
                return await run_in_threadpool(run_conn, ctx.engine, _fast_sqlite)
            except _Fallback:
                return None
        t = await pg.result_row(trial_id)
        if not _hot_result_ok(t, tok):
            return None
        info = await pg.job(t.job_id)
        if info is None or info.kind != "compression":
            return None  # an ask/tell trial: the ORM path refuses it
        done = await pg.finish(t, *_hot_values(info, t, body))
        if done is None:
            return None
        return done, done.spends_budget(info.max_trials) and await pg.open_trials(t.job_id) == 0

    fast = await _fast()
    if fast is not None:
        done, last = fast
        row = SimpleNamespace(**done.trial)
        _log_transition("completed", row, "running")
        if last:  # the job's budget is spent and nothing is open: close it (locked, so once)
            await run_in_threadpool(run_tx, ctx.factory, lambda s: close_job_if_done(s, row.job_id, ctx.dialect))
        ctx.metrics.trial_finished("completed")
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        return JSONResponse(trial_out(row))

    def _complete(s: Session) -> dict[str, Any]:
        t, job = _worker_trial(s, ctx, trial_id)
        if t.kind == "profile":
            if t.state == "completed" and job.profile is not None:
                complete(s, t, {}, {}, tok, extra={"profile": body.profile.model_dump(mode="json")}
                         if body.profile else None)
                return trial_out(t)
            prof, space = _validate_profile(job, body)
            complete(s, t, {}, {}, tok, extra={"profile": prof})
            if job.state == "profiling":
                unreachable = _unreachable_budget(job, prof, space)
                if unreachable:
                    set_job_state(s, job, "failed", ("profiling",), reason=unreachable, profile=prof,
                                  search_space=space)
                    return trial_out(t)
                set_job_state(s, job, "running", ("profiling",), profile=prof, search_space=space)
                add_event(s, job.id, "profiled", detail=f"{len(prof['layers'])} layers, {len(space)} parameters")
            return trial_out(t)
        if t.kind == "export":
            complete(s, t, dict(body.values), dict(body.sem), tok, extra={"artifact": body.artifact})
            return trial_out(t)
        complete(s, t, _evaluate_values(job, t.params, dict(body.values)), dict(body.sem), tok)
        return trial_out(t)

    out = await run_in_threadpool(run_tx, ctx.factory, _complete)
    ctx.metrics.trial_finished("completed")
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out


@router.post("/trials/{trial_id}/fail", response_model=TrialOut, responses=ERRORS)
def fail_route(trial_id: RowId, body: FailRequest, ctx: CtxDep, p: WorkerDep,
               x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's failure: re-queued when ``retry`` and attempts remain, else ``failed``."""
    tok = _token(body.lease_token, x_lease_token)

    def _fail(s: Session) -> dict[str, Any]:
        t, _ = _worker_trial(s, ctx, trial_id)
        fail(s, t, body.error, body.retry, tok)
        return trial_out(t)

    out = run_tx(ctx.factory, _fail)
    ctx.metrics.trial_finished(out["state"])
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out
