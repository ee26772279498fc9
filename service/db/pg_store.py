"""The PostgreSQL backend of :class:`~bocompress.service.db.store.Store`: the hot path on the event loop.

Lease, heartbeat, result and the trial poll await one statement each over psycopg's async pools
(:class:`~bocompress.service.db.hot_pg.PgHot`), in autocommit, with no thread hop; anything unusual (and
any call on a loop without pools, such as a test client's) goes to the ORM reference of
:class:`~bocompress.service.db.sql_store.OrmStore` in the thread pool, which answers it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from bocompress.service.db import hot
from bocompress.service.db.errors import NotFound
from bocompress.service.db.hot_pg import PgHot
from bocompress.service.db.sql_store import HotAskTell, OrmStore, hot_result_ok, hot_values, lease_answer, lease_info
from bocompress.service.db.store import Result, TrialPage, Viewer
from bocompress.service.db.views import job_light, trial_page_sql


class PostgresStore(HotAskTell, OrmStore):
    """PostgreSQL (see the module docstring)."""

    def __init__(self, engine: Engine, factory: sessionmaker[Session], database_url: str) -> None:
        super().__init__(engine, factory)
        self.pg = PgHot(database_url, self.jobs)

    async def open(self) -> None:
        await self.pg.open()

    async def close(self) -> None:
        await self.pg.close()

    async def _lease_once(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        pg = self.pg.here()
        if pg is None:
            return await super()._lease_once(worker, kinds)
        got = await pg.lease(worker, kinds)
        if got is None:
            return None
        row, dyn, info = got
        # Built after the commit: the job row, locked by the lease's seq bump, is not held while
        # Python encodes the answer.
        return row, lease_answer(row, job_light(info, dyn), info.lease_seconds)

    async def _heartbeat_hot(self, trial_id: int, token: str | None) -> dict[str, Any] | None:
        pg = self.pg.here()
        if pg is None:
            return None
        got = await pg.heartbeat(trial_id, token)
        if got is None:
            return None
        row, info = got
        return {"lease": lease_info(row.lease_token, row.lease_expires_at, info.lease_seconds, row.attempt)}

    async def _complete_hot(self, trial_id: int, token: str | None, result: Result) -> tuple[hot.Finished, bool] | None:
        pg = self.pg.here()
        if pg is None:
            return None
        t = await pg.result_row(trial_id)
        if not hot_result_ok(t, token):
            return None
        info = await pg.job(t.job_id)
        if info is None or info.kind != "compression":
            return None  # an ask/tell trial: the ORM path refuses it
        done = await pg.finish(t, *hot_values(info, t, result))
        if done is None:
            return None
        return done, done.spends_budget(info.max_trials) and await pg.open_trials(t.job_id) == 0

    # The poll's items are JSON built by the database (trial_page_sql): no decoding and re-encoding.
    def _page_rows(self, s: Session, job_id: int, since: int, n: int) -> list[Any]:
        return list(s.connection().execute(trial_page_sql(), {"job": job_id, "since": since, "n": n}).all())

    @staticmethod
    def _page_json(rows: Sequence[Any], limit: int) -> str:
        return "[" + ",".join(r[1] for r in rows[:limit]) + "]"

    async def trial_page(self, job_id: int, viewer: Viewer, since: int, limit: int) -> TrialPage:
        pg = self.pg.here()
        if pg is None:
            return await super().trial_page(job_id, viewer, since, limit)
        # The job's seq is read first: every change up to it has committed, so the page misses none.
        job = await pg.job_seq(job_id)
        if job is None or not viewer.may_see(job.owner):
            raise NotFound("job", job_id)
        rows = await pg.trial_page(job_id, since, limit + 1)
        return TrialPage(int(job.seq), self._page_json(rows, limit),
                         int(rows[limit - 1].seq) if len(rows) > limit else None)


__all__ = ["PostgresStore"]
