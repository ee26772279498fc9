"""ChipNet jobs in storage: one long worker task instead of BO proposals, recorded as a normal trial.

A job whose ``optimizer.engine`` is ``"chipnet"`` (stored with ``budget.max_trials = 1``, see
:mod:`bocompress.service.api.strategies`) walks like this:

1. :func:`check_uploads` (at creation): an uploaded model must hold BatchNorm statistics
   (``running_var`` keys in its safetensors header) and an uploaded dataset ``labels``, else
   :class:`Invalid` naming the field, before any work.
2. :func:`start_chipnet` (when profiling completes): one queued task of kind ``chipnet`` with the
   budget it prunes to; ``n_created`` becomes 1, so the scheduler proposes nothing.
3. The worker leases it and heartbeats it with its progress (:meth:`StrategiesMixin.task_progress`:
   a lease extension that also keeps ``{fraction, message}`` in the task's ``extra``, shown as the
   job's ``progress``). A cancelled job answers that heartbeat 409 ``cancelled``: the worker stops.
4. It uploads the hard-pruned model (an export artifact) and completes the task with the kept
   channels as θ (``kept / size`` per channel group, so the layer table's forms give R exactly) and
   the masks; :func:`complete_chipnet` stores the task and adds the job's one ``evaluate`` trial,
   completed, with R and J computed here as for any BO trial, then closes the job.
5. An export of that trial serves the same artifact (:func:`chipnet_export`): θ alone does not say
   which channels were kept, nor the trained weights.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bocompress.states import TrialState
from bocompress.service.db.errors import Invalid, TransitionError
from bocompress.service.db.models import Blob, Job, Trial, utcnow
from bocompress.service.db.trials import (
    add_event,
    bump_seq,
    check_lease,
    close_job_if_done,
    complete,
    heartbeat,
    lock_trial,
    result_hash,
)
from bocompress.service.results import evaluate_values

#: The task kind of a ChipNet run.
CHIPNET_TASK = "chipnet"


def is_chipnet(spec: dict[str, Any] | None) -> bool:
    """Whether a stored spec is a ChipNet job's."""
    return ((spec or {}).get("optimizer") or {}).get("engine") == "chipnet"


def check_uploads(s: Session, spec: dict[str, Any], blobs: Any) -> None:
    """A ChipNet job's uploads, from their safetensors headers (never loaded): BatchNorm and labels.

    Args:
        blobs: ``(field, id, kind)`` of the uploads the spec names (already found to exist).

    Raises:
        Invalid: the model holds no BatchNorm statistics, or the dataset no ``labels``.
    """
    if not is_chipnet(spec):
        return
    for fld, blob_id, kind in blobs:
        blob = s.get(Blob, blob_id)
        names = list((blob.tensors or {}) if blob is not None else {})
        if kind == "model" and not any(n.endswith("running_var") for n in names):
            raise Invalid.field(fld, f"uploaded model {blob_id!r} has no BatchNorm (no running_var in its state "
                                "dict): ChipNet gates BatchNorm channels")
        if kind == "dataset" and "labels" not in names:
            raise Invalid.field(fld, f"uploaded dataset {blob_id!r} has no 'labels' tensor: ChipNet trains on "
                                "labelled data")


def start_chipnet(s: Session, job: Job) -> None:
    """Queue a profiled ChipNet job's one task (``n_created`` 1: nothing else is proposed)."""
    if not is_chipnet(job.spec):
        return
    o = job.spec.get("objective") or {}
    params = {"budget_type": str(o.get("cost") or "params"), "budget": float(o["budget"])}
    s.add(Trial(job_id=job.id, kind=CHIPNET_TASK, number=0, seq=bump_seq(s, job.id), state=TrialState.QUEUED,
                params=params, values={}, sem={}, attempt=1, created_at=utcnow()))
    s.execute(update(Job).where(Job.id == job.id).values(n_created=1))
    s.flush()
    add_event(s, job.id, "chipnet_queued", detail=f"{params['budget_type']} <= {params['budget']}")
    s.refresh(job)


def _theta(job: Job, art: dict[str, Any]) -> dict[str, float]:
    space = {p["name"]: p for p in (job.search_space or [])}
    raw = art.get("theta")
    if not isinstance(raw, dict):
        raise Invalid.field("artifact.theta", "a ChipNet result carries θ: kept / size per channel group")
    unknown = sorted(set(raw) - set(space))
    if unknown:
        raise Invalid.field("artifact.theta", f"not parameters of the job's layer table: {unknown[:10]}")
    theta = {}
    for name in space:
        v = raw.get(name, 1.0)
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise Invalid.field("artifact.theta", f"{name}: need 0 < theta <= 1, got {v!r}")
        theta[name] = float(v)
    return theta


