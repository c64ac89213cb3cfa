"""``dispatcher serve-unsubscribe``: the SMTP server behind the List-Unsubscribe mailto."""

from __future__ import annotations

import argparse
import contextlib
import threading

from dispatcher.cli.common import Commands, port, runtime
from dispatcher.delivery import inbound


def add_commands(commands: Commands) -> None:
    """Add ``serve-unsubscribe`` to the ``dispatcher`` parser's subcommands."""
    command = commands.add_parser(
        "serve-unsubscribe",
        help="run the SMTP server that takes unsubscribe requests by mail",
        description=(
            "The server behind the List-Unsubscribe mailto (UNSUBSCRIBE_MAILTO, else "
            "unsubscribe@ the MAIL_FROM domain): it takes mail for that address only, checks "
            "the token in the subject and suppresses the contact for the agent, like the "
            "one-click POST. It refuses mail for any other address, so give the mailbox a "
            "domain of its own (UNSUBSCRIBE_MAILTO=unsubscribe@unsub.example.com) and point "
            "that domain's MX at it (port 25, forwarded to PORT). Runs until Ctrl-C."
        ),
    )
    command.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    command.add_argument(
        "--port", type=port, default=2526, metavar="PORT", help="port (default: %(default)s)"
    )
    command.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    """``dispatcher serve-unsubscribe``."""
    rt = runtime()
    try:
        controller = inbound.start(rt, args.host, args.port)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        finally:
            controller.stop()
    finally:
        rt.close()
    return 0
