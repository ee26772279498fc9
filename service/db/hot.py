"""The hot path: lease, heartbeat and result, and a generic job's ask and tell, in a few statements, no ORM session.

Every worker cycle is three requests (lease -> heartbeat -> complete), so these three decide how
many trials per second one service process can hand out. The ORM functions of
:mod:`bocompress.service.db.trials` stay the reference behaviour; the hot path does the *common case* of
each with the same guarded updates, the same ``seq`` bump and the same event rows, and returns
``None`` whenever anything is unusual (a lost lease, a cancelled job, a profiling or export task,
a repeated result). The caller then runs the ORM path, which raises the exact 404/409 with its
message. So an unusual call costs one extra statement; a usual one costs:

- lease: one statement on PostgreSQL (a data-modifying CTE: claim with ``SKIP LOCKED``, bump the
  job's ``seq``, lease the trial, log the event), four in one ``BEGIN IMMEDIATE`` on SQLite;
- heartbeat: one ``UPDATE ... RETURNING`` on PostgreSQL, a read and an update on SQLite;
- complete: a read, then one statement on PostgreSQL (lock the trial, bump ``seq``, store the
  result, log the event), three on SQLite.

This module holds what both backends share (:class:`JobInfoCache`, the claim rule, the result's
columns) and the SQLite form, Core statements in the caller's transaction, run in the thread
pool. The PostgreSQL form is :mod:`bocompress.service.db.hot_pg`: async, on the event loop, autocommit.

What a job never changes after it runs (its spec and layer table) is cached per process in
:class:`JobInfo`, so no hot statement reads the job's JSON columns.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, func, insert, select, text, update
from sqlalchemy.engine import Connection, Row

from bocompress.spec import JobSpec
from bocompress.states import ACTIVE_JOB_STATES, OPEN_TRIAL_STATES, JobState, TrialState, sql_in
from bocompress.service.db.models import Event, Job, Trial, utcnow
from bocompress.service.db.queries import BUSY, EXPIRED_LEASE, best_query, cheap_jobs

TRIALS = Trial.__table__
JOBS = Job.__table__
EVENTS = Event.__table__
_TRIAL_COLS = [c for c in TRIALS.c]
#: The job's changing columns, returned by the ``seq`` bump (the rest of a job is in JobInfo).
_JOB_DYN = ("seq", "state", "reason", "updated_at", "n_created")

# The hot statements are built once, with bind parameters: executing a prebuilt statement skips
# SQLAlchemy's construction and cache-key work, which cost more than SQLite's own execution here
# (measured: 2.2 ms -> 0.9 ms of CPU per ask + tell pair).
_EVENT = insert(EVENTS).values(job_id=bindparam("job"), trial_id=bindparam("tid"), kind=bindparam("kind"),
                               from_state=bindparam("src"), to_state=bindparam("dst"), detail=bindparam("detail"),
                               at=bindparam("now"))


def _event(conn: Connection, job_id: int, trial_id: int, kind: str, src: str | None, dst: str, detail: str | None,
           now: datetime) -> None:
    conn.execute(_EVENT, {"job": job_id, "tid": trial_id, "kind": kind, "src": src, "dst": dst, "detail": detail,
                          "now": now})


#: The job columns a :class:`JobInfo` holds.
JOB_INFO_COLS = ("id", "name", "owner", "kind", "created_at", "spec", "profile", "search_space")


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
    #: The spec's typed view, built once.
    view: JobSpec
    #: The incumbent as this process last saw it, ``[(seen_seq, trial_id, value, params)]`` or empty
    #: (:func:`_best_params`): kept current from the trials changed since, never trusted blindly.
    best: list[tuple[int, int | None, float | None, dict[str, Any] | None]] = field(
        default_factory=list, compare=False, repr=False)

    @property
    def lease_seconds(self) -> float:
        return self.view.lease_seconds

    @property
    def max_trials(self) -> int:
        return self.view.max_trials


class JobInfoCache:
    """Per-process cache of :class:`JobInfo`; only jobs whose static part is final are kept."""

    def __init__(self, limit: int = 4096) -> None:
        self._d: dict[int, JobInfo] = {}
        self._lock = threading.Lock()
        self.limit = limit

    def cached(self, job_id: int) -> JobInfo | None:
        return self._d.get(job_id)

    def store(self, row: Any) -> JobInfo:
        """The :class:`JobInfo` of a row of :data:`JOB_INFO_COLS`, kept if final."""
        info = JobInfo(int(row.id), row.name, row.owner, row.kind, row.created_at, row.spec, row.profile,
                       row.search_space, JobSpec.of(row.spec))
        if info.kind != "compression" or info.profile is not None:  # final: cache it
            with self._lock:
                if len(self._d) >= self.limit:
                    self._d.clear()
                self._d[info.id] = info
        return info

    def get(self, conn: Connection, job_id: int) -> JobInfo | None:
        info = self._d.get(job_id)
        if info is not None:
            return info
        row = conn.execute(select(*[JOBS.c[k] for k in JOB_INFO_COLS]).where(JOBS.c.id == job_id)).first()
        return None if row is None else self.store(row)


# --------------------------------------------------------------------------- lease

#: Which queued trials a worker may claim (``{kind_in}``: the dialect's "t.kind is one of these").
CLAIM_WHERE = f"""
  t.state = '{TrialState.QUEUED.value}' AND {{kind_in}}
  AND (j.state IN {sql_in(ACTIVE_JOB_STATES)} OR (t.kind = 'export' AND j.state = '{JobState.COMPLETED.value}'))
  AND (t.kind <> 'evaluate' OR j.kind = 'compression')
