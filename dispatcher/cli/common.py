"""What the command modules share: the handler type, a port argument, a Runtime over the
command's settings (the environment's, or the running local stack's)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dispatcher.cli.stack import command_settings
from dispatcher.runtime import Runtime

#: Carries out one command from its parsed arguments; returns the exit code. Each command's
#: parser names its handler with ``set_defaults(handler=...)``.
Handler = Callable[[argparse.Namespace], int]

#: The ``dispatcher`` parser's subcommands (argparse's private _SubParsersAction).
Commands = Any


def port(text: str) -> int:
    """argparse type of a TCP port number."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port (1-65535)")
    return number


#: Wires a command's runtime to the broker, so the follow-up work of a command (a receipt, a
#: notice) is enqueued at once; the ``dispatcher`` console script gives one as the parser's
#: ``connect_broker`` default. Without it the work waits for beat's outbox sweep.
ConnectBroker = Callable[[Runtime], None]


def runtime(args: argparse.Namespace | None = None) -> Runtime:
    """A Runtime over the command's settings: the environment's (and .env's) when they name a
    database or Redis, else the running local stack's (see :func:`command_settings`), wired to
    the broker where the command line can reach it; the caller closes it."""
    rt = Runtime(command_settings(args))
    connect: ConnectBroker | None = getattr(args, "connect_broker", None)
    if connect is not None:
        connect(rt)
    return rt
