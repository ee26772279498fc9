"""The worker hot path on PostgreSQL, on the event loop: psycopg's async pool, one statement each.

:mod:`bocompress.service.db.hot` explains the hot path; this is its PostgreSQL form. A request of the
worker loop (lease, heartbeat, result) no longer hops to a thread and back to reach the
database: it awaits its statement on the event loop, over a pooled connection in autocommit. A
thread hop, the GIL hand-offs around it and SQLAlchemy's statement machinery cost more CPU than
the statement itself; without them one service process answers about twice the requests.

Each statement is safe alone (it carries its own guards), so no transaction spans round trips,
and the job row that a ``seq`` bump locks is held only while that statement runs. Three pools:
*relaxed* (``synchronous_commit=off``) for leases and heartbeats, whose loss in a database crash
only re-queues a trial; *durable* for results; and a small one of its own for the dashboards'
trial polls, so that a poll never queues for a connection behind the workers' statements.

Anything unusual returns ``None`` and the caller answers through the ORM path in a thread,
exactly as before; connection failures and deadlocks are retried like :func:`run_conn` does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bocompress.states import OPEN_TRIAL_STATES, JobState, TrialState, sql_in
from bocompress.service.db.hot import CLAIM_WHERE, JOB_INFO_COLS, RESULT_COLS, Finished, JobInfo, JobInfoCache
from bocompress.service.db.models import utcnow
from bocompress.service.db.session import StorageError
from bocompress.service.db.views import trial_page_sql

log = logging.getLogger("bocompress.db")
T = TypeVar("T")

_LEASE = f"""
WITH c AS (
  SELECT t.id, t.job_id FROM trials t JOIN jobs j ON j.id = t.job_id
  WHERE {CLAIM_WHERE.format(kind_in="t.kind = ANY(%(kinds)s)")}
  ORDER BY t.id LIMIT 1
  FOR UPDATE OF t SKIP LOCKED
), s AS (
  UPDATE jobs SET seq = jobs.seq + 1, updated_at = %(now)s FROM c WHERE jobs.id = c.job_id
  RETURNING jobs.id, jobs.seq, jobs.state, jobs.reason, jobs.updated_at, jobs.n_created,
            CAST(jobs.spec -> 'budget' ->> 'lease_seconds' AS double precision) AS secs
), u AS (
  UPDATE trials SET state = '{TrialState.RUNNING.value}', seq = s.seq, worker = %(worker)s, started_at = %(now)s,
         lease_token = %(token)s,
         lease_expires_at = CASE WHEN s.secs > 0 THEN %(now)s + s.secs * interval '1 second' END
  FROM c, s WHERE trials.id = c.id AND trials.state = '{TrialState.QUEUED.value}'
  RETURNING trials.*
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT u.job_id, u.id, 'leased', '{TrialState.QUEUED.value}', '{TrialState.RUNNING.value}', %(worker)s, %(now)s FROM u
)
SELECT u.*, s.seq AS job_seq, s.state AS job_state, s.reason AS job_reason, s.updated_at AS job_updated_at,
       s.n_created AS job_n_created
FROM u, s
"""

_HEARTBEAT = f"""
UPDATE trials t SET lease_expires_at = %(now)s + CAST(j.spec -> 'budget' ->> 'lease_seconds' AS double precision)
                                                 * interval '1 second'
FROM jobs j
WHERE t.id = %(id)s AND j.id = t.job_id AND t.state = '{TrialState.RUNNING.value}' AND j.state <> '{JobState.CANCELLED.value}'
  AND t.lease_expires_at IS NOT NULL
  AND t.lease_token = %(token)s AND j.kind = 'compression'
