"""The worker hot path: lease, heartbeat and result in a few Core statements, no ORM session.

Every worker cycle is three requests (lease -> heartbeat -> complete), so these three decide how
many trials per second one service process can hand out. The ORM functions of
:mod:`service.db.trials` stay the reference behaviour; the functions here do the *common case*
of each with the same guarded updates, the same ``seq`` bump and the same event rows, and return
``None`` whenever anything is unusual (a lost lease, a cancelled job, a profiling or export task,
a repeated result). The caller then runs the ORM path, which raises the exact 404/409 with its
message. So an unusual call costs one extra statement; a usual one costs:

- lease: one statement on PostgreSQL (a data-modifying CTE: claim with ``SKIP LOCKED``, bump the
  job's ``seq``, lease the trial, log the event), four in one ``BEGIN IMMEDIATE`` on SQLite;
- heartbeat: one ``UPDATE ... RETURNING``;
- complete: a locked read, then one statement (bump ``seq``, store the result, log the event).

What a job never changes after it runs (its spec and layer table) is cached per process in
:class:`JobInfo`, so no hot statement reads the job's JSON columns.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Integer, String, bindparam, func, insert, select, text, update
from sqlalchemy.engine import Connection, Row

from service.db.models import Event, Job, Trial, UTCDateTime, utcnow

TRIALS = Trial.__table__
JOBS = Job.__table__
EVENTS = Event.__table__
_TRIAL_COLS = [c for c in TRIALS.c]
#: The job's changing columns, returned by the ``seq`` bump (the rest of a job is in JobInfo).
_JOB_DYN = ("seq", "state", "reason", "updated_at", "n_created")


@dataclass(frozen=True)
class JobInfo:
    """What a running job never changes: its spec and layer table (immutable once profiled)."""

    id: int
    name: str
    owner: str
    kind: str
    created_at: datetime
    spec: dict[str, Any]
    profile: dict[str, Any] | None
    search_space: list[dict[str, Any]] | None

    @property
    def lease_seconds(self) -> float:
        return float(self.spec["budget"]["lease_seconds"])

    @property
    def max_trials(self) -> int:
        return int(self.spec["budget"]["max_trials"])


class JobInfoCache:
    """Per-process cache of :class:`JobInfo`; only jobs whose static part is final are kept."""

    def __init__(self, limit: int = 4096) -> None:
        self._d: dict[int, JobInfo] = {}
        self._lock = threading.Lock()
        self.limit = limit

    def get(self, conn: Connection, job_id: int) -> JobInfo | None:
        info = self._d.get(job_id)
        if info is not None:
            return info
        row = conn.execute(select(JOBS.c.id, JOBS.c.name, JOBS.c.owner, JOBS.c.kind, JOBS.c.created_at, JOBS.c.spec,
                                  JOBS.c.profile, JOBS.c.search_space).where(JOBS.c.id == job_id)).first()
        if row is None:
            return None
        info = JobInfo(int(row.id), row.name, row.owner, row.kind, row.created_at, row.spec, row.profile,
                       row.search_space)
        if info.kind != "compression" or info.profile is not None:  # final: cache it
            with self._lock:
                if len(self._d) >= self.limit:
                    self._d.clear()
                self._d[job_id] = info
        return info


# --------------------------------------------------------------------------- lease

_CLAIM_WHERE = """
  t.state = 'queued' AND t.kind IN :kinds
  AND (j.state IN ('profiling', 'running') OR (t.kind = 'export' AND j.state = 'completed'))
  AND (t.kind <> 'evaluate' OR j.kind = 'compression')
"""

_PG_LEASE = text(f"""
WITH c AS (
  SELECT t.id, t.job_id FROM trials t JOIN jobs j ON j.id = t.job_id
  WHERE {_CLAIM_WHERE}
  ORDER BY t.id LIMIT 1
  FOR UPDATE OF t SKIP LOCKED
), s AS (
  UPDATE jobs SET seq = jobs.seq + 1, updated_at = :now FROM c WHERE jobs.id = c.job_id
  RETURNING jobs.id, jobs.seq, jobs.state, jobs.reason, jobs.updated_at, jobs.n_created,
            CAST(jobs.spec -> 'budget' ->> 'lease_seconds' AS double precision) AS secs
), u AS (
  UPDATE trials SET state = 'running', seq = s.seq, worker = :worker, started_at = :now, lease_token = :token,
         lease_expires_at = CASE WHEN s.secs > 0 THEN :now + s.secs * interval '1 second' END
  FROM c, s WHERE trials.id = c.id AND trials.state = 'queued'
  RETURNING trials.*
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT u.job_id, u.id, 'leased', 'queued', 'running', :worker, :now FROM u
)
SELECT u.*, s.seq AS job_seq, s.state AS job_state, s.reason AS job_reason, s.updated_at AS job_updated_at,
       s.n_created AS job_n_created