"""

_CLAIM = text(f"""
SELECT t.id, t.job_id FROM trials t JOIN jobs j ON j.id = t.job_id
WHERE {CLAIM_WHERE.format(kind_in="t.kind IN :kinds")}
ORDER BY t.id LIMIT 1
""").bindparams(bindparam("kinds", expanding=True, type_=String))


@dataclass
class _Dyn:
    job_seq: int
    job_state: str
    job_reason: str | None
    job_updated_at: datetime
    job_n_created: int


def _dyn(j: Row[Any]) -> _Dyn:
    """A job's changing columns (a row of :data:`_JOB_DYN`)."""
    return _Dyn(int(j.seq), j.state, j.reason, j.updated_at, int(j.n_created))


_BUMP_DYN = (update(JOBS).where(JOBS.c.id == bindparam("job")).values(seq=JOBS.c.seq + 1, updated_at=bindparam("now"))
             .returning(*[JOBS.c[k] for k in _JOB_DYN]))
_LEASE = (update(TRIALS).where(TRIALS.c.id == bindparam("tid"), TRIALS.c.state == TrialState.QUEUED)
          .values(state=TrialState.RUNNING, seq=bindparam("seq"), worker=bindparam("worker"), started_at=bindparam("now"),
                  lease_token=bindparam("tok"), lease_expires_at=bindparam("until"))
          .returning(*_TRIAL_COLS))


def lease(conn: Connection, cache: JobInfoCache, worker: str, kinds: list[str]) -> tuple[Row[Any], Any, JobInfo] | None:
    """Claim the oldest queued trial of an active job for ``worker``: (trial row, job row, info) or None.

    Runs inside the caller's transaction on ``conn`` (``BEGIN IMMEDIATE``). None means nothing was queued.
    """
    if not kinds:
        return None
    now = utcnow()
    got = conn.execute(_CLAIM, {"kinds": list(kinds)}).first()
    if got is None:
        return None
    tid, job_id = int(got.id), int(got.job_id)
    info = cache.get(conn, job_id)
    assert info is not None
    j = conn.execute(_BUMP_DYN, {"job": job_id, "now": now}).one()
    secs = info.lease_seconds
    row = conn.execute(_LEASE, {"tid": tid, "seq": j.seq, "worker": worker, "now": now, "tok": secrets.token_hex(16),
                                "until": (now + timedelta(seconds=secs)) if secs > 0 else None}).one()
    _event(conn, job_id, tid, "leased", TrialState.QUEUED, TrialState.RUNNING, worker, now)
    return row, _dyn(j), info


# --------------------------------------------------------------------------- heartbeat


def heartbeat(conn: Connection, cache: JobInfoCache, trial_id: int, token: str | None) -> tuple[Row[Any], JobInfo] | None:
    """Extend a running trial's lease: (its lease columns, its job), or None (lost, cancelled, unknown: ask the ORM)."""
    cur = conn.execute(select(TRIALS.c.job_id, TRIALS.c.state, TRIALS.c.lease_token, TRIALS.c.attempt,
                              TRIALS.c.lease_expires_at).where(TRIALS.c.id == trial_id)).first()
    if (cur is None or cur.state != TrialState.RUNNING or cur.lease_expires_at is None
            or token is None or cur.lease_token is None or token != cur.lease_token):
        return None
    info = cache.get(conn, cur.job_id)
    assert info is not None
    row = conn.execute(
        update(TRIALS).where(TRIALS.c.id == trial_id, TRIALS.c.state == TrialState.RUNNING,
                             TRIALS.c.attempt == cur.attempt)
        .values(lease_expires_at=utcnow() + timedelta(seconds=info.lease_seconds))
        .returning(TRIALS.c.lease_expires_at, TRIALS.c.attempt, TRIALS.c.lease_token, TRIALS.c.job_id)
    ).first()
    return None if row is None else (row, info)


