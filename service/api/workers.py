"""The worker side: lease work, heartbeat, report results and failures."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from bocompress import costs
from bocompress.schemas import CompleteRequest, FailRequest, HeartbeatRequest, LeaseRequest, LeaseResponse, TrialOut
from service.api.deps import CtxDep, WorkerDep
from service.api.errors import APIError, bad_request
from service.api.jobs import ERRORS
from service.api.serialize import iso, job_out, trial_out
from service.db.models import Job, Trial
from service.db.session import run_tx
from service.db.trials import (
    add_event,
    claim_next,
    complete,
    compression_values,
    fail,
    heartbeat,
    Claimed,
    lock_trial,
    reap_expired,
    relax_durability,
    set_job_state,
)

router = APIRouter(prefix="/api/v1", tags=["workers"])


def _lease_info(t: Trial, job: Job) -> dict[str, Any]:
    return {"token": t.lease_token, "expires_at": iso(t.lease_expires_at),
            "lease_seconds": float(job.spec["budget"]["lease_seconds"]), "attempt": t.attempt}


@router.post("/workers/lease", response_model=LeaseResponse, responses={**ERRORS, 204: {"description": "no work"}})
def lease(ctx: CtxDep, p: WorkerDep, body: Annotated[LeaseRequest | None, Body()] = None) -> Any:
    """A trial (or a profiling/export task) with its job spec and lease, or 204 when none is queued."""
    body = body or LeaseRequest()
    t0 = time.perf_counter()
    worker = f"{p.owner}/{body.worker}" if p.owner not in ("local", body.worker) else body.worker

    def _lease(s: Session) -> tuple[Claimed, Trial | None] | None:
        relax_durability(s)
        c = claim_next(s, worker=worker, kinds=body.kinds, dialect=ctx.dialect)
        if c is None:
            return None
        src = s.get(Trial, int(c.trial.params["trial_id"])) if c.trial.kind == "export" else None
        return c, src

    got = run_tx(ctx.factory, _lease)
    if got is None and run_tx(ctx.factory, lambda s: reap_expired(s, limit=50)) > 0:
        got = run_tx(ctx.factory, _lease)
    ctx.metrics.observe_lease(time.perf_counter() - t0, worker, got is not None)
    if got is None:
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        return Response(status_code=204)
    # Built after the commit (the rows are loaded; nothing here queries): the job row, locked
    # by the lease's seq bump, is not held while Python encodes the answer.
    c, src = got
    out = {"task": c.trial.kind, "trial": trial_out(c.trial), "job": job_out(None, c.job, light=True),
           "lease": _lease_info(c.trial, c.job)}
    if c.trial.kind == "export":
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

    def _hb(s: Session) -> dict[str, Any]:
        relax_durability(s)
        t = lock_trial(s, trial_id, ctx.dialect)
        heartbeat(s, t, tok)
        job = s.get(Job, t.job_id)
        assert job is not None
        return {"lease": _lease_info(t, job)}

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


@router.post("/trials/{trial_id}/complete", response_model=TrialOut, responses=ERRORS)
def complete_route(trial_id: int, body: CompleteRequest, ctx: CtxDep, p: WorkerDep,
                   x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's result; idempotent (the same result twice is stored once); 409 if the lease was lost."""
    tok = _token(body.lease_token, x_lease_token)

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
        values = dict(body.values)
        if job.kind == "compression":
            # R and the objective are computed here, exactly, from the layer table: a function of
            # the report, so the same report twice hashes the same and is stored once.
            if "distill_l2" not in values or values["distill_l2"] < 0:
                raise bad_request("values.distill_l2", "required, a finite number >= 0")
            values = compression_values(job, t.params, values)
            complete(s, t, values, dict(body.sem), tok)
        else:
            metric = job.spec["objective"].get("metric") or "objective"
            if metric not in values:
                raise bad_request("values", f"missing the job's metric {metric!r}")
            complete(s, t, values, dict(body.sem), tok)
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
