"""Alembic environment: the only place tables are created or changed."""

from __future__ import annotations

from alembic import context

from bocompress.service.db.models import Base
from bocompress.service.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch migrations rebuild a table (copy, drop, rename): with foreign keys on, dropping
                # ``jobs`` would cascade to every trial. Off for this connection, outside any transaction.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
