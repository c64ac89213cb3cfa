"""The ``dispatcher`` command's parser and dispatch: migrations, credits and plans, campaigns,
suppression, alerts and the relay, the unsubscribe-by-mail server.

``python -m dispatcher.cli`` runs these. The ``dispatcher`` console script
(:mod:`devstack.cli`) adds the local stack's commands (``run``, ``demo``, ``serve-smtp``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.cli import campaign, credits, db, ops, sealing, unsubscribe
from dispatcher.cli.common import Commands, Handler
from dispatcher.cli.stack import DIR_VARIABLE
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
    parser.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS,
        help=(
            "folder of the running local stack (`dispatcher run`, its stack.json), which "
            "commands use when neither DATABASE_URL nor REDIS_URL is set (default: "
            f"{DIR_VARIABLE}, else .dispatcher)"
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (*extra, *CORE_COMMANDS):
        add_commands(commands)
    _options_anywhere(parser)
    return parser


def _options_anywhere(
    parser: argparse.ArgumentParser, above: Sequence[argparse.Action] = ()
) -> None:
    """Let an option of a command or group be given after its subcommands too, as people
    type them (``dispatcher credits show USER --dir x``): each subcommand's parser gets a copy
    of the options above it that it lacks, without a default of its own, so a value given
    before the subcommand is kept."""
    own = [
        a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]
    for action in above:
        if not any(o in parser._option_string_actions for o in action.option_strings):
            inherited = copy.copy(action)
            inherited.default = argparse.SUPPRESS
            inherited.required = False
            parser._add_action(inherited)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _options_anywhere(child, [*above, *own])


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and carry out the command; returns the exit code: 2 for a
    :class:`DispatcherError` or a file that cannot be read, 1 when Redis or the database does
    not answer, each printed as one line without a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Each stored .eml is worth a line; the libraries' chatter is not.
    for noisy in ("mail.log", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler: Handler = args.handler
    command = f"dispatcher {args.command}"
    try:
        return handler(args)
    except DispatcherError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        # A file named on the command line that cannot be read or written.
        print(f"{command}: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"{command}: Redis did not answer ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        problem = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"{command}: the database did not answer ({problem})", file=sys.stderr)
        return 1
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
