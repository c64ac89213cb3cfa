"""The ``dispatcher`` command's parser and dispatch: migrations, credits and plans, campaigns,
suppression, alerts and the relay, the unsubscribe-by-mail server.

``python -m dispatcher.cli`` runs these. The ``dispatcher`` console script
(:mod:`devstack.cli`) adds the local stack's commands (``run``, ``demo``, ``serve-smtp``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from dispatcher.cli import campaign, credits, db, ops, sealing, unsubscribe
from dispatcher.cli.common import Commands, Handler
from dispatcher.errors import DispatcherError

#: Adds commands to the ``dispatcher`` parser's subcommands (each module's ``add_commands``).
AddCommands = Callable[[Commands], None]

CORE_COMMANDS: tuple[AddCommands, ...] = (
    db.add_commands,
    credits.add_commands,
    campaign.add_commands,
    ops.add_commands,
    sealing.add_commands,
    unsubscribe.add_commands,
)


def build_parser(extra: Sequence[AddCommands] = ()) -> argparse.ArgumentParser:
    """The argument parser of every subcommand: ``extra`` ones (the local stack's) first,
    then the core's."""
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description=(
            "Command Email dispatcher: credits-aware email sending for SmartPlan steps and "
            "campaigns. Configuration comes from the environment or a .env file (REDIS_URL, "
            "DATABASE_URL, SMTP_HOST, SMTP_PORT, API_TOKENS, FREE_PLAN_CREDITS, MAIL_FROM, ...)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (*extra, *CORE_COMMANDS):
        add_commands(commands)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and carry out the command; returns the exit code (2 for a
    :class:`DispatcherError`, printed without a traceback)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Each stored .eml is worth a line; the libraries' chatter is not.
    for noisy in ("mail.log", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler: Handler = args.handler
    try:
        return handler(args)
    except DispatcherError as exc:
        print(f"dispatcher {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """The core's commands (``python -m dispatcher.cli``); returns the exit code."""
    parser = build_parser()
    parser.epilog = (
        "The local stack's commands (run, demo, serve-smtp) are in the `dispatcher` console "
        "script, or `python -m devstack`."
    )
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
