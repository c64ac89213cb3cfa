"""``dispatcher suppression``, ``dispatcher alerts`` and ``dispatcher relay``: the ops side of
delivery under faults (suppression lists, policy and credential alerts, the relay's halt)."""

from __future__ import annotations

import argparse
import getpass
from datetime import datetime

from dispatcher.alerts import recent
from dispatcher.cli.common import Commands, runtime
from dispatcher.delivery import suppression
from dispatcher.errors import InvalidInput
from dispatcher.pages import MAX_LIMIT, walk
from dispatcher.runtime import Runtime

COMMANDS = ("suppression", "alerts", "relay")


def _when(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None


def add_commands(commands: Commands) -> None:
    """Add the commands to the ``dispatcher`` parser's subcommands."""
    sup = commands.add_parser(
        "suppression",
        help="list, add or remove addresses a user's emails skip",
        description=(
            "Each agent has a suppression list: hard bounces and unsubscribes are added by the "
            "workers, manual entries here (optionally until --expires). Suppressed recipients "
            "are skipped before any credit is taken: reported, never charged."
        ),
    )
    sup_commands = sup.add_subparsers(dest="suppression_command", required=True, metavar="COMMAND")
    listing = sup_commands.add_parser("list", help="entries in force, newest first")
    listing.add_argument("user_id", metavar="USER")
    add = sup_commands.add_parser("add", help="suppress an address for a user")
    add.add_argument("user_id", metavar="USER")
    add.add_argument("email", metavar="EMAIL")
    add.add_argument(
        "--expires",
        type=_when,
        metavar="TIME",
        help="ISO 8601 time with zone, e.g. 2027-01-01T00:00:00Z (default: never)",
    )
    add.add_argument("--detail", help="a note kept with the entry")
    remove = sup_commands.add_parser(
        "remove", help="take an address off a user's list (recorded: who, when, why)"
    )
    remove.add_argument("user_id", metavar="USER")
    remove.add_argument("email", metavar="EMAIL")
    remove.add_argument(
        "--why", required=True, help="why the address may be emailed again (kept on record)"
    )
    removals = sup_commands.add_parser(
        "removals", help="addresses taken off a user's list: who, when, why; newest first"
    )
    removals.add_argument("user_id", metavar="USER")
    sup.set_defaults(handler=_command)

    alerts = commands.add_parser(
        "alerts",
        help="show alerts: policy refusals (campaign paused), refused relay credentials",
        description=(
            "Newest first. policy_rejected: the relay refused a message for content or "
            "reputation; a campaign pauses until resumed. smtp_auth_failed: the relay refused "
            "our credentials; sending stopped for RELAY_HALT_SECONDS or until "
            "`dispatcher relay resume`."
        ),
    )
    alerts.add_argument("--user", dest="user_id", metavar="USER", help="only this user's")
    alerts.add_argument(
        "--limit", type=int, default=50, help=f"at most this many, 1-{MAX_LIMIT} (default 50)"
    )
    alerts.set_defaults(handler=_command)

    relay = commands.add_parser(
        "relay",
        help="show or lift a halt of the SMTP relay",
        description=(
            "status: whether sending through SMTP_HOST:SMTP_PORT is halted and why, and the "
            "configured rate limits. resume: lift a halt after fixing SMTP_USERNAME/PASSWORD."
        ),
    )
    relay.add_argument("relay_command", choices=["status", "resume"])
    relay.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    """The handler of :data:`COMMANDS`: :func:`run` with a Runtime from the environment."""
    rt = runtime(args)
    try:
        return run(args, rt)
    finally:
        rt.close()


def run(args: argparse.Namespace, rt: Runtime) -> int:
    """Carry out one of :data:`COMMANDS`; returns the exit code."""
    if args.command == "suppression":
        return _suppression(args, rt)
    if args.command == "alerts":
        for a in recent(rt, user_id=args.user_id, limit=args.limit).items:
            where = " ".join(
                f"{k}={v}"
                for k, v in (("user", a.user_id), ("campaign", a.campaign_id), ("relay", a.relay))
                if v
            )
            print(f"{a.created_at.isoformat(timespec='seconds')}  {a.kind:<16} {where}")
            print(f"    {a.detail}")
        return 0
    s = rt.settings
    if args.relay_command == "resume":
        lifted = rt.relay.resume()
        print("halt lifted" if lifted else "sending was not halted")
        return 0
    halted = rt.relay.halted()
    per_s = s.smtp_rate_per_second or "unlimited"
    per_h = s.smtp_rate_per_hour or "unlimited"
    print(f"relay   {s.smtp_host}:{s.smtp_port} (id {rt.relay.relay})")
    print(f"limits  {per_s} a second, {per_h} an hour")
    if halted is None:
        print("state   sending")
    else:
        print(f"state   HALTED for {halted[1]}s more: {halted[0]}")
    return 0


def _suppression(args: argparse.Namespace, rt: Runtime) -> int:
    if args.suppression_command == "list":
        shown = 0
        entries = walk(lambda at: suppression.listing(rt, args.user_id, cursor=at, limit=MAX_LIMIT))
        for v in entries:
            until = v.expires_at.isoformat(timespec="seconds") if v.expires_at else "never"
            print(f"{v.email:<40} {v.reason:<12} expires {until}  {v.detail or ''}".rstrip())
            shown += 1
        print(f"{shown} suppressed")
        return 0
    if args.suppression_command == "add":
        if args.expires is not None and args.expires.tzinfo is None:
            raise InvalidInput("--expires", "must carry a time zone, e.g. ...T00:00:00Z")
        v = suppression.suppress(
            rt, args.user_id, args.email, expires_at=args.expires, detail=args.detail
        )
        print(f"{v.email} suppressed for {args.user_id} ({v.reason})")
        return 0
    if args.suppression_command == "removals":
        taken = walk(lambda at: suppression.removals(rt, args.user_id, cursor=at, limit=MAX_LIMIT))
        for r in taken:
            when = r.removed_at.isoformat(timespec="seconds")
            print(f"{when}  {r.email:<40} {r.reason:<12} by {r.removed_by}: {r.why}")
        return 0
    who = f"cli:{getpass.getuser()}"
    suppression.remove(rt, args.user_id, args.email, by=who, why=args.why)
    print(f"{args.email} removed from {args.user_id}'s suppression list (recorded as {who})")
    return 0
