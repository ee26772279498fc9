"""Export tasks: a worker builds a completed trial's compressed model, stored as an artifact blob.

An export is a task (a trial of kind ``export``) leased like any other; these are the parts of
:class:`~bocompress.service.db.store.Store` that only exports have (asked for, read, the artifact stored
and served). :class:`ExportsMixin` implements them for the SQL backends.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from bocompress.states import OPEN_TRIAL_STATES, JobState, TrialState
from bocompress.service.db.errors import NotFound, TransitionError
from bocompress.service.db.models import Blob, Trial, new_blob, utcnow
from bocompress.service.db.queries import visible_job
from bocompress.service.db.trials import add_event, bump_seq, check_lease, lock_trial


def chipnet_export(s: Session, job: Any, src: Trial, params: dict[str, Any]) -> Trial | None:
    from bocompress.service.db.strategies import chipnet_export as _export

    return _export(s, job, src, params)


def checked_retrain(s: Session, job: Any, src: Trial, viewer: Any, retrain: dict[str, Any]) -> dict[str, Any]:
    from bocompress.service.db.strategies import checked_retrain as _check

    return _check(s, job, src, viewer, retrain)


def export_out(t: Trial) -> dict[str, Any]:
    return {"id": t.id, "job_id": t.job_id, "trial_id": int(t.params["trial_id"]), "state": t.state,
            "finetune_steps": int(t.params.get("finetune_steps", 0)), "lr": float(t.params.get("lr", 1e-4)),
            "values": t.values or {}, "artifact": (t.extra or {}).get("artifact"), "error": t.error,
            "retrain": t.params.get("retrain"), "progress": (t.extra or {}).get("progress")}


def _source_trial(s: Session, job_id: int, trial_id: int) -> Trial:
    t = s.get(Trial, trial_id)
    if t is None or t.job_id != job_id or t.kind != "evaluate":
        raise NotFound("trial", trial_id)
    return t


def _latest_export(s: Session, job_id: int, trial_id: int) -> Trial | None:
    rows = s.execute(select(Trial).where(Trial.job_id == job_id, Trial.kind == "export").order_by(Trial.id.desc())
                     ).scalars().all()
    mine = [t for t in rows if int(t.params.get("trial_id", -1)) == trial_id]
    return mine[0] if mine else None  # the export asked for last


def _visible_export(s: Session, job_id: int, trial_id: int, viewer: Any) -> Trial:
    """The export asked for last of a trial the caller may see; else NotFound."""
    visible_job(s, job_id, viewer)
    _source_trial(s, job_id, trial_id)
    t = _latest_export(s, job_id, trial_id)
    if t is None:
        raise NotFound("export of trial", trial_id)
    return t


class ExportsMixin:
    """The export methods of :class:`~bocompress.service.db.sql_store.OrmStore` (``_tx``, ``_read``, ``dialect``)."""

    async def request_export(self, job_id: int, trial_id: int, viewer: Any, finetune_steps: int,
                             lr: float, retrain: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue an export task for a completed trial (the same request again: the same task)."""
        def _req(s: Session) -> dict[str, Any]:
            job = visible_job(s, job_id, viewer)
            if job.kind != "compression":
                raise TransitionError(f"job {job_id} is not a compression job: nothing to export", "not_compression")
            src = _source_trial(s, job_id, trial_id)
            if src.state != TrialState.COMPLETED:
                raise TransitionError(f"trial {trial_id} is {src.state}: only a completed trial can be exported",
                                      "not_completed")
            if job.state not in (JobState.RUNNING, JobState.COMPLETED):
                raise TransitionError(f"job {job_id} is {job.state}: no worker will build it", "job_state")
            params = {"trial_id": trial_id, "finetune_steps": finetune_steps, "lr": lr}
            if retrain is not None:
                params["retrain"] = checked_retrain(s, job, src, viewer, retrain)
            latest = _latest_export(s, job_id, trial_id)
            if latest is not None and latest.params == params and latest.state in (*OPEN_TRIAL_STATES,
                                                                                     TrialState.COMPLETED):
                return export_out(latest)
            chip = chipnet_export(s, job, src, params)  # a ChipNet trial: its stored pruned model
            if chip is not None:
                return export_out(chip)
            n = s.execute(select(func.count()).select_from(Trial)
                          .where(Trial.job_id == job_id, Trial.kind == "export")).scalar_one()
            task = Trial(job_id=job_id, kind="export", number=int(n), seq=bump_seq(s, job_id), state=TrialState.QUEUED,
                         params=params, values={}, sem={}, attempt=1, created_at=utcnow())
            s.add(task)
            s.flush()
            add_event(s, job_id, "export_requested", task.id, None, TrialState.QUEUED, f"trial {trial_id}")
            return export_out(task)

        return await self._tx(_req)  # type: ignore[attr-defined, no-any-return]

    async def get_export(self, job_id: int, trial_id: int, viewer: Any) -> dict[str, Any]:
        """The latest export task of a trial."""
        return await self._read(lambda s: export_out(_visible_export(s, job_id, trial_id, viewer)))  # type: ignore[attr-defined, no-any-return]

    async def artifact(self, job_id: int, trial_id: int, viewer: Any) -> tuple[bytes, str]:
        """The exported model's bytes and sha256; TransitionError while it is built or when it failed."""
        def _get(s: Session) -> tuple[bytes, str]:
            t = _visible_export(s, job_id, trial_id, viewer)
            if t.state in OPEN_TRIAL_STATES:
                raise TransitionError(f"the export of trial {trial_id} is {t.state}", "export_pending",
                                      {"Retry-After": "2"})
            if t.state != TrialState.COMPLETED:
                raise TransitionError(f"the export of trial {trial_id} {t.state}: {t.error or ''}".strip(),
                                      "export_failed")
            art = (t.extra or {}).get("artifact") or {}
            blob = s.get(Blob, art.get("blob_id", ""))
            if blob is None:
                raise NotFound("artifact of trial", trial_id)
            return blob.data, blob.sha256

        return await self._read(_get)  # type: ignore[attr-defined, no-any-return]

    async def store_artifact(self, task_id: int, token: str | None, viewer: Any, data: bytes,
                             tensors: dict[str, Any]) -> dict[str, Any]:
        """Keep the compressed model of the export task the caller holds the lease of."""
        def _store(s: Session) -> dict[str, Any]:
            t = lock_trial(s, task_id, self.dialect)  # type: ignore[attr-defined]
            if t.kind not in ("export", "chipnet"):
                raise TransitionError(f"trial {task_id} is not an export task", "not_export")
            if t.state != TrialState.RUNNING:
                raise TransitionError(f"export task {task_id} is {t.state}: upload refused", "lease_lost")
            check_lease(t, token)
            job = visible_job(s, t.job_id, viewer)
            blob = new_blob("artifact", job.owner, data, tensors,
                            meta={"task_id": task_id, "trial_id": t.params.get("trial_id")})
            s.add(blob)
            s.execute(update(Trial).where(Trial.id == task_id).values(extra={"artifact": {"blob_id": blob.id}}))
            return {"blob_id": blob.id, "size": blob.size, "sha256": blob.sha256}

        return await self._tx(_store)  # type: ignore[attr-defined, no-any-return]


__all__ = ["ExportsMixin", "export_out"]
