"""Alembic is the only source of schema: upgrade head on an empty database equals the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from bocompress.service.app import create_app
from bocompress.service.config import Settings
from bocompress.service.db.migrate import SchemaOutdated, upgrade
from bocompress.service.db.models import Base
from bocompress.service.db.session import make_engine


def test_upgrade_head_matches_models(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff


def test_service_refuses_outdated_schema(database_url: str, backend: str) -> None:
    settings = Settings(database_url=database_url, auto_migrate=False)
    with pytest.raises(SchemaOutdated, match="bocompress migrate"):
        create_app(settings)
    # the SQLite default migrates itself on start
    if backend == "sqlite":
        create_app(Settings(database_url=database_url))
