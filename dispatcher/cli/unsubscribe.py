"""``dispatcher serve-unsubscribe``: the inbound SMTP server (the List-Unsubscribe mailto, and
the return paths bounces and complaints come back to)."""

from __future__ import annotations

import argparse
import contextlib
import os
import threading

from dispatcher.cli.common import Commands, port
from dispatcher.delivery import inbound
from dispatcher.errors import ConfigError
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

DEFAULT_PORT = 2526


def add_commands(commands: Commands) -> None:
    """Add ``serve-unsubscribe`` to the ``dispatcher`` parser's subcommands."""
    command = commands.add_parser(
        "serve-unsubscribe",
        help="run the SMTP server that takes unsubscribe requests, bounces and complaints",
        description=(
            "The server behind the List-Unsubscribe mailto (UNSUBSCRIBE_MAILTO, else "
            "unsubscribe@ the MAIL_FROM domain): it checks the token in the subject and "
            "suppresses the contact for the agent, like the one-click POST. It also takes the "
            "delivery status notifications and complaint reports sent to each email's return "
            "path (bounce+<send>-<tag>@ the MAIL_FROM domain) or to bounce@ that domain, and "
            "suppresses bounced and complaining addresses. It refuses mail for any other "
            "address. Point the MAIL_FROM domain's MX (and the mailbox's, if it has a domain "
            "of its own) at it (port 25, forwarded to this server's port). Runs until Ctrl-C."
        ),
    )
    command.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    command.add_argument(
        "--port",
        type=port,
        metavar="PORT",
        help=(
            "port (default: INBOUND_SMTP_PORT, or its earlier name UNSUBSCRIBE_SMTP_PORT, else "
            f"PORT as honcho and platforms give each process, else {DEFAULT_PORT})"
        ),
    )
    command.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    """``dispatcher serve-unsubscribe``."""
    # A Procfile process: configured by the environment alone, like web and the workers.
    settings = Settings.from_env()
    rt = Runtime(settings)
    try:
        controller = inbound.start(rt, args.host, listen_port(args.port, settings))
        try:
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        finally:
            controller.stop()
    finally:
        rt.close()
    return 0


def listen_port(given: int | None, settings: Settings) -> int:
    """--port, else INBOUND_SMTP_PORT, else the process's PORT, else 2526."""
    if given is not None:
        return given
    if settings.inbound_smtp_port is not None:
        return settings.inbound_smtp_port
    platform = os.environ.get("PORT", "").strip()
    if not platform:
        return DEFAULT_PORT
    try:
        return port(platform)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError("PORT", str(exc)) from None
