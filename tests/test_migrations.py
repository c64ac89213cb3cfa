"""Migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dispatcher import db
from dispatcher.models import Base


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        assert db.current_revision(engine) is not None
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        db.upgrade(engine)  # idempotent
    finally:
        engine.dispose()
