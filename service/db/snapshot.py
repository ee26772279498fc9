"""The dashboard's bulk reads: a job's whole trial history in columns, and its rows for the CSV.

:class:`SnapshotMixin` implements these parts of :class:`~bocompress.service.db.store.Store` for the SQL
backends (``_read`` and ``dialect`` of :class:`~bocompress.service.db.sql_store.OrmStore`).
"""

from __future__ import annotations

import json
from collections import namedtuple
from typing import Any

from sqlalchemy import BigInteger, Text, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from bocompress.service.db.models import Trial
from bocompress.service.db.queries import best_trial, visible_job
from bocompress.service.db.store import TrialTable
from bocompress.service.db.views import iso, job_out, job_warnings, trial_out

SCALAR_COLUMNS = ("id", "seq", "number", "state", "attempt", "worker", "error")
TIME_COLUMNS = ("created_at", "started_at", "finished_at")
JSON_COLUMNS = ("params", "values", "sem")
#: The trial columns of the CSV export, in :class:`~bocompress.service.db.store.TrialTable` rows.
TABLE_COLUMNS = ("id", "number", "seq", "state", "params", "values", "sem", "attempt", "worker", "created_at",
                 "started_at", "finished_at", "error")
#: One row of a :class:`~bocompress.service.db.store.TrialTable` (its times as ISO 8601 text, or None).
TableRow = namedtuple("TableRow", TABLE_COLUMNS)  # type: ignore[misc]


def epoch_ms(column: Any, dialect: str) -> ColumnElement[Any]:
    """A UTC timestamp column as integer milliseconds since 1970, computed by the database.

    Cheaper than building 30,000 datetime objects in Python for a 10,000-trial job, and
    shorter on the wire than ISO strings.
    """
    if dialect == "sqlite":   # stored as naive UTC text; julianday() parses it
        ms = (func.julianday(column) - 2440587.5) * 86400000.0
    else:
        ms = func.extract("epoch", column) * 1000.0
    return cast(func.round(ms), BigInteger)


def snapshot_json(s: Session, job_id: int, viewer: Any, dialect: str, with_trials: bool) -> str:
    """See :meth:`SnapshotMixin.job_snapshot`."""
    job = visible_job(s, job_id, viewer)
    meta = job_out(s, job, with_best=False)
    # the service's warnings about the best trial (a collapsed model must never look like a result)
    best = best_trial(s, job) if job.kind == "compression" else None
    meta["warnings"], meta["collapsed"] = job_warnings(job.kind, job.spec or {}, job.profile or {},
                                                       trial_out(best) if best else None)
    head = '{"job":' + json.dumps(meta, separators=(",", ":")) + ',"seq":' + str(int(job.seq))
    if not with_trials:
        return head + "}"
    cols: list[Any] = [getattr(Trial, c) for c in SCALAR_COLUMNS]
    cols += [epoch_ms(getattr(Trial, c), dialect) for c in TIME_COLUMNS]
    cols += [cast(getattr(Trial, c), Text) for c in JSON_COLUMNS]
    q = select(*cols).where(Trial.job_id == job_id, Trial.kind == "evaluate").order_by(Trial.seq)
    rows = s.execute(q).all()
    by_col = list(zip(*rows)) if rows else [()] * len(cols)
    parts = [head, ',"trials":{"n":', str(len(rows))]
    for i, name in enumerate(SCALAR_COLUMNS + TIME_COLUMNS):
        parts += [f',"{name}":', json.dumps(list(by_col[i]), separators=(",", ":"))]
    for i, name in enumerate(JSON_COLUMNS, start=len(SCALAR_COLUMNS) + len(TIME_COLUMNS)):
        # Stored JSON text, as written by the service's own serializer: spliced in as is.
        parts += [f',"{name}":[', ",".join(v if v else "null" for v in by_col[i]), "]"]
    parts.append("}}")
    return "".join(parts)


def trial_table(s: Session, job_id: int, viewer: Any) -> TrialTable:
    """See :meth:`SnapshotMixin.trial_table`."""
    job = visible_job(s, job_id, viewer)
    rows = s.execute(select(*[getattr(Trial, c) for c in TABLE_COLUMNS])
                     .where(Trial.job_id == job_id, Trial.kind == "evaluate").order_by(Trial.number)).all()
    names = [str(sp["name"]) for sp in job.search_space or []]
    return TrialTable(job.name, names, [TableRow(*r[:9], iso(r[9]), iso(r[10]), iso(r[11]), r[12]) for r in rows])


class SnapshotMixin:
    """The dashboard's reads of :class:`~bocompress.service.db.sql_store.OrmStore`."""

    async def job_snapshot(self, job_id: int, viewer: Any, with_trials: bool = True) -> str:
        """The job and (``with_trials``) its whole trial history in columns, as JSON text.

        The same visibility as :meth:`~bocompress.service.db.store.Store.get_job` (NotFound for another
        owner's job), but lean: the job comes without ``best``; the trials' JSON columns are spliced
        in as stored, not decoded and re-encoded; times are epoch milliseconds. ``seq`` is the
        job's change counter, read with the trials in one snapshot.

        Returns:
            ``{"job": {...}, "seq": n, "trials": {"n": k, "id": [k], "seq": [k], ..., "params": [k]}}``:
            one list of length k per trial field, in ``seq`` order; ``created_at``, ``started_at``
            and ``finished_at`` in ms since the epoch (or null). No ``trials`` without ``with_trials``.
        """
        return await self._read(  # type: ignore[attr-defined, no-any-return]
            lambda s: snapshot_json(s, job_id, viewer, self.dialect, with_trials))  # type: ignore[attr-defined]

    async def trial_table(self, job_id: int, viewer: Any) -> TrialTable:
        """The job's name, its parameter names and every evaluation's row (by number), for a CSV."""
        return await self._read(lambda s: trial_table(s, job_id, viewer))  # type: ignore[attr-defined, no-any-return]


__all__ = ["JSON_COLUMNS", "SCALAR_COLUMNS", "TABLE_COLUMNS", "TIME_COLUMNS", "SnapshotMixin", "TableRow", "epoch_ms",
           "snapshot_json", "trial_table"]