def complete_chipnet(s: Session, t: Trial, job: Job, values: dict[str, float], sem: dict[str, float],
                     art: dict[str, Any] | None, tok: str | None) -> Trial:
    """Store a ChipNet task's result and the job's one trial (completed, R and J as for BO's).

    The same result again changes nothing. Raises :class:`Invalid` for a result without θ or the
    uploaded model, and the lease errors of :func:`complete`.
    """
    art = dict(art or {})
    if t.state == TrialState.COMPLETED:
        complete(s, t, dict(t.values or {}), dict(t.sem or {}), tok, extra=t.extra)  # the lease check
        return t
    if t.state != TrialState.RUNNING:
        complete(s, t, {}, {}, tok)  # refused as any result is: cancelled, or the lease lost
    check_lease(t, tok)
    blob_id = ((t.extra or {}).get("artifact") or {}).get("blob_id")
    if not blob_id or art.get("blob_id") != blob_id or s.get(Blob, blob_id) is None:
        raise Invalid.field("artifact", "upload the pruned model (POST /trials/{id}/artifact) before completing")
    theta = _theta(job, art)
    stored = evaluate_values(job, theta, dict(values))
    chip = {k: art[k] for k in ("masks", "budget_type", "budget", "achieved", "ratios", "history", "best_epoch")
            if k in art}
    extra = {"artifact": {"blob_id": blob_id}, "chipnet": chip}
    complete(s, t, stored, dict(sem), tok, extra=extra)
    now = utcnow()
    trial = Trial(job_id=job.id, kind="evaluate", number=0, seq=bump_seq(s, job.id), state=TrialState.COMPLETED,
                  params=theta, values=stored, sem=dict(sem), attempt=1, worker=t.worker, created_at=t.created_at,
                  started_at=t.started_at, finished_at=now, result_hash=result_hash(stored, dict(sem), None),
                  extra={**extra, "task_id": t.id})
    s.add(trial)
    s.flush()
    add_event(s, job.id, "completed", trial.id, None, TrialState.COMPLETED, f"ChipNet task {t.id}")
    close_job_if_done(s, job.id, s.get_bind().dialect.name)
    return t


def chipnet_export(s: Session, job: Job, src: Trial, params: dict[str, Any]) -> Trial | None:
    """The export of a ChipNet trial: its stored pruned model, at once (None for other trials).

    Raises:
        Invalid: fine-tuning asked for (the ChipNet model is exported as it was trained and measured).
    """
    chip_art = ((src.extra or {}).get("artifact") or {}) if (src.extra or {}).get("chipnet") else {}
    if not chip_art:
        return None
    if int(params.get("finetune_steps", 0)) != 0:
        raise Invalid.field("finetune_steps", "a ChipNet trial is exported as ChipNet trained it: give 0 "
                            "(fine-tune with ChipNet's own optimizer.chipnet.finetune_epochs)")
    n = len(s.execute(select(Trial.id).where(Trial.job_id == job.id, Trial.kind == "export")).all())
    now = utcnow()
    v = src.values or {}
    values = {k: float(v[k]) for k in ("distill_l2", "params", "accuracy") if k in v}
    values.update({"distill_l2_before": values.get("distill_l2", 0.0), "finetune_steps": 0.0})
    task = Trial(job_id=job.id, kind="export", number=n, seq=bump_seq(s, job.id), state=TrialState.COMPLETED,
                 params=params, values=values, sem={}, attempt=1, created_at=now, started_at=now, finished_at=now,
                 result_hash=result_hash(values, {}, None), extra={"artifact": {"blob_id": chip_art["blob_id"]}})
    s.add(task)
    s.flush()
    add_event(s, job.id, "export_requested", task.id, None, TrialState.COMPLETED, f"trial {src.id} (ChipNet)")
    return task


#: Retraining modes that train on labels (``finetune-distill`` needs none).
LABEL_MODES = ("finetune-labels", "scratch-e", "scratch-b")


