"""Jobs and trials: claiming work exactly once, guarded transitions, and the event log.

Every state change is an ``UPDATE ... WHERE state IN (...)`` that must match exactly one row;
when it matches none the caller gets :class:`TransitionError` (a 409 at the API), never a
silent no-op. Each change of a trial bumps its job's ``seq`` in the same transaction: the job
row is locked until commit, so trials of one job become visible in ``seq`` order and
``?since=<seq>`` never skips a change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from bocompress.spec import JobSpec
from bocompress.states import (
    ACTIVE_JOB_STATES,
    FINISHED_JOB_STATES,
    LOST_TRIAL_STATES,
    OPEN_TRIAL_STATES,
    JobState,
    TrialState,
)
from bocompress.service.db.errors import NotFound, TransitionError
from bocompress.service.db.models import Event, Job, Trial, utcnow
from bocompress.service.db.proposals import (
    acquire_generator,
    insert_proposals,
    jobs_needing_proposals,
    refill_step,
    release_generator,
)
from bocompress.service.db.queries import EXPIRED_LEASE, best_trial, count_states
from bocompress.service.results import compression_values

log = logging.getLogger("bocompress.trials")


@dataclass(frozen=True)
class Claimed:
    trial: Trial
    job: Job


def result_hash(values: dict[str, Any], sem: dict[str, Any], extra: Any = None) -> str:
    blob = json.dumps({"v": values, "s": sem, "x": extra}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def bump_seq(session: Session, job_id: int) -> int:
    """Increase the job's change counter and return it (locks the job row until commit)."""
    now = utcnow()
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(seq=Job.seq + 1, updated_at=now).returning(Job.seq)
    ).scalar_one()
    return int(seq)


def add_event(session: Session, job_id: int, kind: str, trial_id: int | None = None, from_state: str | None = None,
              to_state: str | None = None, detail: str | None = None) -> None:
    # A Core insert, sent at once: no unit-of-work flush at commit time, while the job row is locked.
    session.execute(insert(Event).values(job_id=job_id, trial_id=trial_id, kind=kind, from_state=from_state,
                                         to_state=to_state, detail=detail, at=utcnow()))


def transition(session: Session, trial: Trial, to_state: str, from_states: Sequence[str], *,
               event: str | None = None, detail: str | None = None, guard_attempt: bool = True,
               **fields: Any) -> Trial:
    """Move ``trial`` to ``to_state`` if it is in one of ``from_states``; else TransitionError.

    The caller holds the trial's row lock already (``SELECT ... FOR UPDATE`` on PostgreSQL;
    the whole write transaction on SQLite), so the lock order is always trial, then job.
    """
    seq = bump_seq(session, trial.job_id)
    conds = [Trial.id == trial.id, Trial.state.in_(list(from_states))]
    if guard_attempt:
        conds.append(Trial.attempt == trial.attempt)
    prev = trial.state
    row = session.execute(
        update(Trial).where(*conds).values(state=to_state, seq=seq, **fields).returning(Trial),
        execution_options={"populate_existing": True, "synchronize_session": False},
    ).scalars().first()
    if row is None:
        raise TransitionError(
            f"trial {trial.id} is {trial.state}, not {' or '.join(from_states)}: cannot move it to {to_state}",
            code="state",
        )
    add_event(session, trial.job_id, event or to_state, trial.id, prev, to_state, detail)
    if log.isEnabledFor(logging.INFO):
        log.info("trial %s", event or to_state, extra={"job_id": trial.job_id, "trial_id": trial.id,
                                                        "from_state": prev, "to_state": to_state,
                                                        "attempt": row.attempt, "worker": row.worker})
    return row


# --------------------------------------------------------------------------- claiming


