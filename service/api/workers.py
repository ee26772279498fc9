"""The worker side: lease work, heartbeat, report results and failures."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response
from fastapi.responses import JSONResponse

from bocompress.schemas import CompleteRequest, FailRequest, HeartbeatRequest, LeaseRequest, LeaseResponse, TrialOut
from bocompress.service.api.deps import CtxDep, RowId, WorkerDep
from bocompress.service.api.jobs import ERRORS
from bocompress.service.db.store import Result

router = APIRouter(prefix="/api/v1", tags=["workers"])


@router.post("/workers/lease", response_model=LeaseResponse, responses={**ERRORS, 204: {"description": "no work"}})
async def lease(ctx: CtxDep, p: WorkerDep, body: Annotated[LeaseRequest | None, Body()] = None) -> Any:
    """A trial (or a profiling/export task) with its job spec and lease, or 204 when none is queued."""
    body = body or LeaseRequest()
    t0 = time.perf_counter()
    worker = f"{p.owner}/{body.worker}" if p.owner not in ("local", body.worker) else body.worker
    out = await ctx.store.lease(worker, list(body.kinds))
    ctx.metrics.observe_lease(time.perf_counter() - t0, worker, out is not None)
    if out is None:
        if ctx.scheduler is not None:
            ctx.scheduler.wake()
        return Response(status_code=204)
    return JSONResponse(out)


def _token(body_token: str | None, header_token: str | None) -> str | None:
    return body_token or header_token


@router.post("/trials/{trial_id}/heartbeat", responses=ERRORS)
async def heartbeat_route(trial_id: RowId, ctx: CtxDep, p: WorkerDep,
                          body: Annotated[HeartbeatRequest | None, Body()] = None,
                          x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """Extend the lease; 409 when it was lost or the job was cancelled.

    A long task (ChipNet) sends its ``progress`` (fraction done) and ``message`` with each beat.
    """
    token = _token(body.lease_token if body else None, x_lease_token)
    if body is not None and body.progress is not None:
        return JSONResponse(await ctx.store.task_progress(trial_id, token, float(body.progress), body.message))
    return JSONResponse(await ctx.store.heartbeat(trial_id, token))


@router.post("/trials/{trial_id}/complete", response_model=TrialOut, responses=ERRORS)
async def complete_route(trial_id: RowId, body: CompleteRequest, ctx: CtxDep, p: WorkerDep,
                         x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's result; idempotent (the same result twice is stored once); 409 if the lease was lost."""
    result = Result(values=dict(body.values), sem=dict(body.sem),
                    profile=body.profile.model_dump(mode="json") if body.profile is not None else None,
                    artifact=body.artifact)
    out = await ctx.store.complete(trial_id, _token(body.lease_token, x_lease_token), result)
    ctx.metrics.trial_finished("completed")
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return JSONResponse(out)


@router.post("/trials/{trial_id}/fail", response_model=TrialOut, responses=ERRORS)
async def fail_route(trial_id: RowId, body: FailRequest, ctx: CtxDep, p: WorkerDep,
                     x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """The worker's failure: re-queued when ``retry`` and attempts remain, else ``failed``."""
    out = await ctx.store.fail(trial_id, _token(body.lease_token, x_lease_token), body.error, body.retry)
    ctx.metrics.trial_finished(out["state"])
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out
