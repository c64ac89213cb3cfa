"""Migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from dispatcher import db
from dispatcher.errors import SchemaNotReady
from dispatcher.models import Base
from tests.conftest import free_port

NOW = datetime(2026, 11, 10, tzinfo=UTC)


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


def test_0008_moves_a_campaign_s_invalid_and_suppressed_lists_to_rows_and_back(
    database_url: str,
) -> None:
    engine = db.make_engine(database_url)
    cfg = db.alembic_config(engine)
    invalid = [
        {
            "index": 3,
            "contact_id": "c3",
            "email": "x",
            "field": "recipients[3].email",
            "reason": "r",
        },
        {
            "index": 8,
            "contact_id": "c8",
            "email": "y@",
            "field": "recipients[8].email",
            "reason": "r",
        },
    ]
    suppressed = [{"contact_id": "c5", "email": "p5@example.org", "reason": "unsubscribe"}]
    try:
        command.downgrade(cfg, "0007")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, timezone, plan, grant_seq, created_at, updated_at) "
                    "VALUES ('agent-1', 'UTC', 'free', 0, :now, :now)"
                ),
                {"now": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO campaigns (id, user_id, provider, status, subject, html, "
                    "recipients, invalid, suppressed, chunks, created_at, updated_at) VALUES "
                    "('k-1', 'agent-1', 'command_email', 'completed', 's', 'h', 7, :invalid, "
                    ":suppressed, 1, :now, :now)"
                ),
                {"invalid": json.dumps(invalid), "suppressed": json.dumps(suppressed), "now": NOW},
            )
        db.upgrade(engine)
        with engine.connect() as conn:
            counts = conn.execute(
                text("SELECT invalid_count, suppressed_count FROM campaigns WHERE id = 'k-1'")
            ).one()
            rows = conn.execute(
                text(
                    "SELECT kind, seq, row, contact_id, field FROM campaign_exclusions "
                    "WHERE campaign_id = 'k-1' ORDER BY kind, seq"
                )
            ).all()
        assert tuple(counts) == (2, 1)
        assert [tuple(r) for r in rows] == [
            ("invalid", 0, 3, "c3", "recipients[3].email"),
            ("invalid", 1, 8, "c8", "recipients[8].email"),
            ("suppressed", 0, None, "c5", None),
        ]
        command.downgrade(cfg, "0007")
        with engine.connect() as conn:
            back = conn.execute(
                text("SELECT invalid, suppressed FROM campaigns WHERE id = 'k-1'")
            ).one()
        as_lists = [v if isinstance(v, list) else json.loads(v) for v in back]
        assert as_lists == [invalid, suppressed]
    finally:
        db.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM campaign_exclusions"))
            conn.execute(text("DELETE FROM campaigns"))
            conn.execute(text("DELETE FROM users"))
        engine.dispose()


def test_processes_wait_for_the_release_to_migrate_then_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an empty database, as web and the workers find it when honcho starts them beside
    # the release process
    engine = db.make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        with pytest.raises(SchemaNotReady) as info:
            db.wait_until_migrated(engine, timeout=0)
        assert info.value.current is None
        assert "dispatcher db upgrade" in str(info.value)

        # When the release migrates it while they wait
        def release_migrates(_seconds: float) -> None:
            polls.append(1)
            db.upgrade(engine, "0007" if len(polls) == 1 else "head")

        polls: list[int] = []
        with caplog.at_level(logging.INFO, logger="dispatcher.db"):
            revision = db.wait_until_migrated(engine, timeout=30, sleep=release_migrates)

        # Then they start once it is at the head, having said once why they waited
        assert revision == db.head_revision(engine) and len(polls) == 2
        waiting = [r for r in caplog.records if "waiting up to 30s" in r.getMessage()]
        assert len(waiting) == 1 and "not migrated" in waiting[0].getMessage()
        assert any("migrated to" in r.getMessage() for r in caplog.records)
    finally:
        engine.dispose()


def test_a_database_migrated_by_newer_code_does_not_stop_a_rollback(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'newer.db'}")
    try:
        db.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        assert db.wait_until_migrated(engine, timeout=0) == "0099"
    finally:
        engine.dispose()


def test_a_database_that_does_not_answer_is_met_as_an_outage_not_a_reason_to_exit() -> None:
    # Given a PostgreSQL URL where nothing listens
    engine = db.make_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    try:
        # Then, the wait over, the process starts without knowing the revision
        assert db.wait_until_migrated(engine, timeout=0) is None
    finally:
        engine.dispose()