def claim_next(session: Session, worker: str, kinds: Iterable[str], lease_seconds: float | None = None,
               job_id: int | None = None, dialect: str = "sqlite") -> Claimed | None:
    """Take the oldest queued trial (of an active job) and lease it to ``worker``.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` hands each row to exactly one transaction; on
    SQLite the whole transaction holds the write lock (``BEGIN IMMEDIATE``), which serializes
    claimers. ``lease_seconds=None`` takes the job's own; 0 means no expiry (ask/tell).
    """
    q = (
        select(Trial)
        .join(Job, Job.id == Trial.job_id)
        .where(Trial.state == TrialState.QUEUED, Trial.kind.in_(list(kinds)),
               or_(Job.state.in_(ACTIVE_JOB_STATES), and_(Trial.kind == "export", Job.state == JobState.COMPLETED)))
        .order_by(Trial.id)
        .limit(1)
    )
    if job_id is not None:
        q = q.where(Trial.job_id == job_id)
    else:  # workers: trials of ask/tell jobs are evaluated by their own client, never leased
        q = q.where(or_(Trial.kind != "evaluate", Job.kind == "compression"))
    if dialect == "postgresql":
        q = q.with_for_update(skip_locked=True, of=Trial)
    trial = session.execute(q).scalars().first()
    if trial is None:
        return None
    job = session.get(Job, trial.job_id)
    assert job is not None
    secs = JobSpec.of(job.spec).lease_seconds if lease_seconds is None else lease_seconds
    now = utcnow()
    trial = transition(
        session, trial, TrialState.RUNNING, (TrialState.QUEUED,), event="leased", detail=worker,
        worker=worker, started_at=now, lease_token=secrets.token_hex(16),
        lease_expires_at=(now + timedelta(seconds=secs)) if secs > 0 else None,
    )
    return Claimed(trial, job)


def reap_expired(session: Session, now: datetime | None = None, limit: int = 500) -> int:
    """Put trials whose lease expired back to ``queued`` (attempt + 1), or ``abandoned``."""
    now = now or utcnow()
    if session.execute(EXPIRED_LEASE, {"now": now}).first() is None:
        return 0
    q = (select(Trial).where(Trial.state == TrialState.RUNNING, Trial.lease_expires_at.is_not(None),
                             Trial.lease_expires_at < now).order_by(Trial.id).limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=Trial)
    rows = session.execute(q).scalars().all()
    n = 0
    for trial in rows:
        job = session.get(Job, trial.job_id)
        assert job is not None
        max_attempts = JobSpec.of(job.spec).max_attempts
        try:
            if trial.attempt < max_attempts:
                transition(session, trial, TrialState.QUEUED, (TrialState.RUNNING,), event="lease_expired",
                           detail=f"worker {trial.worker} lost the lease", attempt=trial.attempt + 1,
                           worker=None, lease_token=None, lease_expires_at=None)
            else:
                transition(session, trial, TrialState.ABANDONED, (TrialState.RUNNING,), event="abandoned",
                           detail=f"lease lost {trial.attempt} times", lease_token=None, lease_expires_at=None,
                           finished_at=now, error=f"abandoned: lease lost {trial.attempt} times")
                after_trial_finished(session, job, trial)
            n += 1
        except TransitionError:
            continue
    return n


# --------------------------------------------------------------------------- results


def check_lease(trial: Trial, lease_token: str | None) -> None:
    """Refuse (409 ``lease_lost``) a call that does not carry the trial's current lease token.

    The token is mandatory: a worker acts only on trials it holds a lease for (DESIGN.md, "Trials").
    A trial without a token (never leased, or its lease already ended) accepts no worker call.
    """
    if lease_token is None:
        raise TransitionError(f"trial {trial.id}: send the lease's token (lease_token in the body or an "
                              "X-Lease-Token header): a worker acts only on trials it holds a lease for",
                              code="lease_lost")
    if trial.lease_token is None or not secrets.compare_digest(lease_token.encode(), trial.lease_token.encode()):
        raise TransitionError(f"trial {trial.id}: this lease is no longer valid (the trial was leased again)",
                              code="lease_lost")


def lock_trial(session: Session, trial_id: int, dialect: str) -> Trial:
    q = select(Trial).where(Trial.id == trial_id)
    if dialect == "postgresql":
        q = q.with_for_update()
    trial = session.execute(q).scalars().first()
    if trial is None:
        raise NotFound("trial", trial_id)
    return trial


