"""Alembic, driven from code: ``bocompress migrate`` and the start-up schema check."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from bocompress.service.db.session import make_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> str:
    """Upgrade the schema to ``revision``; returns the revision reached."""
    command.upgrade(alembic_config(database_url), revision)
    engine = make_engine(database_url)
    try:
        check_writable(engine)
    finally:
        engine.dispose()
    return head_revision()


def check_writable(engine: Engine) -> None:
    """SQLite: fail now, not at the first request, when the file cannot be written (a read-only
    file or directory, a read-only open mode). Rewrites the header's ``user_version`` unchanged."""
    if engine.dialect.name != "sqlite":
        return
    with engine.begin() as conn:
        v = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
        conn.exec_driver_sql(f"PRAGMA user_version = {v}")


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class SchemaOutdated(RuntimeError):
    pass


def check_schema(engine: Engine, database_url: str) -> None:
    """Refuse to serve on a schema that is not at head, saying what to run."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise SchemaOutdated(
            f"database schema is at {current or 'nothing (empty database)'}, this service needs {head}: "
            f"run `bocompress migrate --database-url {database_url}` first"
        )


def ensure_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        if current_revision(engine) != head_revision():
            upgrade(database_url)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- start-up errors


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (also for a URL SQLAlchemy cannot parse)."""
    import re

    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: mask what looks like user:password@
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001
        return None
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:":
        return None
    db = u.database
    if db.startswith("file:"):  # a SQLite URI filename (uri=true): file:path?mode=ro
        db = db[5:].split("?", 1)[0]
    return Path(db)


def explain_startup_error(exc: BaseException, database_url: str) -> str | None:
    """One line saying what is wrong with the database and what to do, or None when ``exc`` is
    not a database start-up problem (then it is a bug, and its traceback is worth having).

    Covers what an operator gets wrong: a URL no driver takes, a SQLite file in a missing
    directory or without write access, a PostgreSQL server that refuses the connection or lacks
    the database, a wrong password. The URL is shown with its password masked.
    """
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    shown = masked_url(database_url)
    if isinstance(exc, (ArgumentError, NoSuchModuleError)):
        return (f"database URL {shown!r} is not one this service can use ({str(exc).splitlines()[0][:120]}): "
                "give sqlite:///path/to/file.db or postgresql+psycopg://user:password@host:5432/dbname")
    if not isinstance(exc, (DBAPIError, OSError)):
        return None
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = cause[0][:200] if cause else type(exc).__name__
    path = _sqlite_path(database_url)
    if path is not None:
        parent = path.resolve().parent
        if not parent.is_dir():
            return (f"cannot open the SQLite database {str(path)!r}: the directory {str(parent)!r} does not exist; "
                    f"create it (mkdir -p {parent}) or give another --database-url")
        low = first.lower()
        if "readonly" in low or "read-only" in low or "permission" in low or (
                path.exists() and not os.access(path, os.W_OK)) or not os.access(parent, os.W_OK):
            return (f"cannot write the SQLite database {str(path)!r} ({first}): the service needs write access to "
                    f"the file and to its directory {str(parent)!r} (SQLite writes -wal and -shm files beside it); "
                    "fix the permissions or give another --database-url")
        return f"cannot open the SQLite database {str(path)!r}: {first}; check the path and its permissions"
    text = " ".join(cause).lower()
    if "does not exist" in text and "database" in text:
        from sqlalchemy.engine import make_url

        db = make_url(database_url).database
        return (f"PostgreSQL at {shown} has no database {db!r}: create it (createdb {db}, or CREATE DATABASE "
                f"\"{db}\"), then run `bocompress migrate --database-url ...`")
    if "password authentication failed" in text or "authentication" in text:
        return f"PostgreSQL at {shown} refused the credentials ({first}): check the user and password in the URL"
    if "refused" in text or "could not connect" in text or "timeout" in text or "timed out" in text \
            or "name or service not known" in text or "could not translate host name" in text:
        return (f"cannot connect to PostgreSQL at {shown} ({first}): is the server running and reachable, and "
                "are the host and port in the URL right?")
    return f"cannot use the database at {shown}: {first}"
