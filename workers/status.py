"""``dispatcher status``: the queues, the workers of each pool, the last minute's outcomes,
alerts and the relay, in one screen (``--watch`` redraws it).

It lives beside the Celery app because it asks the running workers (Celery's remote control
``inspect``, through :meth:`CeleryTaskQueue.workers`, as the operators' page does) which queues
they consume and with what concurrency; the rest comes from :mod:`dispatcher.monitoring`, as
``/metrics`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from dispatcher import alerts, monitoring
from dispatcher.cli.common import Commands, runtime
from dispatcher.db import redact
from dispatcher.runtime import Runtime
from workers.app import create_app
from workers.queue import CeleryTaskQueue


def add_commands(commands: Commands) -> None:
    """Add ``status`` to the ``dispatcher`` parser's subcommands."""
    command = commands.add_parser(
        "status",
        help="queues, workers per pool, the last minute's outcomes, alerts and the relay",
        description=(
            "One screen of what the dispatcher is doing now: each queue's waiting tasks and "
            "how long the next has waited (Redis broker), the workers consuming it with their "
            "concurrency and running tasks (asked over the broker; a worker that does not "
            "answer within a second is not listed), sends finished in the last minute by "
            "outcome, sends in flight, campaigns running, the relay's state and the latest "
            "alerts. Reads the settings of the environment (and .env), or, with neither "
            "DATABASE_URL nor REDIS_URL set, the running local stack's (`dispatcher run`)."
        ),
    )
    command.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    command.add_argument("--json", action="store_true", help="print one JSON object instead")
    command.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    rt = runtime(args)
    app = create_app(rt.settings, rt)
    queue = CeleryTaskQueue(app)
    try:
        while True:
            report = gather(rt, queue)
            if args.json:
                print(json.dumps(report, default=str), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: redraw in place
                render(report, sys.stdout)
            if not args.watch:
                return 0
            time.sleep(max(0.5, args.watch))
    finally:
        app.close()
        rt.close()


def gather(rt: Runtime, queue: CeleryTaskQueue) -> dict[str, Any]:
    """Everything the screen shows, as plain data (the ``--json`` object)."""
    snap = monitoring.snapshot(rt, queue)
    workers = queue.workers()
    latest = alerts.recent(rt, limit=3).items
    return {
        "at": rt.clock.now().isoformat(timespec="seconds"),
        "broker": snap.broker,
        "broker_error": snap.broker_error,
        "database": redact(rt.settings.database_url),
        "queues": [
            {
                "name": q.name,
                "waiting": q.messages,
                "oldest_seconds": q.oldest_seconds,
                "consumers": q.consumers,
                "workers": [
                    {"node": w.node, "concurrency": w.concurrency, "busy": w.busy}
                    for w in workers
                    if q.name in w.queues
                ],
            }
            for q in snap.queues
        ],
        "last_minute": {
            f"{kind} {status}": n
            for (kind, status), n in sorted(monitoring.finished_recently(rt).items())
        },
        "in_flight": snap.in_flight,
        "campaigns_running": snap.campaigns_running,
        "relay_halt": None
        if snap.relay_halt is None
        else {"reason": snap.relay_halt[0], "seconds_left": snap.relay_halt[1]},
        "alerts": [
            {"at": a.created_at.isoformat(timespec="seconds"), "kind": a.kind, "detail": a.detail}
            for a in latest
        ],
    }


def render(report: dict[str, Any], out: TextIO) -> None:
    """The screen, from :func:`gather`'s report."""
    write = out.write
    write(f"Command Email dispatcher at {report['at']}\n")
    write(f"broker   {report['broker'] or '-'}\ndatabase {report['database']}\n\n")
    if report["broker_error"]:
        write(f"broker not answering: {report['broker_error']}\n\n")
    write(f"{'queue':<10} {'waiting':>8} {'oldest':>8}  workers (concurrency, running)\n")
    for q in report["queues"]:
        oldest = "-" if q["oldest_seconds"] is None else _seconds(q["oldest_seconds"])
        nodes = ", ".join(
            f"{w['node']} ({w['concurrency'] or '?'}, {w['busy']})" for w in q["workers"]
        )
        write(f"{q['name']:<10} {q['waiting']:>8,} {oldest:>8}  {nodes or 'none answering'}\n")
    finished = report["last_minute"]
    write("\nlast minute: ")
    write(", ".join(f"{k} {n:,}" for k, n in finished.items()) or "nothing finished")
    flight = report["in_flight"]
    write(
        f"\nin flight:   smartplan {flight.get('smartplan', 0):,}, campaign "
        f"{flight.get('campaign', 0):,}; campaigns running {report['campaigns_running']:,}\n"
    )
    halt = report["relay_halt"]
    if halt is None:
        write("relay:       sending\n")
    else:
        write(
            f"relay:       HALTED for {halt['seconds_left']}s more: {halt['reason']} "
            "(`dispatcher relay resume` once fixed)\n"
        )
    write("alerts:      " + ("none" if not report["alerts"] else "newest first") + "\n")
    for a in report["alerts"]:
        write(f"  {a['at']} {a['kind']}: {a['detail']}\n")
    out.flush()


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"