def heartbeat(session: Session, trial: Trial, lease_token: str | None) -> Trial:
    job = session.get(Job, trial.job_id)
    assert job is not None
    if trial.state == TrialState.CANCELLED or job.state == JobState.CANCELLED:
        raise TransitionError(f"trial {trial.id}: the job was cancelled", code="cancelled")
    if trial.state != TrialState.RUNNING:
        raise TransitionError(f"trial {trial.id} is {trial.state}: the lease was lost", code="lease_lost")
    check_lease(trial, lease_token)
    if trial.lease_expires_at is None:
        return trial
    secs = JobSpec.of(job.spec).lease_seconds
    res = session.execute(
        update(Trial).where(Trial.id == trial.id, Trial.state == TrialState.RUNNING, Trial.attempt == trial.attempt)
        .values(lease_expires_at=utcnow() + timedelta(seconds=secs))
    )
    if res.rowcount != 1:
        raise TransitionError(f"trial {trial.id}: the lease was lost", code="lease_lost")
    session.refresh(trial)
    return trial


def complete(session: Session, trial: Trial, values: dict[str, float], sem: dict[str, float],
             lease_token: str | None, extra: dict[str, Any] | None = None) -> tuple[Trial, bool]:
    """Store a result once. Returns (trial, changed). Same result again: (trial, False)."""
    h = result_hash(values, sem, extra)
    if trial.state == TrialState.COMPLETED:
        check_lease(trial, lease_token)  # a repeat comes from the lease holder too
        if trial.result_hash == h:
            return trial, False
        raise TransitionError(f"trial {trial.id} is already completed with a different result", code="duplicate")
    if trial.state != TrialState.RUNNING:
        code = "cancelled" if trial.state == TrialState.CANCELLED else "lease_lost"
        raise TransitionError(f"trial {trial.id} is {trial.state}: result refused (lease lost or job stopped)",
                              code=code)
    check_lease(trial, lease_token)
    job = session.get(Job, trial.job_id)
    assert job is not None
    transition(session, trial, TrialState.COMPLETED, (TrialState.RUNNING,), values=values, sem=sem, result_hash=h,
               finished_at=utcnow(), lease_expires_at=None, extra=extra)
    after_trial_finished(session, job, trial)
    return trial, True


def fail(session: Session, trial: Trial, error: str, retry: bool, lease_token: str | None) -> Trial:
    if trial.state != TrialState.RUNNING:
        code = "cancelled" if trial.state == TrialState.CANCELLED else "lease_lost"
        raise TransitionError(f"trial {trial.id} is {trial.state}: failure report refused", code=code)
    check_lease(trial, lease_token)
    job = session.get(Job, trial.job_id)
    assert job is not None
    max_attempts = JobSpec.of(job.spec).max_attempts
    if retry and trial.attempt < max_attempts:
        transition(session, trial, TrialState.QUEUED, (TrialState.RUNNING,), event="retry", detail=error[:2000],
                   attempt=trial.attempt + 1, worker=None, lease_token=None, lease_expires_at=None, error=error)
        return trial
    transition(session, trial, TrialState.FAILED, (TrialState.RUNNING,), detail=error[:2000], error=error, finished_at=utcnow(),
               lease_expires_at=None)
    after_trial_finished(session, job, trial)
    return trial


# --------------------------------------------------------------------------- jobs


def set_job_state(session: Session, job: Job, to_state: str, from_states: Sequence[str],
                  reason: str | None = None, **fields: Any) -> None:
    now = utcnow()
    values: dict[str, Any] = dict(state=to_state, updated_at=now, **fields)
    if reason is not None:
        values["reason"] = reason
    if to_state in FINISHED_JOB_STATES:
        values["finished_at"] = now
    res = session.execute(update(Job).where(Job.id == job.id, Job.state.in_(list(from_states))).values(**values))
    if res.rowcount != 1:
        raise TransitionError(f"job {job.id} is {job.state}, not {' or '.join(from_states)}", code="job_state")
    add_event(session, job.id, f"job_{to_state}", None, job.state, to_state, reason)
    session.refresh(job)


