"""Drill (not a test): a Command Email campaign whose worker processes are SIGKILLed again and
again, measured against what a kill may cost.

Starts a private redis-server (no persistence), an aiosmtpd SMTP server that takes a moment over
each final dot, a migrated SQLite database and real ``celery worker -Q campaign`` processes, then
runs one campaign while a random worker is SIGKILLed at random points of its progress (a
replacement starting each time) and beat's sweeps run. Afterwards it prints the figures and
checks that

- every recipient ended in one terminal outcome with one timeline event, and credits used in
  Redis and in the SQL ledger are sent + unknown;
- the SMTP server took no Message-ID twice, and every recipient that is not ``unknown`` was
  delivered exactly once (those a killed worker had claimed without reaching DATA were sent
  again, once);
- unknown <= (SMTP connections per worker process) x (kills that landed while recipients were
  open): only a message in DATA when its worker died may end ``unknown``.

Exit status: 0 when every check holds, 1 when one fails, 2 when fewer kills landed than asked
(the campaign ran too fast: raise --smtp-delay or the recipients).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from devstack.devsmtp import DevSMTPServer
from dispatcher import db
from dispatcher.settings import Settings
from tests import crashkit
from tests.helpers import make_user

USER = "drill-agent"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.drills.campaign_kills",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipients", type=int, default=3000, help="campaign size (3000)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to make (20)")
    parser.add_argument("--workers", type=int, default=3, help="campaign worker processes (3)")
    parser.add_argument(
        "--pool-size", type=int, default=4, help="SMTP_POOL_SIZE: connections per chunk (4)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=100, help="CAMPAIGN_CHUNK_SIZE: recipients per task"
    )
    parser.add_argument(
        "--smtp-delay",
        type=float,
        default=0.05,
        help="seconds the SMTP server takes over each final dot (0.05)",
    )
    parser.add_argument("--seed", type=int, help="replay a kill plan (default: random)")
    parser.add_argument(
        "--limit", type=float, default=900.0, help="seconds the campaign may take (900)"
    )
    parser.add_argument(
        "--database-url",
        help="an empty database to use (migrated here); default: a new SQLite file",
    )
    parser.add_argument("--folder", type=Path, help="where logs go (default: a new temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="drill-kills-"))
    folder.mkdir(parents=True, exist_ok=True)
    database_url = args.database_url or f"sqlite:///{folder / 'drill.db'}"
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    engine.dispose()
    grant = args.recipients + 1000  # room for the campaign, and a margin to overspend
    print(f"seed {seed} (--seed {seed} replays the kill plan); logs in {folder}", flush=True)
    smtp = DevSMTPServer(fault=crashkit.slow_relay(args.smtp_delay))
    smtp.start()
    started = time.monotonic()
    try:
        with crashkit.RestartableRedis(folder / "redis") as redis_server:
            settings = crashkit.crash_settings(
                Settings(
                    redis_url=redis_server.url,
                    database_url=database_url,
                    smtp_host=smtp.host,
                    smtp_port=smtp.port,
                    mail_from="Command Email <bounces@mail.example.com>",
                ),
                free_plan_credits=grant,
                smtp_pool_size=args.pool_size,
                campaign_chunk_size=args.chunk_size,
            )
            with crashkit.Stack(settings, folder) as stack:
                for _ in range(args.workers):
                    stack.workers.start()
                stack.workers.wait_ready(args.workers, timeout=60)
                make_user(stack.rt, USER)
                cid = crashkit.start_campaign(stack.rt, USER, args.recipients)
                run = crashkit.run_with_kills(
                    stack,
                    smtp,
                    cid,
                    random.Random(seed),
                    args.kills,
                    args.limit,
                    spread=(0.02, 0.9),
                )
                stack.workers.stop_all()
                result = crashkit.audit(stack.rt, cid, USER, smtp)
                sent_again = crashkit.sent_again(stack.workers)
                recovered = stack.beat.recovered
    finally:
        smtp.stop()
    elapsed = time.monotonic() - started

    connections = crashkit.connections_per_worker(settings)
    landed = len(run.landed)
    bound = connections * landed
    duplicates = sum(n - 1 for n in result.received_twice.values())
    figures = [
        ("campaign", run.view.status),
        ("recipients", result.recipients),
        ("kills made / landed", f"{len(run.kills)} / {landed}"),
        ("sent", result.sent),
        ("unknown", result.unknown),
        ("  of which the server has", result.unknown_received),
        ("  never reached the server", result.unknown_not_received),
        ("failed", result.failed),
        ("sent again after a kill", sent_again),
        ("duplicates (by Message-ID)", duplicates),
        ("bound: connections x kills", f"{connections} x {landed} = {bound}"),
        ("chunks beat re-enqueued", recovered),
        ("elapsed", f"{elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in figures)
    for name, value in figures:
        print(f"{name:<{width}}  {value}")

    problems = crashkit.violations(result, grant, unknown_bound=bound)
    if result.recipients != args.recipients:
        problems.append(f"{result.recipients} recipients stored, {args.recipients} asked")
    if run.view.status != "completed":
        problems.append(f"the campaign ended {run.view.status}: {run.view.detail}")
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        return 1
    if landed < args.kills:
        print(f"INCOMPLETE: only {landed} of {args.kills} kills landed while recipients were open")
        return 2
    print("OK: every check holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
