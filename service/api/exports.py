"""Export: a worker builds a trial's compressed model (optionally fine-tuned) for download."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response, UploadFile
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from bocompress.schemas import ExportOut, ExportRequest
from bocompress.states import OPEN_TRIAL_STATES, JobState, TrialState
from service.api.deps import AnyRoleDep, ClientDep, CtxDep, RowId, WorkerDep, viewer
from service.api.errors import APIError, bad_request
from service.api.jobs import ERRORS
from service.api.uploads import _read_limited, checked_safetensors, new_blob
from service.db.models import Blob, Trial, utcnow
from service.db.session import read_session, run_tx
from service.db.errors import NotFound
from service.db.queries import visible_job
from service.db.trials import add_event, bump_seq, check_lease, lock_trial

router = APIRouter(prefix="/api/v1", tags=["export"])


def export_out(t: Trial) -> dict[str, Any]:
    return {"id": t.id, "job_id": t.job_id, "trial_id": int(t.params["trial_id"]), "state": t.state,
            "finetune_steps": int(t.params.get("finetune_steps", 0)), "lr": float(t.params.get("lr", 1e-4)),
            "values": t.values or {}, "artifact": (t.extra or {}).get("artifact"), "error": t.error}


def _source_trial(s: Session, job_id: int, trial_id: int) -> Trial:
    t = s.get(Trial, trial_id)
    if t is None or t.job_id != job_id or t.kind != "evaluate":
        raise NotFound("trial", trial_id)
    return t


@router.post("/jobs/{job_id}/trials/{trial_id}/export", status_code=202, response_model=ExportOut,
             responses=ERRORS)
def request_export(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep,
                   body: ExportRequest | None = None) -> Any:
    """Queue an export task for a completed trial; the same request again returns the same task.

    ``GET …/artifact`` serves the export asked for last (409 while it is being built).
    """
    body = body or ExportRequest()

    def _req(s: Session) -> dict[str, Any]:
        job = visible_job(s, job_id, viewer(p))
        if job.kind != "compression":
            raise APIError(409, f"job {job_id} is not a compression job: nothing to export", "not_compression")
        src = _source_trial(s, job_id, trial_id)
        if src.state != TrialState.COMPLETED:
            raise APIError(409, f"trial {trial_id} is {src.state}: only a completed trial can be exported",
                           "not_completed")
        if job.state not in (JobState.RUNNING, JobState.COMPLETED):
            raise APIError(409, f"job {job_id} is {job.state}: no worker will build it", "job_state")
        params = {"trial_id": trial_id, "finetune_steps": body.finetune_steps, "lr": body.lr}
        latest = _latest_export(s, job_id, trial_id)
        if latest is not None and latest.params == params and latest.state in (*OPEN_TRIAL_STATES, TrialState.COMPLETED):
            return export_out(latest)
        n = s.execute(select(func.count()).select_from(Trial)
                      .where(Trial.job_id == job_id, Trial.kind == "export")).scalar_one()
        task = Trial(job_id=job_id, kind="export", number=int(n), seq=bump_seq(s, job_id), state=TrialState.QUEUED,
                     params=params, values={}, sem={}, attempt=1, created_at=utcnow())
        s.add(task)
        s.flush()
        add_event(s, job_id, "export_requested", task.id, None, TrialState.QUEUED, f"trial {trial_id}")
        return export_out(task)

    return run_tx(ctx.factory, _req)


@router.get("/jobs/{job_id}/trials/{trial_id}/export", response_model=ExportOut, responses=ERRORS)
def get_export(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Any:
    """The latest export task of a trial (state, values such as L before/after fine-tuning)."""
    with read_session(ctx.factory) as s:
        t = _visible_export(s, job_id, trial_id, p)
        return export_out(t)


def _visible_export(s: Session, job_id: int, trial_id: int, p: Any) -> Trial:
    """The export asked for last of a trial the caller may see; else 404."""
    visible_job(s, job_id, viewer(p))
    _source_trial(s, job_id, trial_id)
    t = _latest_export(s, job_id, trial_id)
    if t is None:
        raise NotFound("export of trial", trial_id)
    return t


def _latest_export(s: Session, job_id: int, trial_id: int) -> Trial | None:
    rows = s.execute(select(Trial).where(Trial.job_id == job_id, Trial.kind == "export").order_by(Trial.id.desc())
                     ).scalars().all()
    mine = [t for t in rows if int(t.params.get("trial_id", -1)) == trial_id]
    return mine[0] if mine else None  # the export asked for last


@router.get("/jobs/{job_id}/trials/{trial_id}/artifact", response_class=Response, responses={**ERRORS, 200: {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "description": "the compressed model (safetensors)"}})
def download_artifact(job_id: RowId, trial_id: RowId, ctx: CtxDep, p: ClientDep) -> Response:
    """The exported model as safetensors (its ``__metadata__`` holds the layer description).

    404 when no export was requested; 409 (with ``Retry-After``) while it is being built.
    """
    with read_session(ctx.factory) as s:
        t = _visible_export(s, job_id, trial_id, p)
        if t.state in OPEN_TRIAL_STATES:
            raise APIError(409, f"the export of trial {trial_id} is {t.state}", "export_pending", {"Retry-After": "2"})
        if t.state != TrialState.COMPLETED:
            raise APIError(409, f"the export of trial {trial_id} {t.state}: {t.error or ''}".strip(), "export_failed")
        art = (t.extra or {}).get("artifact") or {}
        blob = s.get(Blob, art.get("blob_id", ""))
        if blob is None:
            raise NotFound("artifact of trial", trial_id)
        return Response(blob.data, media_type="application/octet-stream",
                        headers={"X-Sha256": blob.sha256,
                                 "Content-Disposition": f'attachment; filename="job{job_id}-trial{trial_id}.safetensors"'})


@router.post("/trials/{task_id}/artifact", status_code=201, responses=ERRORS)
async def upload_artifact(task_id: RowId, request: Request, ctx: CtxDep, p: WorkerDep, file: UploadFile,
                          x_lease_token: Annotated[str | None, Header(max_length=64)] = None) -> Any:
    """A worker uploads the compressed model of the export task it holds (then completes the task)."""
    data = await _read_limited(request, file, ctx.settings.max_upload_bytes, ctx)
    tensors = await checked_safetensors(ctx, data)

    def _store(s: Session) -> dict[str, Any]:
        t = lock_trial(s, task_id, ctx.dialect)
        if t.kind != "export":
            raise APIError(409, f"trial {task_id} is not an export task", "not_export")
        if t.state != TrialState.RUNNING:
            raise APIError(409, f"export task {task_id} is {t.state}: upload refused", "lease_lost")
        check_lease(t, x_lease_token)
        job = visible_job(s, t.job_id, viewer(p))
        blob = new_blob("artifact", job.owner, data, tensors,
                        meta={"task_id": task_id, "trial_id": t.params.get("trial_id")})
        s.add(blob)
        s.execute(update(Trial).where(Trial.id == task_id).values(extra={"artifact": {"blob_id": blob.id}}))
        return {"blob_id": blob.id, "size": blob.size, "sha256": blob.sha256}

    return await _run(ctx, _store)


async def _run(ctx, fn):  # type: ignore[no-untyped-def]
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(run_tx, ctx.factory, fn)


__all__ = ["router", "AnyRoleDep"]
