"""The full ``dispatcher`` command (the console script, and ``python -m devstack``): the core's
commands (:mod:`dispatcher.cli`) and the local stack's, ``run``, ``demo`` and ``serve-smtp``.

They live here because production code never imports devstack.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from devstack import demo, localstack
from devstack.devsmtp import serve_forever
from devstack.localredis import RedisChoice
from dispatcher.cli.common import Commands, port
from dispatcher.cli.main import build_parser, run
from dispatcher.cli.stack import DEFAULT_DIR, DIR_VARIABLE, stack_dir
from workers import status
from workers.app import connect_broker

_RUN_DESCRIPTION = (
    "Start everything a newcomer needs, in the foreground until Ctrl-C (SIGINT, SIGTERM "
    "and SIGHUP stop every child cleanly): the database (--database-url, else "
    "DATABASE_URL, else a SQLite file in DIR), migrated; Redis "
    "(REDIS_URL when it answers PING, else a private redis-server, else an embedded "
    "in-memory stand-in); an SMTP server that writes every accepted message as a .eml "
    "file in DIR/outbox/; the HTTP API; a Celery worker for the smartplan, campaign "
    "and system queues; and Celery beat (renewals, the outbox and recovery sweeps: a "
    "receipt or notice queued by a command arrives within a minute). The API token is "
    "API_TOKENS, or one generated, kept in DIR/api-token and printed. The API's, worker's "
    "and beat's output goes to DIR/logs/. DIR/stack.json tells the other commands "
    "(`dispatcher demo`, `credits`, `subscription`, ...) where everything is."
)


def add_commands(commands: Commands) -> None:
    """Add ``run``, ``demo`` and ``serve-smtp`` to the ``dispatcher`` parser's subcommands."""
    _add_run(commands)
    _add_demo(commands)
    _add_serve_smtp(commands)


def _add_run(commands: Commands) -> None:
    command = commands.add_parser(
        "run",
        help="run the whole stack locally in the foreground (Ctrl-C stops it)",
        description=_RUN_DESCRIPTION,
    )
    command.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS,
        help=(
            "folder for the database, outbox, logs and stack.json (default: "
            f"{DIR_VARIABLE}, else {DEFAULT_DIR})"
        ),
    )
    command.add_argument(
        "--api-port",
        type=port,
        default=8000,
        metavar="PORT",
        help="HTTP API port (default: %(default)s)",
    )
    command.add_argument(
        "--smtp-port",
        type=port,
        metavar="PORT",
        default=2525,
        help="port of the local .eml SMTP server (default: %(default)s)",
    )
    command.add_argument(
        "--redis",
        choices=[c.value for c in RedisChoice],
        default=RedisChoice.AUTO.value,
        help=(
            "auto: REDIS_URL if it answers, else a private redis-server, else embedded; "
            "server: always a private redis-server (needs the binary on PATH); "
            "embedded: an in-memory fakeredis server inside this process (default: %(default)s)"
        ),
    )
    command.add_argument(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL to use instead of DATABASE_URL or the SQLite file in DIR",
    )
    command.add_argument(
        "--echo",
        action="store_true",
        help="also print the API's and worker's output here, prefixed with their name",
    )
    command.add_argument(
        "--ready-timeout",
        type=float,
        metavar="SECONDS",
        default=90.0,
        help="seconds to wait for the API and worker to come up (default: %(default)s)",
    )
    command.set_defaults(handler=_run)


def _add_demo(commands: Commands) -> None:
    command = commands.add_parser(
        "demo",
        help="push a quota-exhaustion scenario through the running local stack",
        description=(
            "With `dispatcher run` running, create a fresh agent with 3 credits left this month "
            "and send 5 SmartPlan emails through the HTTP API: 3 must arrive in the outbox as "
            ".eml files and 2 must fail with quota_exhausted on the contacts' timelines. Prints "
            "what happened; exits 1 when the outcome differs, 2 when the stack is not reachable "
            "or the sends do not finish in time."
        ),
    )
    command.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"the folder `dispatcher run` uses (default: {DIR_VARIABLE}, else {DEFAULT_DIR})",
    )
    command.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=60.0,
        help="seconds to wait for every send to finish (default: %(default)s)",
    )
    command.set_defaults(handler=_demo)


def _add_serve_smtp(commands: Commands) -> None:
    command = commands.add_parser(
        "serve-smtp",
        help="run only the local SMTP server that writes .eml files",
        description=(
            "A local SMTP server on loopback that accepts every message and writes it as a .eml "
            "file into DIR, until Ctrl-C. `dispatcher run` starts one by itself."
        ),
    )
    command.add_argument(
        "--port", type=port, default=2525, metavar="PORT", help="port (default: %(default)s)"
    )
    command.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR / "outbox",
        help="folder for the .eml files (default: %(default)s)",
    )
    command.set_defaults(handler=_serve_smtp)


def _run(args: argparse.Namespace) -> int:
    """``dispatcher run``."""
    options = localstack.RunOptions(
        directory=stack_dir(args),
        api_port=args.api_port,
        smtp_port=args.smtp_port,
        redis=RedisChoice(args.redis),
        database_url=args.database_url,
        echo_children=args.echo,
        ready_timeout=args.ready_timeout,
    )
    return localstack.run(options)


def _demo(args: argparse.Namespace) -> int:
    """``dispatcher demo``."""
    return demo.run(stack_dir(args), timeout=args.timeout)


def _serve_smtp(args: argparse.Namespace) -> int:
    """``dispatcher serve-smtp``."""
    print(f"SMTP server on 127.0.0.1:{args.port}, writing .eml files to {args.dir}/ (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        serve_forever("127.0.0.1", args.port, args.dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dispatcher`` console script; returns the exit code."""
    parser = build_parser(extra=(add_commands, status.add_commands))
    # This command can reach the broker: a command's receipt or notice is enqueued at once.
    parser.set_defaults(connect_broker=connect_broker)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