# --------------------------------------------------------------------------- complete

#: What a result needs of its trial: the checks, and the rest of the answer (``trial_out``).
RESULT_COLS = ("id", "job_id", "seq", "number", "kind", "state", "params", "attempt", "worker", "lease_token",
               "created_at", "started_at", "error", "proposal")


_TOLD = select(*[TRIALS.c[k] for k in RESULT_COLS]).where(TRIALS.c.id == bindparam("tid"))
_TOLD_PG = _TOLD.with_for_update()


def result_row(conn: Connection, trial_id: int) -> Row[Any] | None:
    """The trial as a result sees it before :func:`finish` (whose guards re-check state and attempt)."""
    return conn.execute(_TOLD, {"tid": trial_id}).first()


@dataclass(frozen=True)
class Finished:
    """A stored result: the trial as it now is (for the answer) and its job's state and size."""

    trial: dict[str, Any]
    job_state: str
    job_n_created: int

    def spends_budget(self, max_trials: int) -> bool:
        """Whether the job is running with its budget all created (it may be done once nothing is open)."""
        return self.job_state == JobState.RUNNING and self.job_n_created >= max_trials


_FINISH = (update(TRIALS).where(TRIALS.c.id == bindparam("tid"), TRIALS.c.state == TrialState.RUNNING,
                                TRIALS.c.attempt == bindparam("att"))
           .values(state=TrialState.COMPLETED, seq=bindparam("seq"), values=bindparam("vals"), sem=bindparam("sems"),
                   result_hash=bindparam("h"), finished_at=bindparam("now"), lease_expires_at=None))
def finish(conn: Connection, t: Row[Any], values: dict[str, Any], sem: dict[str, Any],
           result_hash: str) -> Finished | None:
    """Store the result of trial ``t`` (from :func:`result_row`) if it is still running the same attempt.

    None when it no longer is (a lost lease, a cancelled job, a result stored meanwhile); the
    caller rolls back and asks the ORM path for the exact answer.
    """
    now = utcnow()
    j = conn.execute(_BUMP_DYN, {"job": t.job_id, "now": now}).one()
    done = conn.execute(_FINISH, {"tid": t.id, "att": t.attempt, "seq": j.seq, "vals": values, "sems": sem,
                                  "h": result_hash, "now": now})
    if done.rowcount != 1:
        return None
    _event(conn, t.job_id, t.id, "completed", TrialState.RUNNING, TrialState.COMPLETED, None, now)
    trial = {**t._mapping, "state": TrialState.COMPLETED.value, "seq": int(j.seq), "values": values, "sem": sem, "finished_at": now}
    return Finished(trial, j.state, int(j.n_created))


# --------------------------------------------------------------------------- ask / tell (generic jobs)


class Unusual(Exception):
    """The ask/tell hot path met something unusual: roll back; the ORM path answers it exactly."""


_PICK = (select(TRIALS.c.id).where(TRIALS.c.job_id == bindparam("job"), TRIALS.c.state == TrialState.QUEUED,
                                   TRIALS.c.kind == "evaluate").order_by(TRIALS.c.id).limit(1))
#: On PostgreSQL the pick locks its row first (the lock order of every transition: the trial, then its job).
_PICK_PG = _PICK.with_for_update(skip_locked=True)
_BUMP_RUNNING = (update(JOBS).where(JOBS.c.id == bindparam("job"), JOBS.c.state == JobState.RUNNING)
                 .values(seq=JOBS.c.seq + 1, updated_at=bindparam("now")).returning(JOBS.c.seq))
_JOB_NOW = select(JOBS.c.state, JOBS.c.n_created).where(JOBS.c.id == bindparam("job"))
#: A cheap point is proposed (-> queued) and asked (-> running) in one step: two seq bumps, as the two transitions make.
_CREATE_ONE = (update(JOBS).where(JOBS.c.id == bindparam("job"), JOBS.c.n_created == bindparam("at"),
                                  JOBS.c.state == JobState.RUNNING)
               .values(n_created=JOBS.c.n_created + 1, seq=JOBS.c.seq + 2, updated_at=bindparam("now"))
               .returning(*[JOBS.c[k] for k in _JOB_DYN]))
