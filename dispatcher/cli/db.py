"""``dispatcher db upgrade``: apply the migrations."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType

from dispatcher import db
from dispatcher.cli.common import Commands
from dispatcher.cli.stack import command_settings
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
            "Apply every migration (Alembic) to --database-url, else DATABASE_URL, else (neither "
            "DATABASE_URL nor REDIS_URL set, and not --release) the running local stack's "
            "database. Safe to repeat: a database already at the latest revision is left as it "
            "is."
        ),
    )
    upgrade.add_argument(
        "--database-url", metavar="URL", help="SQLAlchemy URL instead of DATABASE_URL"
    )
    upgrade.add_argument(
        "--release",
        action="store_true",
        help=(
            "run as the Procfile's release process: exit after migrating when the platform "
            "runs it once per deploy (DYNO=release.N, as Heroku does), else stay up idle "
            "until SIGTERM or Ctrl-C, since honcho and foreman stop every process as soon as "
            "one exits"
        ),
    )
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace) -> int:
    """``dispatcher db upgrade``."""
    if args.database_url:
        url = args.database_url
    elif args.release:
        # A Procfile process: the environment's settings, as web and the workers read them.
        url = Settings.from_env().database_url
    else:
        url = command_settings(args).database_url
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        revision = db.current_revision(engine)
    finally:
        engine.dispose()
    print(f"{redact(url)} is at revision {revision}", flush=True)
    dyno = os.environ.get("DYNO", "")
    if args.release and not dyno.startswith("release."):
        print(
            f"migrated; staying up until SIGTERM or Ctrl-C (DYNO={dyno or '(unset)'} is not "
            "release.N, so this looks like honcho or foreman, which stop every process when "
            "one exits)",
            flush=True,
        )
        _idle_until_stopped()
    return 0


def _idle_until_stopped() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    while not stop.wait(1.0):
        pass
