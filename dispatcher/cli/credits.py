"""``dispatcher credits show``, ``subscription``, ``plans`` and ``reconcile``: users' credits,
their plans and the Redis counters against the SQL ledger."""

from __future__ import annotations

import argparse

from dispatcher.cli.common import Commands, runtime
from dispatcher.credits.plans import catalog
from dispatcher.credits.reconcile import reconcile
from dispatcher.credits.subscriptions import change, credits, money
from dispatcher.settings import Settings
from dispatcher.users import get_user
from dispatcher.web.sessions import portal_link


def add_commands(commands: Commands) -> None:
    """Add the commands to the ``dispatcher`` parser's subcommands."""
    _add_credits(commands)
    _add_subscription(commands)
    commands.add_parser(
        "plans",
        help="list the plan catalog",
        description="The plans users may be on, smallest first.",
    ).set_defaults(handler=_plans)
    _add_reconcile(commands)
    link = commands.add_parser(
        "portal-link",
        help="print a short-lived link to a user's Command Email pages",
        description=(
            "The link POST /v1/users/{id}/portal-link answers: it opens the user's pages "
            "(usage, subscription and orders, campaigns, contacts' timelines) for "
            "PORTAL_LINK_SECONDS, signed with UNSUBSCRIBE_SECRET; it leads to PUBLIC_BASE_URL."
        ),
    )
    link.add_argument("user_id", metavar="USER")
    link.set_defaults(handler=_portal_link)


def _add_credits(commands: Commands) -> None:
    group = commands.add_parser(
        "credits", help="show a user's credits", description="Inspect users' credits."
    )
    credits_commands = group.add_subparsers(
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
    show.set_defaults(handler=_show)


def _add_subscription(commands: Commands) -> None:
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
    subscription.set_defaults(handler=_subscription)


def _add_reconcile(commands: Commands) -> None:
    command = commands.add_parser(
        "reconcile",
        help="compare Redis quota counters with the SQL ledger for every user",
        description=(
            "For every user, compare the Redis counters of the current grant (used, total, "
            "highest threshold notified) with the SQL ledger and list the differences. With "
            "--repair, rebuild each differing or missing grant from the ledger. Exits 1 when "
            "differences were found and not repaired."
        ),
    )
    command.add_argument(
        "--repair", action="store_true", help="rebuild differing grants from the ledger"
    )
    command.set_defaults(handler=_reconcile)


def _show(args: argparse.Namespace) -> int:
    """``dispatcher credits show USER``."""
    rt = runtime(args)
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
    rt = runtime(args)
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


def _portal_link(args: argparse.Namespace) -> int:
    """``dispatcher portal-link USER``."""
    rt = runtime(args)
    try:
        with rt.sessions() as session:
            get_user(session, args.user_id)
        url, expires = portal_link(rt.settings, args.user_id, rt.clock.now())
    finally:
        rt.close()
    print(url)
    print(f"opens {args.user_id}'s pages until {expires.isoformat(timespec='seconds')}")
    return 0


def _plans(_args: argparse.Namespace) -> int:
    """``dispatcher plans``."""
    for p in catalog(Settings.from_env()).values():
        print(f"{p.name:<10} {p.monthly_credits:>9,} sends a month  {money(p.price_cents):>9}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    """``dispatcher reconcile [--repair]``."""
    rt = runtime(args)
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
