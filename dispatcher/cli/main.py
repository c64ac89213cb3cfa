"""The ``dispatcher`` command: run the local stack, push a demo through it, migrate a database."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dispatcher.errors import DispatcherError

if TYPE_CHECKING:
    from dispatcher.runtime import Runtime

DEFAULT_DIR = Path(".dispatcher")


def _port(text: str) -> int:
    """argparse type of a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from devstack.localredis import RedisChoice

    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description=(
            "Command Email dispatcher: credits-aware email sending for SmartPlan steps and "
            "campaigns. Configuration comes from the environment or a .env file (REDIS_URL, "
            "DATABASE_URL, SMTP_HOST, SMTP_PORT, API_TOKENS, FREE_PLAN_CREDITS, MAIL_FROM, ...)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the whole stack locally in the foreground (Ctrl-C stops it)",
        description=(
            "Start everything a newcomer needs, in the foreground until Ctrl-C (SIGINT, SIGTERM "
            "and SIGHUP stop every child cleanly): the database (--database-url, else "
            "DATABASE_URL, else a SQLite file in DIR), migrated; Redis "
            "(REDIS_URL when it answers PING, else a private redis-server, else an embedded "
            "in-memory stand-in); an SMTP server that writes every accepted message as a .eml "
            "file in DIR/outbox/; the HTTP API; and a Celery worker for the smartplan, campaign "
            "and system queues. The API token is API_TOKENS, or one generated, kept in "
            "DIR/api-token and printed. The API's and worker's output goes to DIR/logs/. "
            "DIR/stack.json tells `dispatcher demo` where everything is."
        ),
    )
    run.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="folder for the database, outbox, logs and stack.json (default: %(default)s)",
    )
    run.add_argument(
        "--api-port",
        type=_port,
        default=8000,
        metavar="PORT",
        help="HTTP API port (default: %(default)s)",
    )
    run.add_argument(
        "--smtp-port",
        type=_port,
        metavar="PORT",
        default=2525,
        help="port of the local .eml SMTP server (default: %(default)s)",
    )
    run.add_argument(
        "--redis",
        choices=[c.value for c in RedisChoice],
        default=RedisChoice.AUTO.value,
        help=(
            "auto: REDIS_URL if it answers, else a private redis-server, else embedded; "
            "server: always a private redis-server (needs the binary on PATH); "
            "embedded: an in-memory fakeredis server inside this process (default: %(default)s)"
        ),
    )
    run.add_argument(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL to use instead of DATABASE_URL or the SQLite file in DIR",
    )
    run.add_argument(
        "--echo",
        action="store_true",
        help="also print the API's and worker's output here, prefixed with their name",
    )
    run.add_argument(
        "--ready-timeout",
        type=float,
        metavar="SECONDS",
        default=90.0,
        help="seconds to wait for the API and worker to come up (default: %(default)s)",
    )

    demo = commands.add_parser(
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
    demo.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="the folder `dispatcher run` uses (default: %(default)s)",
    )
    demo.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=60.0,
        help="seconds to wait for every send to finish (default: %(default)s)",
    )

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

    credits = commands.add_parser(
        "credits", help="show a user's credits", description="Inspect users' credits."
    )
    credits_commands = credits.add_subparsers(
        dest="credits_command", required=True, metavar="COMMAND"
    )
    show = credits_commands.add_parser(
        "show",
        help="plan, period, total, used, remaining, notified thresholds of a user",
        description=(
            "Print a user's current grant: plan, period start and end in the user's zone, "
            "total, used and remaining credits, thresholds notified and any pending downgrade. "
            "Starts a new period first when one is due (as the first send of it would)."
        ),
    )
    show.add_argument("user_id", metavar="USER")

    subscription = commands.add_parser(
        "subscription",
        help="upgrade, downgrade or cancel a user's plan",
        description=(
            "upgrade: charged now, the new plan's full credits at once. downgrade: recorded, "
            "applied at the user's next period start. cancel: free plan now, with exactly the "
            "free credits. Receipts are queued and sent by the workers (the beat's outbox "
            "sweep enqueues them within a minute)."
        ),
    )
    subscription.add_argument("action", choices=["upgrade", "downgrade", "cancel"])
    subscription.add_argument("user_id", metavar="USER")
    subscription.add_argument(
        "plan",
        nargs="?",
        metavar="PLAN",
        help="target plan (not for cancel); see `dispatcher plans`",
    )

    commands.add_parser(
        "plans",
        help="list the plan catalog",
        description="The plans users may be on, smallest first.",
    )

    reconcile = commands.add_parser(
        "reconcile",
        help="compare Redis quota counters with the SQL ledger for every user",
        description=(
            "For every user, compare the Redis counters of the current grant (used, total, "
            "highest threshold notified) with the SQL ledger and list the differences. With "
            "--repair, rebuild each differing or missing grant from the ledger. Exits 1 when "
            "differences were found and not repaired."
        ),
    )
    reconcile.add_argument(
        "--repair", action="store_true", help="rebuild differing grants from the ledger"
    )

    from dispatcher.cli.campaign import add_commands as add_campaign_commands

    add_campaign_commands(commands)

    from dispatcher.cli.ops import add_commands as add_ops_commands

    add_ops_commands(commands)

    smtp = commands.add_parser(
        "serve-smtp",
        help="run only the local SMTP server that writes .eml files",
        description=(
            "A local SMTP server on loopback that accepts every message and writes it as a .eml "
            "file into DIR, until Ctrl-C. `dispatcher run` starts one by itself."
        ),
    )
    smtp.add_argument(
        "--port", type=_port, default=2525, metavar="PORT", help="port (default: %(default)s)"
    )
    smtp.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR / "outbox",
        help="folder for the .eml files (default: %(default)s)",
    )
    inbound = commands.add_parser(
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
    inbound.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    inbound.add_argument(
        "--port", type=_port, default=2526, metavar="PORT", help="port (default: %(default)s)"
    )
    return parser


def _serve_unsubscribe(args: argparse.Namespace) -> int:
    """``dispatcher serve-unsubscribe``."""
    from dispatcher.delivery import inbound

    rt = _runtime()
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


def _run(args: argparse.Namespace) -> int:
    """``dispatcher run``."""
    from devstack.localredis import RedisChoice
    from devstack.localstack import RunOptions, run

    options = RunOptions(
        directory=args.dir,
        api_port=args.api_port,
        smtp_port=args.smtp_port,
        redis=RedisChoice(args.redis),
        database_url=args.database_url,
        echo_children=args.echo,
        ready_timeout=args.ready_timeout,
    )
    return run(options)


def _demo(args: argparse.Namespace) -> int:
    """``dispatcher demo``."""
    from devstack import demo

    return demo.run(args.dir, timeout=args.timeout)


def _db_upgrade(args: argparse.Namespace) -> int:
    """``dispatcher db upgrade``."""
    from dispatcher import db
    from dispatcher.db import redact
    from dispatcher.settings import Settings

    url = args.database_url or Settings.from_env().database_url
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        revision = db.current_revision(engine)
    finally:
        engine.dispose()
    print(f"{redact(url)} is at revision {revision}")
    return 0


def _serve_smtp(args: argparse.Namespace) -> int:
    """``dispatcher serve-smtp``."""
    from devstack.devsmtp import serve_forever

    print(f"SMTP server on 127.0.0.1:{args.port}, writing .eml files to {args.dir}/ (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        serve_forever("127.0.0.1", args.port, args.dir)
    return 0


def _runtime() -> Runtime:
    from dispatcher.runtime import Runtime
    from dispatcher.settings import Settings

    return Runtime(Settings.from_env())


def _credits(args: argparse.Namespace) -> int:
    """``dispatcher credits show USER``."""
    from dispatcher.credits.subscriptions import credits

    rt = _runtime()
    try:
        c = credits(rt, args.user_id)
    finally:
        rt.close()
    print(f"user        {c.user_id}")
    print(
        f"plan        {c.plan}"
        + (f" (downgrade to {c.pending_downgrade} pending)" if c.pending_downgrade else "")
    )
    print(f"period      {c.period}: {c.period_start.isoformat()} to {c.period_end.isoformat()}")
    print(f"credits     {c.used:,} used of {c.total:,}, {c.remaining:,} remaining")
    notified = ", ".join(f"{t}%" for t in c.thresholds_notified) or "none"
    print(f"notified    {notified}")
    return 0


def _subscription(args: argparse.Namespace) -> int:
    """``dispatcher subscription ACTION USER [PLAN]``."""
    from dispatcher.credits.subscriptions import change, money

    rt = _runtime()
    try:
        result = change(rt, args.user_id, args.action, args.plan)
    finally:
        rt.close()
    line = f"{args.user_id}: {result.action} done; plan {result.plan}"
    if result.pending_plan:
        line += f", {result.pending_plan} from the next period"
    print(line)
    if result.order:
        o = result.order
        print(
            f"order {o.number}: {o.plan}, {money(o.amount_cents)} charged, "
            f"{o.credits:,} credits, recurring {money(o.recurring_cents)} a month"
        )
    return 0


def _plans(_args: argparse.Namespace) -> int:
    """``dispatcher plans``."""
    from dispatcher.credits.plans import catalog
    from dispatcher.credits.subscriptions import money
    from dispatcher.settings import Settings

    for p in catalog(Settings.from_env()).values():
        print(f"{p.name:<10} {p.monthly_credits:>9,} sends a month  {money(p.price_cents):>9}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    """``dispatcher reconcile [--repair]``."""
    from dispatcher.credits.reconcile import reconcile

    rt = _runtime()
    checked = differing = 0
    try:
        for check in reconcile(rt, repair=args.repair):
            checked += 1
            if check.in_step:
                continue
            differing += 1
            redis = (
                "missing"
                if check.redis is None
                else "used={} total={} notified={}".format(*check.redis)
            )
            ledger = "used={} total={} notified={}".format(*check.ledger)
            action = "repaired" if check.repaired else "differs"
            print(
                f"{action:<9} {check.user_id} grant {check.grant}: redis {redis}; ledger {ledger}"
            )
    finally:
        rt.close()
    print(
        f"{checked} users checked, {differing} grants "
        + ("repaired" if args.repair else "differ from the ledger")
    )
    return 1 if differing and not args.repair else 0


def _campaign(args: argparse.Namespace) -> int:
    """``dispatcher campaign ...``."""
    from dispatcher.cli.campaign import run as run_campaign

    return run_campaign(args)


def _ops(args: argparse.Namespace) -> int:
    """``dispatcher suppression|alerts|relay ...``."""
    from dispatcher.cli.ops import run as run_ops

    rt = _runtime()
    try:
        return run_ops(args, rt)
    finally:
        rt.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dispatcher`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Each stored .eml is worth a line; the libraries' chatter is not.
    for noisy in ("mail.log", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {
        "run": _run,
        "demo": _demo,
        "db": _db_upgrade,
        "serve-smtp": _serve_smtp,
        "serve-unsubscribe": _serve_unsubscribe,
        "credits": _credits,
        "subscription": _subscription,
        "plans": _plans,
        "reconcile": _reconcile,
        "campaign": _campaign,
        "suppression": _ops,
        "alerts": _ops,
        "relay": _ops,
    }
    try:
        return handlers[args.command](args)
    except DispatcherError as exc:
        print(f"dispatcher {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
