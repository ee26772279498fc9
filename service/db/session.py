"""Engines and sessions: SQLite in WAL mode with a busy timeout, PostgreSQL through psycopg 3."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("bocompress.db")
T = TypeVar("T")


class StorageError(Exception):
    """The one error the storage layer raises for a failure that is not the caller's fault."""


def normalize_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs given without a driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


_PG_POOL: dict = {"pool_size": 10, "max_overflow": 30, "pool_timeout": 60}


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite, every transaction takes the write lock up front.

    SQLite's deferred transactions fail with "database is locked" when two readers try to
    upgrade at once (the busy handler is not called then); ``BEGIN IMMEDIATE`` queues writers
    behind the busy timeout instead.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=8,
                               max_overflow=16, pool_timeout=60)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            # Readers take a deferred transaction (WAL: they never block writers nor each other).
            if conn.get_execution_options().get("bocompress_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        # One writer at a time in this process, queued on a lock rather than on SQLite's busy
        # handler, whose sleeping and retrying threads compete with the lock's holder for the
        # GIL it needs to finish. Other processes on the same file still queue on the busy timeout.
        engine._bocompress_writer = threading.Lock()  # type: ignore[attr-defined]
        return engine
    return create_engine(url, pool_pre_ping=True, **_PG_POOL)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True  # the server closed the connection (a restart): the pool reconnects on retry
    if isinstance(exc, OperationalError):
        msg = str(exc).lower()
        if "locked" in msg or "busy" in msg:
            return True
    if isinstance(exc, DBAPIError):
        code = getattr(getattr(exc, "orig", None), "sqlstate", None)
        if code in ("40001", "40P01"):  # serialization failure, deadlock detected
            return True
    return False


def _retrying(begin: Callable[[], contextlib.AbstractContextManager[object]], fn: Callable[[object], T],
              attempts: int, engine: Engine | None) -> T:
    writer = getattr(engine, "_bocompress_writer", None) or contextlib.nullcontext()
    for i in range(attempts):
        try:
            with writer, begin() as handle:
                return fn(handle)
        except (OperationalError, DBAPIError) as exc:
            if not _is_transient(exc) or i == attempts - 1:
                if _is_transient(exc):
                    raise StorageError(f"database busy after {attempts} attempts: {exc.orig}") from exc
                raise
            log.debug("transient database error, retrying", extra={"attempt": i + 1, "error": str(exc.orig)})
            time.sleep(min(0.5, 0.01 * 2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def run_tx(factory: sessionmaker[Session], fn: Callable[[Session], T], attempts: int = 8) -> T:
    """Run ``fn(session)`` in one transaction, retrying transient lock/deadlock errors.

    The caller never sees "database is locked": a transient failure is rolled back and retried
    with jittered backoff; only a persistent one surfaces, as :class:`StorageError`.
    """

    @contextlib.contextmanager
    def begin() -> Iterator[Session]:
        with factory() as session, session.begin():
            yield session

    return _retrying(begin, fn, attempts, factory.kw.get("bind"))  # type: ignore[arg-type]


def run_conn(engine: Engine, fn: Callable[[Connection], T], attempts: int = 8) -> T:
    """:func:`run_tx` for Core work on a bare connection (the worker hot path: no ORM session)."""
    return _retrying(engine.begin, fn, attempts, engine)  # type: ignore[arg-type]


@contextlib.contextmanager
def read_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A read-only transaction; on SQLite a deferred one, so a slow read never blocks writers."""
    bind = factory.kw.get("bind")
    ro = getattr(factory, "_bocompress_ro", None)
    if ro is None and bind is not None:
        # One snapshot for the whole read (PostgreSQL's READ COMMITTED would let a job's state and
        # its trial counts come from different moments); SQLite's deferred WAL read is one already.
        opts: dict = {"bocompress_readonly": True}
        if bind.dialect.name == "postgresql":
            opts["isolation_level"] = "REPEATABLE READ"
        ro = bind.execution_options(**opts)
        factory._bocompress_ro = ro  # type: ignore[attr-defined]
    session = factory(bind=ro) if ro is not None else factory()
    try:
        with session.begin():
            yield session
    finally:
        session.close()