_INSERT_ASKED = (insert(TRIALS).values(
    job_id=bindparam("job"), kind="evaluate", number=bindparam("at"), seq=bindparam("seq"), state=TrialState.RUNNING,
    params=bindparam("params"), values={}, sem={}, attempt=1, created_at=bindparam("now"), proposal="cheap",
    worker=bindparam("worker"), started_at=bindparam("now"), lease_token=bindparam("tok"),
    lease_expires_at=bindparam("until"))
    .returning(*_TRIAL_COLS))
#: The evaluations of job ``:job`` changed after ``seq`` ``:seen`` (each change bumps the trial's ``seq``
#: under the job row's lock, so the committed ones come in ``seq`` order): an index range scan.
_CHANGED_SINCE = (select(TRIALS.c.id, TRIALS.c.seq, TRIALS.c.state, TRIALS.c["values"], TRIALS.c.params)
                  .where(TRIALS.c.job_id == bindparam("job"), TRIALS.c.kind == "evaluate",
                         TRIALS.c.seq > bindparam("seen")))
_LAST_SEQ = select(func.max(TRIALS.c.seq)).where(TRIALS.c.job_id == bindparam("job"))
#: More changes than this since the last look: rank the job's trials in SQL again instead.
_FOLD_LIMIT = 256


def _objective(info: JobInfo, row: Any) -> float | None:
    """The value :func:`~bocompress.service.db.queries.best_query` ranks ``row`` by (None: not ranked)."""
    if row.state != TrialState.COMPLETED:
        return None
    v = (row.values or {}).get(info.view.metric)
    return None if v is None else float(v)


def _best_params(conn: Connection, info: JobInfo) -> dict[str, float] | None:
    """The incumbent's parameters: the same trial as
    :func:`bocompress.service.db.queries.best_query` (best value, then lowest id).

    Ranking every completed trial on each cheap proposal grew with the job (it was most of the
    service's CPU at 64 askers on a 2,400-trial job), so the incumbent is kept on ``info`` with the
    last ``seq`` it accounts for; each call folds in only the trials changed since (one index range
    scan, usually a row or two). A change to the incumbent itself, or a long absence, ranks in SQL again.
    """
    maximize = info.view.maximize
    if info.best:
        seen, tid, val, params = info.best[0]
        rows = conn.execute(_CHANGED_SINCE, {"job": info.id, "seen": seen}).all()
        if len(rows) <= _FOLD_LIMIT:
            for r in rows:
                seen = max(seen, int(r.seq))
                v = _objective(info, r)
                if r.id == tid:
                    if v != val:
                        break  # the incumbent itself changed: rank again
                elif v is not None and (val is None or (v > val if maximize else v < val)
                                        or (v == val and tid is not None and r.id < tid)):
                    tid, val, params = int(r.id), v, dict(r.params)
            else:
                info.best[:] = [(seen, tid, val, params)]
                return params
    # Read the last seq first: a completion committed between the two reads is folded in again next time.
    seen = conn.execute(_LAST_SEQ, {"job": info.id}).scalar()
    row = conn.execute(best_query(info.view.metric, maximize, params_only=True), {"job": info.id}).first()
    best = (-1 if seen is None else int(seen), None if row is None else int(row.id),
            None if row is None else float(row.value), None if row is None else dict(row.params))
    info.best[:] = [best]
    return best[3]


def ask(conn: Connection, info: JobInfo, worker: str, cheap: Any, dialect: str, crowd: bool = False) -> Row[Any]:
    """Hand the asker the oldest queued trial of the running generic job ``info``; when none is
    queued and another consumer holds one of its trials (or ``crowd``: other asks of the job are
    waiting), a cheap proposal made here (see
    :meth:`bocompress.service.db.sql_store.OrmStore._add_cheap`), inserted straight as running.

    The trial row as it now is. :class:`Unusual` for anything else (the job not running, its
    budget created, a lone asker who waits for the engine, a race): the ORM path answers those.
    """
    now = utcnow()
    job = {"job": info.id}
    tid = conn.execute(_PICK_PG if dialect == "postgresql" else _PICK, job).scalar()
    tok = secrets.token_hex(16)
    if tid is not None:
        j = conn.execute(_BUMP_RUNNING, {**job, "now": now}).first()
        if j is None:
            raise Unusual
        # an asked trial is the asker's until told: no lease expiry
        row = conn.execute(_LEASE, {"tid": tid, "seq": j.seq, "worker": worker, "now": now, "tok": tok,
                                    "until": None}).first()
        if row is None:
            raise Unusual
        _event(conn, info.id, tid, "leased", TrialState.QUEUED, TrialState.RUNNING, worker, now)
        return row
    # An empty buffer: a cheap point, only for parallel demand (a lone asker's search stays BO).
    got = _cheap_running(conn, info, worker, cheap, now, None, crowd)
    if got is None:
        raise Unusual
    return got[0]