RETURNING t.lease_expires_at, t.attempt, t.lease_token, t.job_id
"""

_RESULT_ROW = f"SELECT {', '.join(RESULT_COLS)} FROM trials WHERE id = %(id)s"

_FINISH = f"""
WITH c AS (
  SELECT id, job_id FROM trials WHERE id = %(id)s AND state = '{TrialState.RUNNING.value}' AND attempt = %(attempt)s FOR UPDATE
), s AS (
  UPDATE jobs SET seq = jobs.seq + 1, updated_at = %(now)s FROM c WHERE jobs.id = c.job_id
  RETURNING jobs.seq, jobs.state, jobs.n_created
), u AS (
  UPDATE trials SET state = '{TrialState.COMPLETED.value}', seq = s.seq, "values" = %(values)s, sem = %(sem)s,
         result_hash = %(hash)s, finished_at = %(now)s, lease_expires_at = NULL
  FROM c, s WHERE trials.id = c.id
  RETURNING trials.id, trials.job_id
), e AS (
  INSERT INTO events (job_id, trial_id, kind, from_state, to_state, detail, at)
  SELECT u.job_id, u.id, 'completed', '{TrialState.RUNNING.value}', '{TrialState.COMPLETED.value}', NULL, %(now)s FROM u
)
SELECT s.seq, s.state, s.n_created FROM u, s
"""

_OPEN_TRIALS = f"""
SELECT count(*) FROM trials WHERE job_id = %(job)s AND kind = 'evaluate' AND state IN {sql_in(OPEN_TRIAL_STATES)}
"""

_JOB_INFO = f"SELECT {', '.join(JOB_INFO_COLS)} FROM jobs WHERE id = %(id)s"

_JOB_SEQ = "SELECT owner, seq FROM jobs WHERE id = %(id)s"


def _compiled(stmt: Any) -> tuple[str, dict[str, Any]]:
    """A SQLAlchemy statement as psycopg SQL and its fixed parameters."""
    from sqlalchemy.dialects.postgresql.psycopg import dialect

    c = stmt.compile(dialect=dialect())
    return str(c), dict(c.params)


_TRIAL_PAGE, _TRIAL_PAGE_PARAMS = _compiled(trial_page_sql())

#: Errors after which the statement is retried on a fresh connection: the connection broke (a
#: database restart), or PostgreSQL chose it as a deadlock or serialization victim (both
#: ``OperationalError`` subclasses in psycopg).
_TRANSIENT = (psycopg.OperationalError,)
#: Seconds a statement waits for a pooled connection before the request gets a 503.
POOL_TIMEOUT = 10.0


def conninfo(url: str) -> str:
    """A libpq connection string from a SQLAlchemy URL (``postgresql+psycopg://`` or plain)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


class PgHot:
    """The hot statements over three async pools (see the module docstring).

    The pools belong to the event loop that called :meth:`open` (the server's, in the app's
    lifespan): asyncio connections cannot move between loops. :meth:`here` is None on any other
    loop (a test client's per-call loop, say), and the caller takes the ORM path instead.

    Args:
        url: the database URL.
        jobs: the per-process :class:`JobInfoCache` (shared with the sync paths).
        size: connections per worker-loop pool at most (a statement holds one for a round trip only).
        read_size: connections of the polls' pool at most.
    """

    def __init__(self, url: str, jobs: JobInfoCache, size: int = 8, read_size: int = 2) -> None:
        self.jobs = jobs
        self.conninfo = conninfo(url)
        self.size, self.read_size = size, read_size
        self._pools: dict[asyncio.AbstractEventLoop, tuple[AsyncConnectionPool, ...]] = {}

    async def open(self) -> None:
        """Start this loop's pools (without waiting: a database still starting is retried per statement)."""
        common = {"autocommit": True, "row_factory": namedtuple_row, "prepare_threshold": 2}
        relaxed = AsyncConnectionPool(self.conninfo, min_size=1, max_size=self.size, open=False, name="hot-relaxed",
                                      timeout=POOL_TIMEOUT,
                                      kwargs={**common, "options": "-c timezone=UTC -c synchronous_commit=off"})
        durable = AsyncConnectionPool(self.conninfo, min_size=1, max_size=self.size, open=False, name="hot-durable",
                                      timeout=POOL_TIMEOUT, kwargs={**common, "options": "-c timezone=UTC"})
        reads = AsyncConnectionPool(self.conninfo, min_size=1, max_size=self.read_size, open=False, name="polls",
                                    timeout=POOL_TIMEOUT, kwargs={**common, "options": "-c timezone=UTC"})
        for pool in (relaxed, durable, reads):
            await pool.open(wait=False)
        self._pools[asyncio.get_running_loop()] = (relaxed, durable, reads)

    async def close(self) -> None:
        pools = self._pools.pop(asyncio.get_running_loop(), ())
        for pool in pools:
            await pool.close()

    def here(self) -> "_Bound | None":
        """The hot path bound to the running loop's pools, or None where this loop has none."""
        try:
            pools = self._pools.get(asyncio.get_running_loop())
        except RuntimeError:
            return None
        return None if pools is None else _Bound(self.jobs, *pools)


class _Bound:
    """:class:`PgHot`'s statements on one loop's pools."""

    def __init__(self, jobs: JobInfoCache, relaxed: AsyncConnectionPool, durable: AsyncConnectionPool,
                 reads: AsyncConnectionPool) -> None:
        self.jobs, self.relaxed, self.durable, self.reads = jobs, relaxed, durable, reads

    async def _run(self, pool: AsyncConnectionPool, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]],
                   attempts: int = 8) -> T:
        for i in range(attempts):
            try:
                async with pool.connection() as conn:
                    return await fn(conn)
            except PoolTimeout as exc:  # no connection for POOL_TIMEOUT s: the database is down or swamped
                raise StorageError(f"no database connection within {POOL_TIMEOUT:.0f} s") from exc
            except _TRANSIENT as exc:
                if i == attempts - 1:
                    raise StorageError(f"database unavailable after {attempts} attempts: {exc}") from exc
                log.debug("transient database error, retrying", extra={"attempt": i + 1, "error": str(exc)})
                if exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P")):
                    # the connection broke (the database restarted?): so may every idle one have
                    await pool.check()
                await asyncio.sleep(min(0.5, 0.01 * 2**i) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def _one(self, pool: AsyncConnectionPool, sql: str, params: dict[str, Any]) -> Any:
        async def go(conn: psycopg.AsyncConnection) -> Any:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

        return await self._run(pool, go)

    async def job(self, job_id: int) -> JobInfo | None:
        """The job's :class:`JobInfo`, from the cache or the database."""
        info = self.jobs.cached(job_id)
        if info is not None:
            return info
        row = await self._one(self.durable, _JOB_INFO, {"id": job_id})
        return None if row is None else self.jobs.store(row)

    async def lease(self, worker: str, kinds: list[str]) -> tuple[Any, Any, JobInfo] | None:
        """:func:`bocompress.service.db.hot.lease`: (trial row, the job's changed columns, JobInfo) or None."""
        if not kinds:
            return None
        row = await self._one(self.relaxed, _LEASE, {"kinds": list(kinds), "now": utcnow(), "worker": worker,
                                                     "token": secrets.token_hex(16)})
        if row is None:
            return None
        info = await self.job(row.job_id)
        assert info is not None
        return row, row, info

    async def heartbeat(self, trial_id: int, token: str | None) -> tuple[Any, JobInfo] | None:
        """:func:`bocompress.service.db.hot.heartbeat`: (the lease columns, JobInfo) or None."""
        row = await self._one(self.relaxed, _HEARTBEAT, {"id": trial_id, "now": utcnow(), "token": token})
        if row is None:
            return None
        info = await self.job(row.job_id)
        assert info is not None
        return row, info

    async def result_row(self, trial_id: int) -> Any:
        """:func:`bocompress.service.db.hot.result_row` (unlocked: :meth:`finish` re-checks under its lock)."""
        return await self._one(self.durable, _RESULT_ROW, {"id": trial_id})

    async def finish(self, t: Any, values: dict[str, Any], sem: dict[str, Any], result_hash: str) -> Finished | None:
        """:func:`bocompress.service.db.hot.finish`, one durable statement."""
        now = utcnow()
        j = await self._one(self.durable, _FINISH, {"now": now, "id": t.id, "attempt": t.attempt,
                                                    "values": Json(values), "sem": Json(sem), "hash": result_hash})
        if j is None:
            return None
        trial = {**t._asdict(), "state": TrialState.COMPLETED.value, "seq": int(j.seq), "values": values, "sem": sem,
                 "finished_at": now}
        return Finished(trial, j.state, int(j.n_created))

    async def job_seq(self, job_id: int) -> Any:
        """The job's (owner, seq), or None."""
        return await self._one(self.reads, _JOB_SEQ, {"id": job_id})

    async def trial_page(self, job_id: int, since: int, n: int) -> list[Any]:
        """Up to ``n`` of the job's evaluations changed after ``since``, oldest change first: (seq, JSON text)."""
        async def go(conn: psycopg.AsyncConnection) -> list[Any]:
            cur = await conn.execute(_TRIAL_PAGE, {**_TRIAL_PAGE_PARAMS, "job": job_id, "since": since, "n": n})
            return await cur.fetchall()

        return await self._run(self.reads, go)

    async def open_trials(self, job_id: int) -> int:
        row = await self._one(self.durable, _OPEN_TRIALS, {"job": job_id})
        return int(row[0])


__all__ = ["PgHot", "conninfo"]
