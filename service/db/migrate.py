"""Alembic, driven from code: ``bocompress migrate`` and the start-up schema check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from service.db.session import make_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> str:
    """Upgrade the schema to ``revision``; returns the revision reached."""
    command.upgrade(alembic_config(database_url), revision)
    return head_revision()


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
