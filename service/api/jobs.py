"""Jobs: create, list, inspect, cancel; their trials, Pareto set, and ask/tell."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse

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
from bocompress.service.api.deps import MAX_ID, ClientDep, CtxDep, Cursor, RowId, viewer
from bocompress.service.api.errors import bad_request
from bocompress.service.api.serialize import decode_cursor, encode_cursor
from bocompress.service.api.pipeline import recipe_spec
from bocompress.service.api.strategies import chipnet_spec

router = APIRouter(prefix="/api/v1", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no or bad token"}, 403: {"description": "wrong role"},
    404: {"description": "not found"}, 409: {"description": "conflict"}, 422: {"description": "invalid input"},
}


def _check_refs(body: JobCreate) -> list[tuple[str, str, str]]:
    """Refuse a model or dataset that is neither an upload nor built in; the uploads it names,
    ``(field, id, kind)``, for the store to look up."""
    c = body.compression
    assert c is not None
    blobs = []
    if c.model.startswith("mdl_"):
        blobs.append(("compression.model", c.model, "model"))
    elif c.model not in ZOO_MODELS and not IMPORT_PATH_RE.match(c.model):
        raise bad_request("compression.model",
                          f"{c.model!r} is neither an uploaded model id (mdl_...), a zoo model "
                          f"({', '.join(ZOO_MODELS)}) nor an import path 'package.module:factory'")
    if c.data.startswith("ds_"):
        blobs.append(("compression.data", c.data, "dataset"))
    elif c.data not in ZOO_DATA:
        raise bad_request("compression.data",
                          f"{c.data!r} is neither an uploaded dataset id (ds_...) nor a built-in set "
                          f"({', '.join(ZOO_DATA)})")
    return blobs


#: The optimizer engines that allocate from a compression job's profile (bocompress.service.optimizer.allocators).
ONE_SHOT_ENGINES = ("uniform", "energy", "global", "knapsack")


@router.post("/jobs", status_code=201, response_model=JobOut, responses={**ERRORS, 200: {
    "model": JobOut, "description": "the job an earlier request with the same Idempotency-Key made"}})
async def create_job(body: JobCreate, ctx: CtxDep, p: ClientDep, response: Response,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> Any:
    """Create a compression job (profiled by a worker first) or a generic ask/tell job.

    A repeated request with the same ``Idempotency-Key`` returns the job the first one made.
    """
    spec = body.model_dump(mode="json", exclude_none=True)
    if not body.is_compression and body.optimizer.engine in ONE_SHOT_ENGINES:
        raise bad_request("optimizer.engine", f"{body.optimizer.engine!r} is a one-shot allocator for "
                          "compression jobs; a generic job takes 'auto', 'sobol' or 'gp'")
    if body.recipe is not None:
        spec = recipe_spec(body, spec)
    if body.optimizer.engine == "chipnet":
        spec = chipnet_spec(body, spec)
    blobs = _check_refs(body) if body.is_compression else []
    space = None if body.is_compression else [prm.model_dump() for prm in body.parameters or []]
    # an empty Idempotency-Key is no key (stored as '', a second one would collide with the first)
    out, created = await ctx.store.create_job(viewer(p), body.name, spec, space, idempotency_key or None, blobs)
    if not created:
        response.status_code = 200
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return out


@router.get("/jobs", response_model=Page, responses=ERRORS)
async def list_jobs(ctx: CtxDep, p: ClientDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                    cursor: Cursor = None,
                    state: Annotated[str | None, Query(max_length=20)] = None) -> Any:
    """Jobs, newest first, in pages: ``{"items": [...], "next_cursor": ...}``."""
    before = decode_cursor(cursor)
    # a cursor above every id (PostgreSQL's INTEGER would refuse it) filters nothing
    page = await ctx.store.list_jobs(viewer(p), limit, before if before is not None and before <= MAX_ID else None,
                                     state)
    return {"items": page.items, "next_cursor": encode_cursor(page.next_id) if page.next_id is not None else None}


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Job state, counts per trial state, the best trial, and (compression) the layer table."""
    return await ctx.store.get_job(job_id, viewer(p))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
async def cancel(job_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Stop a job: queued trials are cancelled, running ones stop at their next heartbeat."""
    return await ctx.store.cancel(job_id, viewer(p))


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
    page = await ctx.store.trial_page(job_id, viewer(p), max(since, after or 0), limit)
    nxt = encode_cursor(page.next_seq) if page.next_seq is not None else None
    body = '{"items":' + page.items_json + ',"next_cursor":' + json.dumps(nxt) + "}"
    return Response(body.encode(), media_type="application/json", headers={"X-Job-Seq": str(page.job_seq)})


@router.get("/jobs/{job_id}/pareto", response_model=Page, responses=ERRORS)
async def pareto(job_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Non-dominated completed trials in (L, R) = (distill_l2, ratio), both minimized, by R."""
    return {"items": await ctx.store.pareto(job_id, viewer(p)), "next_cursor": None}


@router.post("/jobs/{job_id}/ask", response_model=AskResponse, responses=ERRORS)
async def ask(job_id: RowId, body: AskRequest, ctx: CtxDep, p: ClientDep) -> Any:
    """Up to ``count`` trials to evaluate yourself; empty when the budget is spent; 409
    ``job_finished`` when the job was cancelled or failed.

    Proposals come from the job's buffer, filled in the background (never computed here);
    this call waits up to ``ask_wait_seconds`` for the buffer to hold them. It waits on the event
    loop, not in a thread: a few clients waiting for proposals never hold the thread pool.
    """
    wake = ctx.scheduler.wake if ctx.scheduler is not None else None
    # the store's dicts are the contract's already: no second validation against the response model
    return JSONResponse({"trials": await ctx.store.ask(job_id, viewer(p), body.count, ctx.settings.ask_wait_seconds,
                                                       wake)})


@router.get("/trials/{trial_id}", response_model=TrialOut, responses=ERRORS)
async def get_trial(trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    return await ctx.store.get_trial(trial_id, viewer(p))


@router.post("/trials/{trial_id}/tell", response_model=TrialOut, responses=ERRORS)
async def tell(trial_id: RowId, body: TellRequest, ctx: CtxDep, p: ClientDep) -> Any:
    """Report the result of an asked trial (idempotent), or its failure."""
    out = await ctx.store.tell(trial_id, viewer(p), dict(body.values), dict(body.sem), bool(body.failed), body.error)
    if ctx.scheduler is not None:
        ctx.scheduler.wake()
    return JSONResponse(out)