def after_trial_finished(session: Session, job: Job, trial: Trial) -> None:
    """Close the job once its budget is spent and nothing is open; fail it if profiling failed."""
    session.refresh(job)
    if trial.kind == "profile":
        if trial.state in LOST_TRIAL_STATES and job.state == JobState.PROFILING:
            set_job_state(session, job, JobState.FAILED, (JobState.PROFILING,),
                          reason=f"profiling failed: {trial.error or trial.state}")
        return
    if trial.kind == "evaluate":
        _close_if_done(session, job)
    if trial.kind == "chipnet" and trial.state in LOST_TRIAL_STATES and job.state == JobState.RUNNING:
        # a ChipNet job's one long task: the job cannot go on without it
        set_job_state(session, job, JobState.FAILED, (JobState.RUNNING,),
                      reason=f"ChipNet failed: {(trial.error or trial.state).splitlines()[0][:500]}")


def _close_if_done(session: Session, job: Job) -> None:
    """Complete a running job whose budget is spent and whose evaluations are all finished."""
    if job.state != JobState.RUNNING or not JobSpec.of(job.spec).budget_spent(job.n_created):
        return
    open_n = session.execute(
        select(func.count()).select_from(Trial)
        .where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state.in_(OPEN_TRIAL_STATES))
    ).scalar_one()
    if open_n == 0:
        reason = _all_failed_reason(session, job)
        if reason is not None:
            set_job_state(session, job, JobState.FAILED, (JobState.RUNNING,), reason=reason)
        else:
            set_job_state(session, job, JobState.COMPLETED, (JobState.RUNNING,))


def _all_failed_reason(session: Session, job: Job) -> str | None:
    """When no evaluation of ``job`` completed: why (the most common first line of the errors)."""
    done = session.execute(
        select(func.count()).select_from(Trial)
        .where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state == TrialState.COMPLETED)
    ).scalar_one()
    if done:
        return None
    errors = session.execute(
        select(Trial.state, Trial.error).where(Trial.job_id == job.id, Trial.kind == "evaluate")
    ).all()
    if not errors:
        return None
    firsts: dict[str, int] = {}
    for state, err in errors:
        line = ((err or "").strip().splitlines() or [state])[0][:500]
        firsts[line] = firsts.get(line, 0) + 1
    common, n = max(firsts.items(), key=lambda kv: kv[1])
    return f"every trial failed ({n} of {len(errors)}: {common})"


def close_job_if_done(session: Session, job_id: int, dialect: str) -> None:
    """Close the job after an evaluation stored outside this transaction (the hot path): with the
    job row locked, so two last results close the job once."""
    q = select(Job).where(Job.id == job_id)
    _close_if_done(session, session.execute(q.with_for_update() if dialect == "postgresql" else q).scalar_one())


def cancel_job(session: Session, job: Job, dialect: str) -> Job:
    q = select(Trial).where(Trial.job_id == job.id, Trial.state.in_(OPEN_TRIAL_STATES)).order_by(Trial.id)
    if dialect == "postgresql":
        q = q.with_for_update()
    open_trials = session.execute(q).scalars().all()
    set_job_state(session, job, JobState.CANCELLED, ACTIVE_JOB_STATES, reason="cancelled by user")
    for t in open_trials:
        transition(session, t, TrialState.CANCELLED, OPEN_TRIAL_STATES, finished_at=utcnow(), lease_expires_at=None,
                   guard_attempt=False)
        drop_unreported_artifact(session, t)
    return job


def drop_unreported_artifact(session: Session, trial: Trial) -> None:
    """Delete the model a cancelled task uploaded before its result came (an export's, ChipNet's):
    nothing half-written is kept."""
    blob_id = ((trial.extra or {}).get("artifact") or {}).get("blob_id")
    if blob_id and trial.kind in ("export", "chipnet"):
        from bocompress.service.db.models import Blob

        session.execute(delete(Blob).where(Blob.id == blob_id, Blob.kind == "artifact"))
        session.execute(update(Trial).where(Trial.id == trial.id).values(extra={
            k: v for k, v in (trial.extra or {}).items() if k != "artifact"}))


__all__ = [
    "Claimed", "NotFound", "TransitionError", "acquire_generator", "add_event", "after_trial_finished", "best_trial",
    "bump_seq", "cancel_job", "check_lease", "claim_next", "close_job_if_done", "complete", "compression_values",
    "count_states", "fail", "heartbeat", "insert_proposals", "jobs_needing_proposals", "lock_trial", "reap_expired",
    "refill_step", "release_generator", "set_job_state", "transition",
]