def _cheap_running(conn: Connection, info: JobInfo, worker: str, cheap: Any, now: datetime,
                   until: datetime | None, crowd: bool) -> tuple[Row[Any], Row[Any]] | None:
    """One cheap proposal for the running job ``info``, inserted straight as ``worker``'s running
    trial (lease until ``until``): (trial row, the job's changing columns), or None when the job
    takes none now (not running, its budget created, no parallel demand unless ``crowd``, a race).

    The same rule, point and event log as :meth:`bocompress.service.db.sql_store.OrmStore._add_cheap`
    followed by a claim: "proposed" then "leased", two ``seq`` bumps.
    """
    job = {"job": info.id}
    cur = conn.execute(_JOB_NOW, job).first()
    if (cheap is None or cur is None or cur.state != JobState.RUNNING or not info.search_space
            or info.view.budget_spent(int(cur.n_created))):
        return None
    if not crowd and conn.execute(BUSY, job).first() is None:
        return None
    at = int(cur.n_created)
    point = cheap(list(info.search_space), info.view.is_compression, _best_params(conn, info), at,
                  dict(info.spec.get("optimizer") or {}))
    if not point:
        return None
    j = conn.execute(_CREATE_ONE, {**job, "at": at, "now": now}).first()
    if j is None:
        return None  # another insert got in first
    row = conn.execute(_INSERT_ASKED, {**job, "at": at, "seq": int(j.seq), "params": point, "now": now,
                                       "worker": worker, "tok": secrets.token_hex(16), "until": until}).one()
    _event(conn, info.id, row.id, "proposed", None, TrialState.QUEUED, "cheap", now)
    _event(conn, info.id, row.id, "leased", TrialState.QUEUED, TrialState.RUNNING, worker, now)
    return row, j


def cheap_lease(conn: Connection, cache: JobInfoCache, worker: str, cheap: Any,
                grace_s: float, crowd: bool = False) -> tuple[Row[Any], Any, JobInfo] | None:
    """A worker found nothing queued: a cheap proposal of the compression job that waits longest
    (see :meth:`bocompress.service.db.sql_store.OrmStore._cheap_lease`), leased to ``worker``:
    (trial row, job row, info), or None. ``crowd``: other workers found nothing either a moment
    ago (:data:`~bocompress.service.db.queries.CHEAP_JOBS_CROWD`). :class:`Unusual` when a lease
    has expired (the ORM path reaps it first, and its trial goes out before any new point)."""
    now = utcnow()
    if conn.execute(EXPIRED_LEASE, {"now": now}).first() is not None:
        raise Unusual
    for job_id in conn.execute(*cheap_jobs(crowd, now, grace_s)).scalars().all():
        info = cache.get(conn, int(job_id))
        if info is None:
            continue
        secs = info.lease_seconds
        got = _cheap_running(conn, info, worker, cheap, now, (now + timedelta(seconds=secs)) if secs > 0 else None,
                             True)  # the query found parallel demand
        if got is not None:
            row, j = got
            return row, _dyn(j), info
    return None


def told_row(conn: Connection, trial_id: int, dialect: str) -> Row[Any] | None:
    """:func:`result_row` for a ``tell``; on PostgreSQL locked first (the trial, then its job)."""
    return conn.execute(_TOLD_PG if dialect == "postgresql" else _TOLD, {"tid": trial_id}).first()


def open_trials(conn: Connection, job_id: int) -> int:
    """How many of the job's evaluations are still queued or running."""
    return int(conn.execute(select(func.count()).select_from(TRIALS).where(
        TRIALS.c.job_id == job_id, TRIALS.c.kind == "evaluate", TRIALS.c.state.in_(OPEN_TRIAL_STATES))
    ).scalar_one())


__all__ = ["CLAIM_WHERE", "JOB_INFO_COLS", "RESULT_COLS", "Finished", "JobInfo", "JobInfoCache", "Unusual", "ask",
           "cheap_lease",
           "finish", "heartbeat", "lease", "open_trials", "result_row", "told_row"]