def checked_retrain(s: Session, job: Job, src: Trial, viewer: Any, retrain: dict[str, Any]) -> dict[str, Any]:
    """An export's ``retrain`` options, checked against the data they train on (the job's own when
    they name none): an upload must exist for the caller, and hold ``labels`` for a mode that needs them.

    Raises:
        Invalid: naming ``retrain.dataset`` (or ``retrain`` for a ChipNet trial, exported as trained).
    """
    if (src.extra or {}).get("chipnet"):
        raise Invalid.field("retrain", "a ChipNet trial is exported as ChipNet trained it; retrain a BO trial, "
                            "or fine-tune with optimizer.chipnet.finetune_epochs")
    ds = retrain.get("dataset") or ((job.spec or {}).get("compression") or {}).get("data")
    fld = "retrain.dataset" if retrain.get("dataset") else "compression.data"
    needs_labels = retrain.get("mode") in LABEL_MODES
    if isinstance(ds, str) and ds.startswith("ds_"):
        blob = s.get(Blob, ds)
        if blob is None or blob.kind != "dataset" or not (viewer.sees_all or blob.owner == viewer.owner):
            raise Invalid.field(fld, f"no uploaded dataset {ds!r}")
        if needs_labels and "labels" not in (blob.tensors or {}):
            raise Invalid.field(fld, f"uploaded dataset {ds!r} has no 'labels' tensor: {retrain['mode']} trains "
                                "on labels (finetune-distill needs none)")
    elif needs_labels and ds == "synthetic":
        raise Invalid.field(fld, f"{ds!r} has no labels: {retrain['mode']} trains on labels")
    return dict(retrain)


def job_progress(s: Session, job: Job) -> dict[str, Any] | None:
    """A ChipNet job's long task as the job shows it: state, fraction done, message (else None)."""
    if not is_chipnet(job.spec):
        return None
    t = s.execute(select(Trial).where(Trial.job_id == job.id, Trial.kind == CHIPNET_TASK)
                  .order_by(Trial.id.desc()).limit(1)).scalars().first()
    if t is None:
        return {"task": CHIPNET_TASK, "state": "waiting", "fraction": 0.0, "message": "profiling the model"}
    p = (t.extra or {}).get("progress") or {}
    fraction = 1.0 if t.state == TrialState.COMPLETED else float(p.get("fraction", 0.0))
    message = p.get("message") or {"queued": "waiting for a worker"}.get(str(t.state), str(t.state))
    if t.state == TrialState.COMPLETED:
        message = "done: " + str(message)
    elif t.error:
        message = t.error.splitlines()[0][:500]
    return {"task": CHIPNET_TASK, "id": t.id, "state": str(t.state), "fraction": fraction, "message": message,
            "attempt": t.attempt, "worker": t.worker}


class StrategiesMixin:
    """The long tasks' part of :class:`~bocompress.service.db.sql_store.OrmStore` (``_tx``, ``dialect``)."""

    async def cancel_export(self, job_id: int, trial_id: int, viewer: Any) -> dict[str, Any]:
        """Cancel the trial's latest export while it is open (its worker stops at the next heartbeat)."""
        from bocompress.states import OPEN_TRIAL_STATES
        from bocompress.service.db.exports import _visible_export, export_out
        from bocompress.service.db.trials import drop_unreported_artifact, transition

        def _cancel(s: Session) -> dict[str, Any]:
            t = _visible_export(s, job_id, trial_id, viewer)
            t = lock_trial(s, t.id, self.dialect)  # type: ignore[attr-defined]
            if t.state in OPEN_TRIAL_STATES:
                t = transition(s, t, TrialState.CANCELLED, OPEN_TRIAL_STATES, event="export_cancelled",
                               finished_at=utcnow(), lease_expires_at=None, guard_attempt=False)
                drop_unreported_artifact(s, t)
            return export_out(t)

        return await self._tx(_cancel)  # type: ignore[attr-defined, no-any-return]

    async def task_progress(self, trial_id: int, token: str | None, fraction: float,
                            message: str | None) -> dict[str, Any]:
        """A heartbeat that also records a long task's progress; the same answer as ``heartbeat``."""
        from bocompress.spec import JobSpec
        from bocompress.service.db.sql_store import lease_info

        def _hb(s: Session) -> dict[str, Any]:
            t = lock_trial(s, trial_id, self.dialect)  # type: ignore[attr-defined]
            job = s.get(Job, t.job_id)
            assert job is not None
            if t.kind == "evaluate" and job.kind != "compression":
                raise TransitionError(f"trial {trial_id}: an ask/tell trial has no worker", "not_generic")
            heartbeat(s, t, token)
            extra = {**(t.extra or {}), "progress": {"fraction": float(fraction), "message": (message or "")[:500],
                                                     "at": utcnow().isoformat()}}
            s.execute(update(Trial).where(Trial.id == t.id, Trial.state == TrialState.RUNNING).values(extra=extra))
            return {"lease": lease_info(t.lease_token, t.lease_expires_at, JobSpec.of(job.spec).lease_seconds,
                                        t.attempt)}

        return await self._tx(_hb)  # type: ignore[attr-defined, no-any-return]


__all__ = ["CHIPNET_TASK", "LABEL_MODES", "StrategiesMixin", "check_uploads", "checked_retrain", "chipnet_export", "complete_chipnet", "is_chipnet",
           "job_progress", "start_chipnet"]
