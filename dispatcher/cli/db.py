"""``dispatcher db upgrade``: apply the migrations."""

from __future__ import annotations

import argparse

from dispatcher import db
from dispatcher.cli.common import Commands
from dispatcher.db import redact
from dispatcher.settings import Settings


def add_commands(commands: Commands) -> None:
    """Add ``db`` to the ``dispatcher`` parser's subcommands."""
    database = commands.add_parser(
        "db", help="database migrations", description="Manage the database schema."
    )
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser(
        "upgrade",
        help="apply every migration to DATABASE_URL",
        description=(
            "Apply every migration (Alembic) to DATABASE_URL, or to --database-url. Safe to "
            "repeat: a database already at the latest revision is left as it is."
        ),
    )
    upgrade.add_argument(
        "--database-url", metavar="URL", help="SQLAlchemy URL instead of DATABASE_URL"
    )
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace) -> int:
    """``dispatcher db upgrade``."""
    url = args.database_url or Settings.from_env().database_url
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        revision = db.current_revision(engine)
    finally:
        engine.dispose()
    print(f"{redact(url)} is at revision {revision}")
    return 0