FROM u, s
""").bindparams(bindparam("kinds", expanding=True, type_=String), bindparam("now", type_=UTCDateTime)).columns(
    *_TRIAL_COLS, job_seq=BigInteger, job_state=String, job_reason=String, job_updated_at=UTCDateTime,
    job_n_created=Integer)

_SQLITE_CLAIM = text(f"""
SELECT t.id, t.job_id FROM trials t JOIN jobs j ON j.id = t.job_id
WHERE {_CLAIM_WHERE}
ORDER BY t.id LIMIT 1
""").bindparams(bindparam("kinds", expanding=True, type_=String))


@dataclass
class _Dyn:
    job_seq: int
    job_state: str
    job_reason: str | None
    job_updated_at: datetime
    job_n_created: int


def lease(conn: Connection, dialect: str, cache: JobInfoCache, worker: str,
          kinds: list[str]) -> tuple[Row[Any], Any, JobInfo] | None:
    """Claim the oldest queued trial of an active job for ``worker``: (trial row, job row, info) or None.

    Runs inside the caller's transaction on ``conn``. None means nothing was queued.
    """
    if not kinds:
        return None
    now = utcnow()
    token = secrets.token_hex(16)
    if dialect == "postgresql":
        row = conn.execute(_PG_LEASE, {"kinds": list(kinds), "now": now, "worker": worker, "token": token}).first()
        if row is None:
            return None
        info = cache.get(conn, row.job_id)
        assert info is not None
        return row, row, info
    got = conn.execute(_SQLITE_CLAIM, {"kinds": list(kinds)}).first()
    if got is None:
        return None
    tid, job_id = int(got.id), int(got.job_id)
    info = cache.get(conn, job_id)
    assert info is not None
    j = conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(seq=JOBS.c.seq + 1, updated_at=now)
                     .returning(*[JOBS.c[k] for k in _JOB_DYN])).one()
    secs = info.lease_seconds
    row = conn.execute(
        update(TRIALS).where(TRIALS.c.id == tid, TRIALS.c.state == "queued")
        .values(state="running", seq=j.seq, worker=worker, started_at=now, lease_token=token,
                lease_expires_at=(now + timedelta(seconds=secs)) if secs > 0 else None)
        .returning(*_TRIAL_COLS)
    ).one()
    conn.execute(insert(EVENTS).values(job_id=job_id, trial_id=tid, kind="leased", from_state="queued",
                                       to_state="running", detail=worker, at=now))
    return row, _Dyn(int(j.seq), j.state, j.reason, j.updated_at, int(j.n_created)), info


# --------------------------------------------------------------------------- heartbeat

_PG_HEARTBEAT = text("""
UPDATE trials t SET lease_expires_at = :now + CAST(j.spec -> 'budget' ->> 'lease_seconds' AS double precision)
                                              * interval '1 second'
FROM jobs j
WHERE t.id = :id AND j.id = t.job_id AND t.state = 'running' AND j.state <> 'cancelled'
  AND t.lease_expires_at IS NOT NULL
  AND (CAST(:token AS varchar) IS NULL OR t.lease_token IS NULL OR t.lease_token = :token)
RETURNING t.lease_expires_at, t.attempt, t.lease_token, t.job_id
""").bindparams(bindparam("now", type_=UTCDateTime)).columns(
    TRIALS.c.lease_expires_at, TRIALS.c.attempt, TRIALS.c.lease_token, TRIALS.c.job_id)


def heartbeat(conn: Connection, dialect: str, cache: JobInfoCache, trial_id: int,
              token: str | None) -> tuple[Row[Any], JobInfo] | None:
    """Extend a running trial's lease: (its lease columns, its job), or None (lost, cancelled, unknown: ask the ORM)."""
    now = utcnow()
    if dialect == "postgresql":
        row = conn.execute(_PG_HEARTBEAT, {"id": trial_id, "now": now, "token": token}).first()
        if row is None:
            return None
        info = cache.get(conn, row.job_id)
        assert info is not None
    else:
        cur = conn.execute(select(TRIALS.c.job_id, TRIALS.c.state, TRIALS.c.lease_token, TRIALS.c.attempt,
                                  TRIALS.c.lease_expires_at).where(TRIALS.c.id == trial_id)).first()
        if (cur is None or cur.state != "running" or cur.lease_expires_at is None
                or (token is not None and cur.lease_token is not None and token != cur.lease_token)):
            return None
        info = cache.get(conn, cur.job_id)
        assert info is not None
        row = conn.execute(
            update(TRIALS).where(TRIALS.c.id == trial_id, TRIALS.c.state == "running",
                                 TRIALS.c.attempt == cur.attempt)
            .values(lease_expires_at=now + timedelta(seconds=info.lease_seconds))
            .returning(TRIALS.c.lease_expires_at, TRIALS.c.attempt, TRIALS.c.lease_token, TRIALS.c.job_id)
        ).first()
        if row is None:
            return None
    return row, info


