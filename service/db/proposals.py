"""The proposal stream of a job: queued trials inserted by one generator at a time.

The scheduler asks :func:`jobs_needing_proposals` which buffers are short, takes a job's
generator lock (:func:`acquire_generator`), and adds the engine's points with
:func:`insert_proposals`, guarded on the job's ``n_created`` so two generators never add a batch
each.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import JSON, Integer, bindparam, func, insert, or_, select, text, update
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
  INSERT INTO trials (job_id, kind, number, seq, state, params, "values", sem, attempt, created_at)
  SELECT :job, :kind, :expected + p.i, j.seq - :k + 1 + p.i, '{queued}', p.params, '{}', '{}', 1, :now FROM j, p
  RETURNING id, params, number
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT :job, t.id, 'proposed', NULL, '{queued}', NULL, :now FROM t
)
SELECT t.id, t.params FROM t ORDER BY t.number
""".replace("{running}", JobState.RUNNING.value).replace("{queued}", TrialState.QUEUED.value)
).bindparams(bindparam("now", type_=UTCDateTime)).columns(id=Integer, params=JSON)


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
        update(Job).where(Job.id == job_id, Job.n_created == expected_created, Job.state == JobState.RUNNING)
        .values(n_created=Job.n_created + k, seq=Job.seq + k, updated_at=now, **state).returning(Job.seq)
    ).first()
    if res is None:
        raise TransitionError(f"job {job_id}: proposals were made by another generator", code="raced")
    last = int(res.seq)
    rows = [dict(job_id=job_id, kind=kind, number=expected_created + i, seq=last - k + 1 + i, state=TrialState.QUEUED,
                 params=params, values={}, sem={}, attempt=1, created_at=now) for i, params in enumerate(proposals)]
    # Core inserts (no ORM objects: a wide buffer is refilled with hundreds of rows at once).
    table = Trial.__table__
    out = list(session.execute(insert(table).returning(table.c.id, table.c.params, sort_by_parameter_order=True),
                               rows))
    session.execute(insert(Event), [dict(job_id=job_id, trial_id=t.id, kind="proposed", from_state=None,
                                         to_state=TrialState.QUEUED, detail=None, at=now) for t in out])
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
        .where(Job.id == job_id, Job.state == JobState.RUNNING, or_(*free))
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
        .where(Trial.state == TrialState.QUEUED, Trial.kind == "evaluate")
        .group_by(Trial.job_id)
        .subquery()
    )
    rows = session.execute(
        select(Job.id, func.coalesce(queued.c.q, 0), Job.n_created, Job.spec)
        .outerjoin(queued, queued.c.job_id == Job.id)
        .where(Job.state == JobState.RUNNING)
    ).all()
    return [(int(jid), int(q), int(created)) for jid, q, created, spec in rows
            if JobSpec.of(spec).needs_refill(int(q), int(created))]


__all__ = ["acquire_generator", "insert_proposals", "jobs_needing_proposals", "refill_step", "release_generator"]
