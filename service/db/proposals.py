"""The proposal stream of a job: queued trials inserted by one generator at a time.

The scheduler asks :func:`jobs_needing_proposals` which buffers are short, takes a job's
generator lock (:func:`acquire_generator`), and adds the engine's points with
:func:`insert_proposals`, guarded on the job's ``n_created`` (two inserts never share a trial
number) and capped by its ``max_trials``. A cheap proposal made on the request path while the
engine fitted (storage's :meth:`~bocompress.service.db.store.Store.ask` and ``lease`` on an empty buffer)
goes through the same insert, so the engine's batch then lands after it, what still fits.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import JSON, Integer, String, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from bocompress.spec import JobSpec, refill_step
from bocompress.states import JobState, TrialState
from bocompress.service.db.errors import TransitionError
from bocompress.service.db.models import Event, Job, Trial, UTCDateTime, utcnow

_PG_INSERT_PROPOSALS = text("""
WITH j AS (
  UPDATE jobs SET n_created = n_created + :k, seq = seq + :k, updated_at = :now,
         optimizer_state = COALESCE(CAST(:state AS json), optimizer_state)
  WHERE id = :job AND n_created = :expected AND state = '{running}'
  RETURNING seq
), p AS (
  SELECT x.ord - 1 AS i, x.value AS params FROM json_array_elements(CAST(:points AS json)) WITH ORDINALITY AS x(value, ord)
), t AS (
  INSERT INTO trials (job_id, kind, number, seq, state, params, "values", sem, attempt, created_at, proposal)
  SELECT :job, :kind, :expected + p.i, j.seq - :k + 1 + p.i, '{queued}', p.params, '{}', '{}', 1, :now, :proposal
  FROM j, p
  RETURNING id, params, number
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT :job, t.id, 'proposed', NULL, '{queued}', :proposal, :now FROM t
)
SELECT t.id, t.params FROM t ORDER BY t.number
""".replace("{running}", JobState.RUNNING.value).replace("{queued}", TrialState.QUEUED.value)
).bindparams(bindparam("now", type_=UTCDateTime), bindparam("proposal", type_=String)).columns(id=Integer, params=JSON)


def _insert_at(session: Session, job_id: int, at: int, proposals: list[dict[str, float]], kind: str,
               optimizer_state: dict[str, Any] | None, proposal: str | None) -> list[Any] | None:
    """The guarded insert: ``proposals`` at numbers ``at, at + 1, ...`` if the job is running with
    ``n_created == at``; their (id, params) rows, or None when that guard fails."""
    k = len(proposals)
    now = utcnow()
    state = {} if optimizer_state is None else {"optimizer_state": optimizer_state}
    if session.get_bind().dialect.name == "postgresql":
        out = list(session.execute(_PG_INSERT_PROPOSALS, {
            "k": k, "now": now, "job": job_id, "expected": at, "kind": kind, "proposal": proposal,
            "points": json.dumps(proposals), "state": None if optimizer_state is None else json.dumps(optimizer_state)}))
        return out or None
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.n_created == at, Job.state == JobState.RUNNING)
        .values(n_created=Job.n_created + k, seq=Job.seq + k, updated_at=now, **state).returning(Job.seq)
    ).first()
    if res is None:
        return None
    last = int(res.seq)
    rows = [dict(job_id=job_id, kind=kind, number=at + i, seq=last - k + 1 + i, state=TrialState.QUEUED,
                 params=params, values={}, sem={}, attempt=1, created_at=now, proposal=proposal)
            for i, params in enumerate(proposals)]
    # Core inserts (no ORM objects: a wide buffer is refilled with hundreds of rows at once).
    table = Trial.__table__
    out = list(session.execute(insert(table).returning(table.c.id, table.c.params, sort_by_parameter_order=True),
                               rows))
    session.execute(insert(Event), [dict(job_id=job_id, trial_id=t.id, kind="proposed", from_state=None,
                                         to_state=TrialState.QUEUED, detail=proposal, at=now) for t in out])
    return out


def insert_proposals(session: Session, job_id: int, expected_created: int, proposals: list[dict[str, float]],
                     kind: str = "evaluate", optimizer_state: dict[str, Any] | None = None,
                     proposal: str | None = "engine", follow: bool = True) -> list[Any]:
    """Add proposals as queued trials, as many as still fit the job's budget: their (id, params) rows.

    ``expected_created`` is the ``n_created`` the points were computed at. The insert is guarded
    on it (two inserts never share a trial number); when another insert got there first (a
    cheap proposal made on the request path while the engine fitted, see
    :mod:`bocompress.service.optimizer.cheap`), the points are not thrown away: they go in after it, the
    first ones kept, as many as ``max_trials`` still allows. TransitionError ``raced`` only when
    none fits (the budget is all created, or the job no longer runs).

    Bumps the job's ``seq`` once per trial and stores ``optimizer_state`` (the engine's state
    after proposing them) where given; ``proposal`` marks what made the points (``engine``,
    ``cheap``; None for tasks). On PostgreSQL each attempt is one statement, so the job row
    (which every lease and result also bumps) is locked only while it runs, not across a round
    trip per table. ``follow=False``: no retry after another insert (the caller recomputes its
    point for the new ``n_created``: a cheap proposal is a function of it, and the same point
    again would be a duplicate).
    """
    if not proposals:
        return []
    at = int(expected_created)
    max_trials = JobSpec.of(session.execute(select(Job.spec).where(Job.id == job_id)).scalar_one_or_none() or {}).max_trials
    for _ in range(8):  # each retry follows an insert that got in first: a handful at most
        pts = proposals[:max(0, max_trials - at)] if kind == "evaluate" else proposals
        if not pts:
            break
        out = _insert_at(session, job_id, at, pts, kind, optimizer_state, proposal)
        if out is not None:
            return out
        row = session.execute(select(Job.n_created, Job.state).where(Job.id == job_id)).first()
        if not follow or row is None or row.state != JobState.RUNNING or int(row.n_created) == at:
            break
        at = int(row.n_created)
    raise TransitionError(f"job {job_id}: no proposal fits (its budget is created, or it stopped)", code="raced")


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
        .where(Job.id == job_id, Job.state == JobState.RUNNING, or_(*free))
        .values(generator_owner=me, generator_until=now + timedelta(seconds=seconds))
    )
    return res.rowcount == 1


def release_generator(session: Session, job_id: int, me: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.generator_owner == me).values(generator_owner=None,
                                                                              generator_until=None)
    )


def open_counts(session: Session, job_id: int | None = None) -> Any:
    """A subquery of (job_id, queued ``q``, running ``r``) evaluations per job (of ``job_id`` only where given)."""
    q = (select(Trial.job_id,
                func.sum(case((Trial.state == TrialState.QUEUED, 1), else_=0)).label("q"),
                func.sum(case((Trial.state == TrialState.RUNNING, 1), else_=0)).label("r"))
         .where(Trial.state.in_((TrialState.QUEUED, TrialState.RUNNING)), Trial.kind == "evaluate"))
    if job_id is not None:
        q = q.where(Trial.job_id == job_id)
    return q.group_by(Trial.job_id).subquery()


def jobs_needing_proposals(session: Session) -> list[tuple[int, int, int]]:
    """(job id, queued count, n_created) for running jobs whose buffer is short, the emptiest first.

    A buffer's depth follows its active consumers (:meth:`bocompress.spec.JobSpec.buffer_target`: the
    job's running trials). The order is who waits most: with one engine for every job, the job
    with the fewest queued proposals per active consumer is filled first, so no job's refill
    waits behind fits for jobs that still have proposals in hand.
    """
    counts = open_counts(session)
    rows = session.execute(
        select(Job.id, func.coalesce(counts.c.q, 0), func.coalesce(counts.c.r, 0), Job.n_created, Job.spec)
        .outerjoin(counts, counts.c.job_id == Job.id)
        .where(Job.state == JobState.RUNNING)
    ).all()
    out = [(int(jid), int(q), int(r), int(created)) for jid, q, r, created, spec in rows
           if JobSpec.of(spec).needs_refill(int(q), int(created), int(r))]
    out.sort(key=lambda x: (x[1] / max(1, x[2]), x[1], x[0]))
    return [(jid, q, created) for jid, q, _, created in out]


__all__ = ["acquire_generator", "insert_proposals", "jobs_needing_proposals", "open_counts", "refill_step", "release_generator"]
