"""Database engine, sessions and migrations (SQLite file by default, PostgreSQL in production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(
    url: str,
    *,
    statement_timeout: float = 0.0,
    lock_timeout: float = 0.0,
    **kwargs: Any,
) -> Engine:
    """Build an engine; SQLite gets WAL and a busy timeout so API and workers can share it.
    On PostgreSQL, ``statement_timeout`` and ``lock_timeout`` (seconds, 0 for none) bound every
    statement and every lock wait of every connection."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver's own transaction handling is switched off so that every transaction
            # starts with BEGIN IMMEDIATE (below): a deferred transaction that reads and then
            # writes fails at once with "database is locked" when another process wrote in
            # between, whatever the busy timeout.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgresql+psycopg://") and "connect_timeout=" not in url:
        # A server that stopped answering must not hold a worker (or a lease renewal) for
        # the kernel's minutes-long TCP timeout (a connect_timeout in the URL wins).
        kwargs["connect_args"] = {"connect_timeout": 10, **kwargs.get("connect_args", {})}
    if url.startswith("postgresql+psycopg://"):
        options = [
            f"-c {name}={int(seconds * 1000)}"
            for name, seconds in (
                ("statement_timeout", statement_timeout),
                ("lock_timeout", lock_timeout),
            )
            if seconds > 0
        ]
        if options:
            args = kwargs.get("connect_args", {})
            kwargs["connect_args"] = {**args, "options": " ".join(options)}
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
