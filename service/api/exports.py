"""Export: a worker builds a trial's compressed model (optionally fine-tuned) for download."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response, UploadFile

from bocompress.schemas import ExportOut, ExportRequest
from bocompress.service.api.deps import AnyRoleDep, ClientDep, CtxDep, RowId, WorkerDep, viewer
from bocompress.service.api.jobs import ERRORS
from bocompress.service.api.strategies import checked_retrain
from bocompress.service.api.uploads import _read_limited, checked_safetensors

router = APIRouter(prefix="/api/v1", tags=["export"])


@router.post("/jobs/{job_id}/trials/{trial_id}/export", status_code=202, response_model=ExportOut,
             responses=ERRORS)
async def request_export(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep,
                         body: ExportRequest | None = None) -> Any:
    """Queue an export task for a completed trial; the same request again returns the same task.

    ``GET …/artifact`` serves the export asked for last (409 while it is being built).
    """
    body = body or ExportRequest()
    retrain = checked_retrain(body.retrain)
    return await ctx.store.request_export(job_id, trial_id, viewer(p), body.finetune_steps, body.lr, retrain=retrain)


@router.post("/jobs/{job_id}/trials/{trial_id}/export/cancel", response_model=ExportOut, responses=ERRORS)
async def cancel_export(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """Stop the trial's latest export while it is queued or running (a retraining stops at its
    worker's next heartbeat; nothing is kept). A finished export is answered as it is."""
    return await ctx.store.cancel_export(job_id, trial_id, viewer(p))


@router.get("/jobs/{job_id}/trials/{trial_id}/export", response_model=ExportOut, responses=ERRORS)
async def get_export(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """The latest export task of a trial (state, values such as L before/after fine-tuning)."""
    return await ctx.store.get_export(job_id, trial_id, viewer(p))


@router.get("/jobs/{job_id}/trials/{trial_id}/artifact", response_class=Response, responses={**ERRORS, 200: {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "description": "the compressed model (safetensors)"}})
async def download_artifact(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Response:
    """The exported model as safetensors (its ``__metadata__`` holds the layer description).

    404 when no export was requested; 409 (with ``Retry-After``) while it is being built.
    """
    data, sha256 = await ctx.store.artifact(job_id, trial_id, viewer(p))
    return Response(data, media_type="application/octet-stream",
                    headers={"X-Sha256": sha256,
                             "Content-Disposition": f'attachment; filename="job{job_id}-trial{trial_id}.safetensors"'})


@router.post("/trials/{task_id}/artifact", status_code=201, responses=ERRORS)
async def upload_artifact(task_id: RowId, request: Request, ctx: CtxDep, p: WorkerDep, file: UploadFile,
                          x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """A worker uploads the compressed model of the export task it holds (then completes the task)."""
    data = await _read_limited(request, file, ctx.settings.max_upload_bytes, ctx)
    tensors = await checked_safetensors(ctx, data)
    return await ctx.store.store_artifact(task_id, x_lease_token, viewer(p), data, tensors)


__all__ = ["router", "AnyRoleDep"]
