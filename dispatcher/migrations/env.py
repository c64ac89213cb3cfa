"""Alembic environment: runs against the engine handed over by dispatcher.db."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from dispatcher.models import Base

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("run migrations with `dispatcher db upgrade` (dispatcher.db.upgrade)")

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
