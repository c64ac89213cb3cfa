"""``dispatcher secrets``: make a key for SECRET_KEYS, and seal stored secrets with the first."""

from __future__ import annotations

import argparse

from cryptography.fernet import Fernet

from dispatcher.cli.common import Commands, runtime
from dispatcher.users import reseal_secrets


def add_commands(commands: Commands) -> None:
    """Add ``secrets`` to the ``dispatcher`` parser's subcommands."""
    group = commands.add_parser(
        "secrets",
        help="keys that seal stored secrets (MailChimp API keys)",
        description=(
            "Stored secrets are sealed with the first of SECRET_KEYS and opened with any of "
            "them. To rotate: put a new key first, run `dispatcher secrets rotate`, then drop "
            "the old key."
        ),
    )
    sub = group.add_subparsers(dest="secrets_command", required=True, metavar="COMMAND")
    sub.add_parser("new-key", help="print a new key for SECRET_KEYS")
    sub.add_parser("rotate", help="seal every stored secret again with the first key")
    group.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    if args.secrets_command == "new-key":
        print(Fernet.generate_key().decode())
        return 0
    rt = runtime(args)
    try:
        print(f"{reseal_secrets(rt)} stored secrets sealed with the first key")
    finally:
        rt.close()
    return 0
