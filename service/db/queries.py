"""Reads of a job's trials that more than one view needs: counts, the best trial, the Pareto set."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bocompress.objective import pareto_front
from bocompress.spec import JobSpec
from bocompress.states import TrialState
from bocompress.service.db.errors import NotFound
from bocompress.service.db.models import Job, Trial


def visible_job(session: Session, job_id: int, viewer: Any) -> Job:
    """The job, if ``viewer`` (a :class:`~bocompress.service.db.store.Viewer`) may see it; else NotFound."""
    job = session.get(Job, job_id)
    if job is None or not viewer.may_see(job.owner):
        raise NotFound("job", job_id)
    return job


def count_states(session: Session, job_id: int, kind: str = "evaluate") -> dict[str, int]:
    rows = session.execute(
        select(Trial.state, func.count()).where(Trial.job_id == job_id, Trial.kind == kind).group_by(Trial.state)
    ).all()
    out = {s.value: 0 for s in TrialState}
    out.update({str(s): int(n) for s, n in rows})
    return out


def best_trial(session: Session, job: Job) -> Trial | None:
    """The completed trial with the best objective, ranked in SQL (one indexed scan, no rows loaded)."""
    spec = JobSpec.of(job.spec)
    value = Trial.values[spec.metric].as_float()
    q = (select(Trial).where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state == TrialState.COMPLETED,
                             value.is_not(None))
         .order_by(value.desc() if spec.maximize else value.asc(), Trial.id).limit(1))
    return session.execute(q).scalars().first()


def pareto_trials(session: Session, job: Job) -> list[Trial]:
    """The job's non-dominated completed evaluations: in (L, R) for compression jobs (both
    minimized), by the signed metric for generic ones; ordered by R."""
    rows = session.execute(
        select(Trial).where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state == TrialState.COMPLETED)
    ).scalars().all()
    spec = JobSpec.of(job.spec)
    if spec.is_compression:
        pts = [(float(t.values["distill_l2"]), float(t.values["ratio"])) for t in rows]
    else:
        pts = [(spec.signed(t.values.get(spec.metric, float("inf"))), 0.0) for t in rows]
    return sorted((rows[i] for i in pareto_front(pts)), key=lambda t: float(t.values.get("ratio", 0.0)))


__all__ = ["best_trial", "count_states", "pareto_trials", "visible_job"]
