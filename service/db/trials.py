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

from sqlalchemy import JSON, Integer, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from bocompress import costs
from service.db.models import Event, Job, Trial, UTCDateTime, utcnow

log = logging.getLogger("bocompress.trials")

ACTIVE_JOB_STATES = ("profiling", "running")
OPEN_TRIAL_STATES = ("queued", "running")


class TransitionError(Exception):
    """A guarded update matched no row: the trial or job is not in a state that allows it."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


class NotFound(Exception):
    def __init__(self, what: str, ident: Any) -> None:
        super().__init__(f"{what} {ident} not found")
        self.what = what


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
        .where(Trial.state == "queued", Trial.kind.in_(list(kinds)),
               or_(Job.state.in_(ACTIVE_JOB_STATES), and_(Trial.kind == "export", Job.state == "completed")))
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
    secs = float(job.spec["budget"]["lease_seconds"]) if lease_seconds is None else lease_seconds
    now = utcnow()
    trial = transition(
        session, trial, "running", ("queued",), event="leased", detail=worker,
        worker=worker, started_at=now, lease_token=secrets.token_hex(16),
        lease_expires_at=(now + timedelta(seconds=secs)) if secs > 0 else None,
    )
    return Claimed(trial, job)


def reap_expired(session: Session, now: datetime | None = None, limit: int = 500) -> int:
    """Put trials whose lease expired back to ``queued`` (attempt + 1), or ``abandoned``."""
    now = now or utcnow()
    if session.execute(select(Trial.id).where(Trial.state == "running", Trial.lease_expires_at < now).limit(1)
                       ).first() is None:
        return 0
    q = (select(Trial).where(Trial.state == "running", Trial.lease_expires_at.is_not(None),
                             Trial.lease_expires_at < now).order_by(Trial.id).limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=Trial)
    rows = session.execute(q).scalars().all()
    n = 0
    for trial in rows:
        job = session.get(Job, trial.job_id)
        assert job is not None
        max_attempts = int(job.spec["budget"]["max_attempts"])
        try:
            if trial.attempt < max_attempts:
                transition(session, trial, "queued", ("running",), event="lease_expired",
                           detail=f"worker {trial.worker} lost the lease", attempt=trial.attempt + 1,
                           worker=None, lease_token=None, lease_expires_at=None)
            else:
                transition(session, trial, "abandoned", ("running",), event="abandoned",
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
    if trial.state == "cancelled" or job.state == "cancelled":
        raise TransitionError(f"trial {trial.id}: the job was cancelled", code="cancelled")
    if trial.state != "running":
        raise TransitionError(f"trial {trial.id} is {trial.state}: the lease was lost", code="lease_lost")
    check_lease(trial, lease_token)
    if trial.lease_expires_at is None:
        return trial
    secs = float(job.spec["budget"]["lease_seconds"])
    res = session.execute(
        update(Trial).where(Trial.id == trial.id, Trial.state == "running", Trial.attempt == trial.attempt)
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
    if trial.state == "completed":
        check_lease(trial, lease_token)  # a repeat comes from the lease holder too
        if trial.result_hash == h:
            return trial, False
        raise TransitionError(f"trial {trial.id} is already completed with a different result", code="duplicate")
    if trial.state != "running":
        code = "cancelled" if trial.state == "cancelled" else "lease_lost"
        raise TransitionError(f"trial {trial.id} is {trial.state}: result refused (lease lost or job stopped)",
                              code=code)
    check_lease(trial, lease_token)
    job = session.get(Job, trial.job_id)
    assert job is not None
    transition(session, trial, "completed", ("running",), values=values, sem=sem, result_hash=h,
               finished_at=utcnow(), lease_expires_at=None, extra=extra)
    after_trial_finished(session, job, trial)
    return trial, True


def fail(session: Session, trial: Trial, error: str, retry: bool, lease_token: str | None) -> Trial:
    if trial.state != "running":
        code = "cancelled" if trial.state == "cancelled" else "lease_lost"
        raise TransitionError(f"trial {trial.id} is {trial.state}: failure report refused", code=code)
    check_lease(trial, lease_token)
    job = session.get(Job, trial.job_id)
    assert job is not None
    max_attempts = int(job.spec["budget"]["max_attempts"])
    if retry and trial.attempt < max_attempts:
        transition(session, trial, "queued", ("running",), event="retry", detail=error[:2000],
                   attempt=trial.attempt + 1, worker=None, lease_token=None, lease_expires_at=None, error=error)
        return trial
    transition(session, trial, "failed", ("running",), detail=error[:2000], error=error, finished_at=utcnow(),
               lease_expires_at=None)
    after_trial_finished(session, job, trial)
    return trial


# --------------------------------------------------------------------------- jobs


def count_states(session: Session, job_id: int, kind: str = "evaluate") -> dict[str, int]:
    rows = session.execute(
        select(Trial.state, func.count()).where(Trial.job_id == job_id, Trial.kind == kind).group_by(Trial.state)
    ).all()
    out = {s: 0 for s in ("queued", "running", "completed", "failed", "cancelled", "abandoned")}
    out.update({s: int(n) for s, n in rows})
    return out


def set_job_state(session: Session, job: Job, to_state: str, from_states: Sequence[str],
                  reason: str | None = None, **fields: Any) -> None:
    now = utcnow()
    values: dict[str, Any] = dict(state=to_state, updated_at=now, **fields)
    if reason is not None:
        values["reason"] = reason
    if to_state in ("completed", "failed", "cancelled"):
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
        if trial.state in ("failed", "abandoned") and job.state == "profiling":
            set_job_state(session, job, "failed", ("profiling",),
                          reason=f"profiling failed: {trial.error or trial.state}")
        return
    if trial.kind == "evaluate":
        _close_if_done(session, job)


def _close_if_done(session: Session, job: Job) -> None:
    """Complete a running job whose budget is spent and whose evaluations are all finished."""
    if job.state != "running" or job.n_created < int(job.spec["budget"]["max_trials"]):
        return
    open_n = session.execute(
        select(func.count()).select_from(Trial)
        .where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state.in_(OPEN_TRIAL_STATES))
    ).scalar_one()
    if open_n == 0:
        reason = _all_failed_reason(session, job)
        if reason is not None:
            set_job_state(session, job, "failed", ("running",), reason=reason)
        else:
            set_job_state(session, job, "completed", ("running",))


def _all_failed_reason(session: Session, job: Job) -> str | None:
    """When no evaluation of ``job`` completed: why (the most common first line of the errors)."""
    done = session.execute(
        select(func.count()).select_from(Trial)
        .where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state == "completed")
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
    set_job_state(session, job, "cancelled", ACTIVE_JOB_STATES, reason="cancelled by user")
    for t in open_trials:
        transition(session, t, "cancelled", OPEN_TRIAL_STATES, finished_at=utcnow(), lease_expires_at=None,
                   guard_attempt=False)
    return job


_PG_INSERT_PROPOSALS = text("""
WITH j AS (
  UPDATE jobs SET n_created = n_created + :k, seq = seq + :k, updated_at = :now,
         optimizer_state = COALESCE(CAST(:state AS json), optimizer_state)
  WHERE id = :job AND n_created = :expected AND state = 'running'
  RETURNING seq
), p AS (
  SELECT x.ord - 1 AS i, x.value AS params FROM json_array_elements(CAST(:points AS json)) WITH ORDINALITY AS x(value, ord)
), t AS (
  INSERT INTO trials (job_id, kind, number, seq, state, params, "values", sem, attempt, created_at)
  SELECT :job, :kind, :expected + p.i, j.seq - :k + 1 + p.i, 'queued', p.params, '{}', '{}', 1, :now FROM j, p
  RETURNING id, params, number
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT :job, t.id, 'proposed', NULL, 'queued', NULL, :now FROM t
)
SELECT t.id, t.params FROM t ORDER BY t.number
""").bindparams(bindparam("now", type_=UTCDateTime)).columns(id=Integer, params=JSON)


def insert_proposals(session: Session, job_id: int, expected_created: int, proposals: list[dict[str, float]],
                     kind: str = "evaluate", optimizer_state: dict[str, Any] | None = None) -> list[Any]:
    """Add proposals as queued trials, unless another generator got there first: their (id, params) rows.

    Guarded on ``n_created == expected_created``; bumps the job's ``seq`` once per trial and
    stores ``optimizer_state`` (the engine's state after proposing them) where given. On
    PostgreSQL it is one statement, so the job row (which every lease and result also bumps) is
    locked only while it runs, not across a round trip per table.
    """
    k = len(proposals)
    if k == 0:
        return []
    now = utcnow()
    state = {} if optimizer_state is None else {"optimizer_state": optimizer_state}
    if session.get_bind().dialect.name == "postgresql":
        out = list(session.execute(_PG_INSERT_PROPOSALS, {
            "k": k, "now": now, "job": job_id, "expected": expected_created, "kind": kind,
            "points": json.dumps(proposals), "state": None if optimizer_state is None else json.dumps(optimizer_state)}))
        if not out:
            raise TransitionError(f"job {job_id}: proposals were made by another generator", code="raced")
        return out
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.n_created == expected_created, Job.state == "running")
        .values(n_created=Job.n_created + k, seq=Job.seq + k, updated_at=now, **state).returning(Job.seq)
    ).first()
    if res is None:
        raise TransitionError(f"job {job_id}: proposals were made by another generator", code="raced")
    last = int(res.seq)
    rows = [dict(job_id=job_id, kind=kind, number=expected_created + i, seq=last - k + 1 + i, state="queued",
                 params=params, values={}, sem={}, attempt=1, created_at=now) for i, params in enumerate(proposals)]
    # Core inserts (no ORM objects: a wide buffer is refilled with hundreds of rows at once).
    table = Trial.__table__
    out = list(session.execute(insert(table).returning(table.c.id, table.c.params, sort_by_parameter_order=True),
                               rows))
    session.execute(insert(Event), [dict(job_id=job_id, trial_id=t.id, kind="proposed", from_state=None,
                                         to_state="queued", detail=None, at=now) for t in out])
    return out


def acquire_generator(session: Session, job_id: int, me: str, seconds: float, stale_owner: str | None = None) -> bool:
    """A database lock on the job's proposal stream: one generator at a time, across replicas.

    ``stale_owner``: a holder known to be dead (a crashed process of this host), whose lock is
    taken over before it expires; guarded on it still being the holder.
    """
    now = utcnow()
    free = [Job.generator_owner.is_(None), Job.generator_until.is_(None), Job.generator_until < now,
            Job.generator_owner == me]
    if stale_owner is not None:
        free.append(Job.generator_owner == stale_owner)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", or_(*free))
        .values(generator_owner=me, generator_until=now + timedelta(seconds=seconds))
    )
    return res.rowcount == 1


def release_generator(session: Session, job_id: int, me: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.generator_owner == me).values(generator_owner=None,
                                                                              generator_until=None)
    )


def jobs_needing_proposals(session: Session) -> list[tuple[int, int, int]]:
    """(job id, queued count, n_created) for running jobs whose buffer is short."""
    queued = (
        select(Trial.job_id, func.count().label("q"))
        .where(Trial.state == "queued", Trial.kind == "evaluate")
        .group_by(Trial.job_id)
        .subquery()
    )
    rows = session.execute(
        select(Job.id, func.coalesce(queued.c.q, 0), Job.n_created, Job.spec)
        .outerjoin(queued, queued.c.job_id == Job.id)
        .where(Job.state == "running")
    ).all()
    out = []
    for jid, q, created, spec in rows:
        b = spec["budget"]
        left = int(b["max_trials"]) - int(created)
        need = min(int(b["max_parallel"]) - int(q), left)
        if need > 0 and need >= min(refill_step(int(b["max_parallel"])), left):
            out.append((int(jid), int(q), int(created)))
    return out


def refill_step(max_parallel: int) -> int:
    """How many free buffer slots a job waits for before a refill: 1 up to 15 parallel trials
    (each result is in the next proposal), then an eighth of the buffer (a wide buffer is
    refilled in batches, since every refill reads the job's history)."""
    return max(1, max_parallel // 8)


# --------------------------------------------------------------------------- compression values


def compression_values(job: Job, params: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """Fill ``ratio`` (exact, from the layer table) and ``objective`` from the worker's L."""
    obj = job.spec["objective"]
    kind = obj.get("cost", "params")
    out = dict(values)
    if "ratio" in values:
        out["ratio_measured"] = float(values["ratio"])
    r = costs.ratio(job.profile, params, kind)
    out["ratio"] = r
    L = float(values["distill_l2"])
    if obj.get("kind") == "constrained":
        budget = float(obj["budget"])
        out["feasible"] = 1.0 if r <= budget + 1e-12 else 0.0
        out["objective"] = L if r <= budget + 1e-12 else L + 1e6 * (r - budget) + 1.0
    else:
        out["objective"] = float(obj.get("kappa", 1.0)) * L + r
    return out


def objective_of(job: Job, values: dict[str, Any]) -> float | None:
    """The number a job minimizes for one completed trial (generic maximize → negated)."""
    if job.kind == "compression":
        v = values.get("objective")
        return None if v is None else float(v)
    metric = job.spec["objective"].get("metric") or "objective"
    v = values.get(metric)
    if v is None:
        return None
    return -float(v) if job.spec["objective"].get("direction") == "maximize" else float(v)


def best_trial(session: Session, job: Job) -> Trial | None:
    """The completed trial with the best objective, ranked in SQL (one indexed scan, no rows loaded)."""
    if job.kind == "compression":
        metric, maximize = "objective", False
    else:
        metric = job.spec["objective"].get("metric") or "objective"
        maximize = job.spec["objective"].get("direction") == "maximize"
    value = Trial.values[metric].as_float()
    q = (select(Trial).where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state == "completed",
                             value.is_not(None))
         .order_by(value.desc() if maximize else value.asc(), Trial.id).limit(1))
    return session.execute(q).scalars().first()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimized)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_r = [], float("inf")
    for i in order:
        if points[i][1] < best_r:
            front.append(i)
            best_r = points[i][1]
    return front


__all__ = [
    "Claimed", "NotFound", "TransitionError", "add_event", "after_trial_finished", "best_trial", "close_job_if_done",
    "bump_seq", "cancel_job", "claim_next", "complete", "compression_values", "count_states", "fail",
    "heartbeat", "insert_proposals", "jobs_needing_proposals", "refill_step", "objective_of", "pareto_front", "reap_expired",
    "set_job_state", "transition",
]