# --------------------------------------------------------------------------- complete

_PG_FINISH = text("""
WITH s AS (
  UPDATE jobs SET seq = seq + 1, updated_at = :now WHERE id = :job_id
  RETURNING seq, state, n_created
), u AS (
  UPDATE trials SET state = 'completed', seq = s.seq, "values" = :values, sem = :sem, result_hash = :hash,
         finished_at = :now, lease_expires_at = NULL
  FROM s WHERE trials.id = :id AND trials.state = 'running' AND trials.attempt = :attempt
  RETURNING trials.id, trials.job_id
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT u.job_id, u.id, 'completed', 'running', 'completed', NULL, :now FROM u
)
SELECT s.seq, s.state, s.n_created FROM u, s
""").bindparams(bindparam("now", type_=UTCDateTime), bindparam("values", type_=TRIALS.c["values"].type),
                bindparam("sem", type_=TRIALS.c.sem.type)).columns(seq=BigInteger, state=String, n_created=Integer)

#: What a result needs of its trial: the checks, and the rest of the answer (``trial_out``).
_RESULT_COLS = [TRIALS.c[k] for k in ("id", "job_id", "seq", "number", "kind", "state", "params", "attempt",
                                      "worker", "lease_token", "created_at", "started_at", "error")]


def lock_for_result(conn: Connection, dialect: str, trial_id: int) -> Row[Any] | None:
    """The trial's row, locked until commit (``FOR UPDATE`` on PostgreSQL; SQLite's write lock)."""
    q = select(*_RESULT_COLS).where(TRIALS.c.id == trial_id)
    if dialect == "postgresql":
        q = q.with_for_update()
    return conn.execute(q).first()


@dataclass(frozen=True)
class Finished:
    """A stored result: the trial as it now is (for the answer) and its job's state and size."""

    trial: dict[str, Any]
    job_state: str
    job_n_created: int


def finish(conn: Connection, dialect: str, t: Row[Any], values: dict[str, Any], sem: dict[str, Any],
           result_hash: str) -> Finished | None:
    """Store a running trial's result (the caller holds its lock, from :func:`lock_for_result`)."""
    now = utcnow()
    if dialect == "postgresql":
        j = conn.execute(_PG_FINISH, {"now": now, "job_id": t.job_id, "id": t.id, "attempt": t.attempt,
                                      "values": values, "sem": sem, "hash": result_hash}).first()
        if j is None:
            return None
    else:
        j = conn.execute(update(JOBS).where(JOBS.c.id == t.job_id).values(seq=JOBS.c.seq + 1, updated_at=now)
                         .returning(JOBS.c.seq, JOBS.c.state, JOBS.c.n_created)).one()
        done = conn.execute(
            update(TRIALS).where(TRIALS.c.id == t.id, TRIALS.c.state == "running", TRIALS.c.attempt == t.attempt)
            .values(state="completed", seq=j.seq, values=values, sem=sem, result_hash=result_hash, finished_at=now,
                    lease_expires_at=None)
        )
        if done.rowcount != 1:
            return None
        conn.execute(insert(EVENTS).values(job_id=t.job_id, trial_id=t.id, kind="completed", from_state="running",
                                           to_state="completed", detail=None, at=now))
    trial = {**t._mapping, "state": "completed", "seq": int(j.seq), "values": values, "sem": sem, "finished_at": now}
    return Finished(trial, j.state, int(j.n_created))


def open_trials(conn: Connection, job_id: int) -> int:
    """How many of the job's evaluations are still queued or running."""
    return int(conn.execute(select(func.count()).select_from(TRIALS).where(
        TRIALS.c.job_id == job_id, TRIALS.c.kind == "evaluate", TRIALS.c.state.in_(("queued", "running")))
    ).scalar_one())


__all__ = ["Finished", "JobInfo", "JobInfoCache", "finish", "heartbeat", "lease", "lock_for_result", "open_trials"]
