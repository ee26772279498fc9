"""The worker side: lease work, heartbeat, report results and failures."""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from bocompress import costs
from bocompress.schemas import CompleteRequest, FailRequest, HeartbeatRequest, LeaseRequest, LeaseResponse, TrialOut
from service.api.deps import CtxDep, WorkerDep
from service.api.errors import APIError, bad_request
from service.api.jobs import ERRORS
from service.api.serialize import iso, job_light, trial_out
from service.db import hot
from service.db.models import Job, Trial
from service.db.session import read_session, run_conn, run_tx
from service.db.trials import (
    add_event,
    after_trial_finished,
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


@router.post("/workers/lease", response_model=LeaseResponse, responses={**ERRORS, 204: {"description": "no work"}})
def lease(ctx: CtxDep, p: WorkerDep, body: Annotated[LeaseRequest | None, Body()] = None) -> Any:
    """A trial (or a profiling/export task) with its job spec and lease, or 204 when none is queued."""
    body = body or LeaseRequest()
    t0 = time.perf_counter()
    worker = f"{p.owner}/{body.worker}" if p.owner not in ("local", body.worker) else body.worker
    kinds = list(body.kinds)

    def _lease(conn: Connection) -> Any:
        return hot.lease(conn, ctx.dialect, ctx.jobs, worker, kinds)

    got = run_conn(ctx.hot_engine, _lease)
    if got is None and run_tx(ctx.factory, lambda s: reap_expired(s, limit=50)) > 0:
        got = run_conn(ctx.hot_engine, _lease)
    ctx.metrics.observe_lease(time.perf_counter() - t0, worker, got is not None)
    if got is None:
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        return Response(status_code=204)
    # Built after the commit: the job row, locked by the lease's seq bump, is not held while
    # Python encodes the answer.
    row, dyn, info = got
    _log_transition("leased", row, "queued")
    out = {"task": row.kind, "trial": trial_out(row), "job": job_light(info, dyn),
           "lease": _lease_info(row.lease_token, row.lease_expires_at, info.lease_seconds, row.attempt)}
    if row.kind == "export":
        with read_session(ctx.factory) as s:
            src = s.get(Trial, int(row.params["trial_id"]))
            out["source"] = trial_out(src) if src is not None else None
    return JSONResponse(out)


def _token(body_token: str | None, header_token: str | None) -> str | None:
    return body_token or header_token


@router.post("/trials/{trial_id}/heartbeat", responses=ERRORS)
def heartbeat_route(trial_id: int, ctx: CtxDep, p: WorkerDep,
                    body: Annotated[HeartbeatRequest | None, Body()] = None,
                    x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """Extend the lease; 409 when it was lost or the job was cancelled."""
    tok = _token(body.lease_token if body else None, x_lease_token)
    got = run_conn(ctx.hot_engine, lambda c: hot.heartbeat(c, ctx.dialect, ctx.jobs, trial_id, tok))
    if got is not None:
        row, info = got
        return JSONResponse({"lease": _lease_info(row.lease_token, row.lease_expires_at, info.lease_seconds,
                                                  row.attempt)})

    def _hb(s: Session) -> dict[str, Any]:  # the unusual cases, with their exact errors
        t = lock_trial(s, trial_id, ctx.dialect)
        heartbeat(s, t, tok)
        job = s.get(Job, t.job_id)
        assert job is not None
        return {"lease": _lease_info(t.lease_token, t.lease_expires_at, float(job.spec["budget"]["lease_seconds"]),
                                     t.attempt)}

    return run_tx(ctx.factory, _hb)


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


@router.post("/trials/{trial_id}/complete", response_model=TrialOut, responses=ERRORS)
def complete_route(trial_id: int, body: CompleteRequest, ctx: CtxDep, p: WorkerDep,
                   x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's result; idempotent (the same result twice is stored once); 409 if the lease was lost."""
    tok = _token(body.lease_token, x_lease_token)

    def _fast(conn: Connection) -> dict[str, Any] | None:
        t = hot.lock_for_result(conn, ctx.dialect, trial_id)
        if (t is None or t.kind != "evaluate" or t.state != "running"
                or (tok is not None and t.lease_token is not None and tok != t.lease_token)):
            return None
        info = ctx.jobs.get(conn, t.job_id)
        assert info is not None
        values = _evaluate_values(info, t.params, dict(body.values))
        sem = dict(body.sem)
        done = hot.finish(conn, ctx.dialect, t, values, sem, result_hash(values, sem, None))
        if done is None:
            raise _Fallback
        row = SimpleNamespace(**done.trial)
        _log_transition("completed", row, "running")
        if done.job_state == "running" and done.job_n_created >= info.max_trials \
                and hot.open_trials(conn, row.job_id) == 0:
            with Session(bind=conn) as s:
                job = s.get(Job, row.job_id)
                assert job is not None
                after_trial_finished(s, job, row)
        return trial_out(row)

    try:
        fast = run_conn(ctx.engine, _fast)
    except _Fallback:
        fast = None
    if fast is not None:
        ctx.metrics.trial_finished("completed")
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        return JSONResponse(fast)

    def _complete(s: Session) -> dict[str, Any]:
        t = lock_trial(s, trial_id, ctx.dialect)
        job = s.get(Job, t.job_id)
        assert job is not None
        if t.kind == "profile":
            if t.state == "completed" and job.profile is not None:
                complete(s, t, {}, {}, tok, extra={"profile": body.profile.model_dump(mode="json")}
                         if body.profile else None)
                return trial_out(t)
            prof, space = _validate_profile(job, body)
            complete(s, t, {}, {}, tok, extra={"profile": prof})
            if job.state == "profiling":
                set_job_state(s, job, "running", ("profiling",), profile=prof, search_space=space)
                add_event(s, job.id, "profiled", detail=f"{len(prof['layers'])} layers, {len(space)} parameters")
            return trial_out(t)
        if t.kind == "export":
            complete(s, t, dict(body.values), dict(body.sem), tok, extra={"artifact": body.artifact})
            return trial_out(t)
        complete(s, t, _evaluate_values(job, t.params, dict(body.values)), dict(body.sem), tok)
        return trial_out(t)

    out = run_tx(ctx.factory, _complete)
    ctx.metrics.trial_finished("completed")
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out


@router.post("/trials/{trial_id}/fail", response_model=TrialOut, responses=ERRORS)
def fail_route(trial_id: int, body: FailRequest, ctx: CtxDep, p: WorkerDep,
               x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's failure: re-queued when ``retry`` and attempts remain, else ``failed``."""
    tok = _token(body.lease_token, x_lease_token)

    def _fail(s: Session) -> dict[str, Any]:
        t = lock_trial(s, trial_id, ctx.dialect)
        fail(s, t, body.error, body.retry, tok)
        return trial_out(t)

    out = run_tx(ctx.factory, _fail)
    ctx.metrics.trial_finished(out["state"])
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out
