"""Reads of a job's trials that more than one view needs: counts, the best trial, the Pareto set."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session

from bocompress.objective import pareto_front
from bocompress.spec import JobSpec
from bocompress.states import JobState, TrialState
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


_BEST: dict[tuple[str, bool, bool], Any] = {}


def best_query(metric: str, maximize: bool, params_only: bool = False) -> Any:
    """The completed trial of job ``:job`` with the best ``metric`` (or only its ``params``, ``id`` and ``value``), ranked
    in SQL (one indexed scan, no rows loaded); built once per (metric, direction) and reused."""
    key = (metric, maximize, params_only)
    q = _BEST.get(key)
    if q is None:
        if len(_BEST) >= 1024:
            _BEST.clear()
        value = Trial.values[metric].as_float()
        q = _BEST[key] = (
            (select(Trial.params, Trial.id, value.label("value")) if params_only else select(Trial))
            .where(Trial.job_id == bindparam("job"), Trial.kind == "evaluate", Trial.state == TrialState.COMPLETED,
                   value.is_not(None))
            .order_by(value.desc() if maximize else value.asc(), Trial.id).limit(1))
    return q


def best_trial(session: Session, job: Job) -> Trial | None:
    """The completed trial with the best objective (:func:`best_query`)."""
    spec = JobSpec.of(job.spec)
    return session.execute(best_query(spec.metric, spec.maximize), {"job": job.id}).scalars().first()


#: Whether any lease has expired by ``:now`` (the reaper's first question).
EXPIRED_LEASE = (select(Trial.id).where(Trial.state == TrialState.RUNNING, Trial.lease_expires_at < bindparam("now"))
                 .limit(1))
#: Whether job ``:job`` has an evaluation running: parallel demand, the condition of a cheap proposal.
BUSY = (select(Trial.id).where(Trial.job_id == bindparam("job"), Trial.kind == "evaluate",
                               Trial.state == TrialState.RUNNING).limit(1))


def _has(state: TrialState) -> Any:
    return select(Trial.id).where(Trial.job_id == Job.id, Trial.kind == "evaluate", Trial.state == state).exists()


def _cheap_jobs(*demand: Any) -> Any:
    """Running compression jobs with an empty buffer and ``demand``, served longest ago first."""
    return (select(Job.id).where(Job.state == JobState.RUNNING, Job.kind == "compression", ~_has(TrialState.QUEUED),
                                 *demand).order_by(Job.updated_at, Job.id).limit(16))


#: Parallel demand is a trial of the job running ...
CHEAP_JOBS = _cheap_jobs(_has(TrialState.RUNNING))
#: ... or other workers that found nothing a moment ago, though no trial of the job runs (a job
#: just profiled only once its first batch is ``:grace`` overdue).
CHEAP_JOBS_CROWD = _cheap_jobs(or_(Job.n_created > 0, Job.updated_at < bindparam("grace")))


def cheap_jobs(crowd: bool, now: datetime, grace_s: float) -> tuple[Any, dict[str, Any]]:
    """The statement that finds the jobs a worker's empty lease may get a cheap point of, and its
    parameters: :data:`CHEAP_JOBS`, or with ``crowd`` (other workers idle too) :data:`CHEAP_JOBS_CROWD`
    with a just-profiled job's first batch ``grace_s`` overdue."""
    if crowd:
        return CHEAP_JOBS_CROWD, {"grace": now - timedelta(seconds=grace_s)}
    return CHEAP_JOBS, {}


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


__all__ = ["BUSY", "CHEAP_JOBS", "CHEAP_JOBS_CROWD", "EXPIRED_LEASE", "best_query", "cheap_jobs", "best_trial", "count_states", "pareto_trials",
           "visible_job"]
