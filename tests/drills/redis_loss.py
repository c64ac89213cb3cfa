"""Fault drill (not a test): SmartPlan sends against a credit limit while Redis, broker and
credit counters at once, is SIGKILLed and restarted empty in the middle of the stream.

Each run starts, on loopback, a private redis-server without persistence, a fresh database
(a SQLite file, or a PostgreSQL database of its own), a real SMTP server that takes a little
time over each message, and the processes the Procfile runs: the SmartPlan worker (threads,
concurrency 8), the system worker (usage notices, and the sweeps beat schedules) and beat. An
agent whose plan grants exactly --credits credits submits --sends SmartPlan sends through the
Python producer API; once the SMTP server has received --kill-after of them, redis-server is
SIGKILLed and started again, empty, on the same port. The drill then waits for every send to
reach a terminal status and checks, per run:

- sent + unknown is exactly the grant (or every send, when there are more credits than sends),
  and every other send failed `quota_exhausted`;
- no send is left open, and every send was terminal within --limit seconds of the restart;
- the SMTP server received no Message-ID twice, every `sent` send was received and no `failed`
  one was, and each send has exactly one terminal timeline event;
- `reconcile` finds Redis and the SQL ledger in step, and both count sent + unknown as used.

Run it from the repository root: ``python -m tests.drills.redis_loss`` (``make drill-redis``).
It exits 1 when any run broke a rule, with a summary table over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy import func, select

from devstack.devsmtp import DevSMTPServer, Received
from devstack.processes import HOST
from dispatcher import db, keys
from dispatcher.credits.reconcile import GrantCheck, reconcile
from dispatcher.errors import QueueUnavailable
from dispatcher.models import Send, SendStatus
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests import crashkit
from tests.helpers import make_user, send_request
from workers.app import create_app
from workers.names import SMARTPLAN, SYSTEM
from workers.queue import CeleryTaskQueue

USER = "drill-agent"
PLATFORM_EMAIL = f"{USER}@kw.example.com"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
QUOTA_EXHAUSTED = "quota_exhausted"
POLL = 0.25  # seconds between looks at SQL while waiting
PROGRESS_EVERY = 5.0  # seconds between progress lines


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    sends: int
    credits: int
    runs: int
    kill_after: int | None  # None: a random point of each run
    down: float
    smtp_delay: float
    database: str
    postgres_url: str
    timeout: float
    limit: float
    seed: int
    workdir: Path | None

    @property
    def charged(self) -> int:
        """Sends that must end charged (sent or unknown): as many as there are credits."""
        return min(self.sends, self.credits)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.drills.redis_loss",
        description=(
            "Redis-loss drill: SmartPlan sends against a credit limit, with redis-server (the "
            "broker and the credit counters, no persistence) SIGKILLed and restarted empty "
            "mid-stream, in real worker and beat processes. Each run checks that exactly "
            "min(sends, credits) sends end sent or unknown and the rest fail quota_exhausted, "
            "that every send is terminal within --limit seconds of the restart, that the SMTP "
            "server got no message twice, and that reconcile finds Redis and the SQL ledger in "
            "step. Prints a report per run and a summary table; exits 1 when any run broke a "
            "rule. Run from the repository root."
        ),
        epilog=(
            "Example: python -m tests.drills.redis_loss --runs 3 --kill-after 120 "
            "--database postgresql"
        ),
    )
    parser.add_argument("--sends", type=int, default=400, help="SmartPlan sends per run (400)")
    parser.add_argument(
        "--credits", type=int, default=300, help="credits the agent's plan grants (300)"
    )
    parser.add_argument("--runs", type=int, default=10, help="how many runs (10)")
    parser.add_argument(
        "--kill-after",
        type=int,
        default=None,
        metavar="N",
        help=(
            "kill Redis once the SMTP server has received N SmartPlan messages (fewer than "
            "min(sends, credits)); default: a random point between a fifth and three quarters "
            "of them, drawn per run"
        ),
    )
    parser.add_argument(
        "--down",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long Redis stays down before it starts again, empty (1.0)",
    )
    parser.add_argument(
        "--smtp-delay",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="time the SMTP server takes over each message, so the kill lands mid-stream (0.1)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="a fresh SQLite file per run, or a fresh PostgreSQL database per run (sqlite)",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES,
        metavar="URL",
        help=f"where each run's PostgreSQL database is made ({DEFAULT_POSTGRES})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up waiting this long after the restart, and report what is stuck (300)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="every send must be terminal this soon after the restart (120)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the random kill points (replays them)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep each run's logs and files under DIR (default: a temporary folder, removed)",
    )
    args = parser.parse_args(argv)
    if args.sends < 1 or args.credits < 1 or args.runs < 1:
        parser.error("--sends, --credits and --runs must be at least 1")
    charged = min(args.sends, args.credits)
    if args.kill_after is not None and not 0 <= args.kill_after < charged:
        parser.error(f"--kill-after must be from 0 to {charged - 1}: later, the stream has ended")
    if args.down < 0 or args.smtp_delay < 0 or args.timeout <= 0 or args.limit <= 0:
        parser.error("--down and --smtp-delay must be 0 or more, --timeout and --limit positive")
    return Options(
        sends=args.sends,
        credits=args.credits,
        runs=args.runs,
        kill_after=args.kill_after,
        down=args.down,
        smtp_delay=args.smtp_delay,
        database=args.database,
        postgres_url=args.postgres_url,
        timeout=args.timeout,
        limit=args.limit,
        seed=args.seed if args.seed is not None else random.randrange(2**32),
        workdir=args.workdir,
    )


# --------------------------------------------------------------------------- one run's parts


@contextlib.contextmanager
def fresh_database(opts: Options, folder: Path) -> Iterator[str]:
    """A migrated, empty database for one run; a PostgreSQL one is dropped afterwards."""
    if opts.database == "sqlite":
        url = f"sqlite:///{folder / 'dispatcher.db'}"
        _migrate(url)
        yield url
        return
    name = f"ced_drill_{uuid.uuid4().hex[:10]}"
    admin = db.make_engine(opts.postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            url = opts.postgres_url.rsplit("/", 1)[0] + "/" + name
            _migrate(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _migrate(url: str) -> None:
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()


def mid_month_offset() -> float:
    """Seconds from now to noon UTC on the 15th of this month: every process of the run reads
    that clock, so no run straddles a period start whatever the date."""
    now = datetime.now(UTC)
    return (datetime(now.year, now.month, 15, 12, tzinfo=UTC) - now).total_seconds()


def drill_settings(opts: Options, database_url: str, redis_url: str, smtp_port: int) -> Settings:
    """The run's settings, handed to every process: the production timings (beat sweeps every
    60 s), the private Redis as broker and counters, the plan granting ``--credits``."""
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        smtp_host=HOST,
        smtp_port=smtp_port,
        free_plan_credits=opts.credits,
        mail_from="Command Email <bounces@mail.example.com>",
        clock_offset_seconds=mid_month_offset(),
        log_level="INFO",
    )


def is_contact_message(m: Received) -> bool:
    """A SmartPlan message (to a contact), not a usage notice to the agent."""
    return PLATFORM_EMAIL not in m.rcpt_tos


def contact_messages(server: DevSMTPServer) -> list[Received]:
    return [m for m in list(server.handler.messages) if is_contact_message(m)]


def status_counts(rt: Runtime) -> Counter[str]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.status, func.count()).where(Send.user_id == USER).group_by(Send.status)
        ).all()
    return Counter({status.value: n for status, n in rows})


def open_count(counts: Counter[str]) -> int:
    return sum(n for s, n in counts.items() if not SendStatus(s).terminal)


def describe(counts: Counter[str]) -> str:
    order = [s.value for s in SendStatus]
    return " ".join(f"{s}={counts[s]}" for s in order if counts[s]) or "none"


def stuck_sends(rt: Runtime, limit: int = 10) -> list[str]:
    """Sends still open: id, status, reason and the columns that say who should move them."""
    with rt.sessions() as session:
        rows = session.execute(
            select(
                Send.id,
                Send.status,
                Send.reason,
                Send.attempts,
                Send.period,
                Send.grant_seq,
                Send.lease_until,
                Send.retry_at,
                Send.enqueued_at,
                Send.updated_at,
            )
            .where(Send.user_id == USER, Send.status.not_in(crashkit.TERMINAL))
            .order_by(Send.updated_at)
            .limit(limit)
        ).all()
    return [
        f"{r.id} {r.status.value} reason={r.reason} attempts={r.attempts} "
        f"grant={r.period}:{r.grant_seq} lease_until={_at(r.lease_until)} "
        f"retry_at={_at(r.retry_at)} enqueued_at={_at(r.enqueued_at)} "
        f"updated_at={_at(r.updated_at)}"
        for r in rows
    ]


def claimed_not_reserved(rt: Runtime) -> list[str]:
    """Sends that recorded their grant but are still ``queued``: Redis may or may not have
    granted their credit; a rebuild from the ledger counts them as used."""
    with rt.sessions() as session:
        return list(
            session.scalars(
                select(Send.id).where(
                    Send.user_id == USER,
                    Send.status == SendStatus.QUEUED,
                    Send.period.is_not(None),
                )
            ).all()
        )


def final_statuses(rt: Runtime, send_ids: Sequence[str]) -> list[str]:
    """Where each of ``send_ids`` is now: id, status and reason."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.id, Send.status, Send.reason).where(Send.id.in_(list(send_ids)))
        ).all()
    return [f"{r.id} {r.status.value} {r.reason or ''}".rstrip() for r in rows]


REBUILT = "quota grant rebuilt from ledger"


def rebuilds(logs: Path) -> list[str]:
    """The workers' log lines saying a grant was rebuilt from the ledger, with what it read."""
    found = []
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if REBUILT in line:
                found.append(f"{path.stem}: {line[line.index(REBUILT) :]}")
    return found


def crash_line(log: Path) -> str:
    """The line of a log that says why its process stopped (Celery's "Unrecoverable error")."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    marked = [line for line in lines if "CRITICAL" in line or "Unrecoverable" in line]
    return (marked or lines or ["(empty log)"])[-1].strip()


def _at(when: datetime | None) -> str:
    return "-" if when is None else when.strftime("%H:%M:%S.%f")[:-3]


class Submitter(threading.Thread):
    """A SmartPlan engine posting the sends through the Python producer API; when the broker is
    away it tries the same request again, as a producer does (the send is stored once)."""

    def __init__(self, settings: Settings, count: int) -> None:
        super().__init__(name="submitter", daemon=True)
        self.rt = Runtime(settings)
        self.app = create_app(settings, self.rt)
        self.producer = Producer(self.rt, CeleryTaskQueue(self.app))
        self.count = count
        self.submitted = 0
        self.refused = 0  # submissions the broker did not take (tried again)
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for n in range(self.count):
                request = send_request(USER, n, smartplan_id="drill-plan", run_id=f"run-{n}")
                while not self.stop.is_set():
                    try:
                        self.producer.submit_send(request)
                        break
                    except QueueUnavailable:
                        self.refused += 1
                        time.sleep(0.2)
                else:
                    return
                self.submitted += 1
        except Exception as exc:  # noqa: BLE001 - reported as the run's failure
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        self.app.close()
        self.rt.close()


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    number: int
    kill_at: int  # messages received when the kill was due
    received_at_kill: int = 0
    at_kill: Counter[str] = field(default_factory=Counter)
    claimed: list[str] = field(default_factory=list)  # claimed, not reserved, at the restart
    claimed_after: list[str] = field(default_factory=list)  # the same sends at the end
    rebuilds: list[str] = field(default_factory=list)
    recovered_after: float | None = None  # restart to the sweep's re-enqueue (epoch marker set)
    terminal_after: float | None = None  # restart to every send terminal
    counts: Counter[str] = field(default_factory=Counter)
    audit: crashkit.Audit | None = None
    grants: list[GrantCheck] = field(default_factory=list)
    received: int = 0  # SmartPlan messages the SMTP server took
    notices: int = 0  # usage notices it took
    duplicates: dict[str, int] = field(default_factory=dict)  # Message-ID -> times received
    refused: int = 0
    stuck: list[str] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)  # processes that exited by themselves
    violations: list[str] = field(default_factory=list)
    logs: Path | None = None


def run_once(opts: Options, number: int, kill_at: int, folder: Path) -> RunResult:
    """One run of the drill in ``folder``; every process it started is gone when it returns."""
    result = RunResult(number, kill_at, logs=folder / "logs")
    smtp = DevSMTPServer(fault=crashkit.slow_relay(opts.smtp_delay))
    smtp.start()
    try:
        with (
            fresh_database(opts, folder) as database_url,
            crashkit.RestartableRedis(folder / "redis") as server,
        ):
            settings = drill_settings(opts, database_url, server.url, smtp.port)
            _drive(opts, settings, server, smtp, result, folder / "logs")
    finally:
        smtp.stop()
    return result


def _drive(
    opts: Options,
    settings: Settings,
    server: crashkit.RestartableRedis,
    smtp: DevSMTPServer,
    result: RunResult,
    logs: Path,
) -> None:
    quiet = settings.with_overrides(log_level="WARNING")  # this process: no line per send
    rt = Runtime(quiet)
    procs = crashkit.Workers(settings, logs)
    submitter: Submitter | None = None
    try:
        make_user(rt, USER, platform_email=PLATFORM_EMAIL)
        # A deployment that has been running: its sweeps already marked this Redis's epoch,
        # so only a loss of Redis's data makes them enqueue all open work again.
        rt.redis.set(keys.epoch(), rt.clock.now().isoformat())
        procs.start(SMARTPLAN, pool="threads", concurrency=8, isolated=False)
        procs.start(SYSTEM, pool="threads", concurrency=2, isolated=False)
        procs.start_beat()
        procs.wait_ready(3, timeout=60)
        started = time.monotonic()
        submitter = Submitter(quiet, opts.sends)
        submitter.start()
        _until_kill_point(opts, rt, procs, smtp, submitter, result, started)
        # SIGKILL: every key is gone, task messages and credit counters alike.
        server.kill()
        killed = time.monotonic()
        result.at_kill = status_counts(rt)
        time.sleep(max(0.0, opts.down - (time.monotonic() - killed)))
        result.claimed = claimed_not_reserved(rt)
        server.start()
        restarted = time.monotonic()
        print(
            f"  run {result.number}: Redis killed at {result.received_at_kill} received "
            f"({describe(result.at_kill)}); restarted empty after "
            f"{restarted - killed:.1f}s with {len(result.claimed)} sends claimed, not reserved",
            flush=True,
        )
        _until_terminal(opts, rt, procs, smtp, submitter, result, restarted)
        result.refused = submitter.refused
        if submitter.error is not None:
            result.violations.append(f"the producer failed: {submitter.error}")
        submitter.close()
        submitter = None
        procs.stop_all()
        _check(opts, rt, smtp, result)
    except Exception as exc:  # noqa: BLE001 - e.g. a process died by itself: this run failed
        result.violations.append(f"run aborted: {type(exc).__name__}: {exc}")
    finally:
        if submitter is not None:
            submitter.close()
        procs.stop_all()
        rt.close()


def _until_kill_point(
    opts: Options,
    rt: Runtime,
    procs: crashkit.Workers,
    smtp: DevSMTPServer,
    submitter: Submitter,
    result: RunResult,
    started: float,
) -> None:
    """Wait until the SMTP server received ``kill_at`` SmartPlan messages."""
    next_progress = started + PROGRESS_EVERY
    while (received := len(contact_messages(smtp))) < result.kill_at:
        supervise(procs, result, "before the kill", started)
        now = time.monotonic()
        if now - started > opts.timeout:
            raise AssertionError(
                f"only {received} messages received after {opts.timeout:.0f}s, "
                f"{submitter.submitted} sends submitted ({describe(status_counts(rt))})"
            )
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            if submitter.submitted == opts.sends and open_count(status_counts(rt)) == 0:
                break  # the stream ended before the kill point: reported by _check
        time.sleep(0.01)
    result.received_at_kill = len(contact_messages(smtp))


def _until_terminal(
    opts: Options,
    rt: Runtime,
    procs: crashkit.Workers,
    smtp: DevSMTPServer,
    submitter: Submitter,
    result: RunResult,
    restarted: float,
) -> None:
    """Wait until every send is stored and terminal, or ``--timeout`` after the restart."""
    next_progress = restarted + PROGRESS_EVERY
    while True:
        now = time.monotonic()
        if result.recovered_after is None and _epoch_marked(rt):
            result.recovered_after = now - restarted
        counts = status_counts(rt)
        done = submitter.submitted == opts.sends and open_count(counts) == 0
        if done or submitter.error is not None:
            if done:
                result.terminal_after = now - restarted
            return
        supervise(procs, result, "after the restart", restarted)
        if now - restarted > opts.timeout:
            result.stuck = stuck_sends(rt)
            return
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            print(
                f"    +{now - restarted:5.1f}s after restart: {describe(counts)}; "
                f"received {len(contact_messages(smtp))}"
                + ("" if result.recovered_after is None else "; open work enqueued again"),
                flush=True,
            )
        time.sleep(POLL)


def supervise(procs: crashkit.Workers, result: RunResult, phase: str, since: float) -> None:
    """Start again any process that exited by itself, as the platform running the Procfile
    does; the death is recorded, and breaks a rule of the drill."""
    for child in procs.restart_dead():
        line = (
            f"{child.name} exited by itself with code {child.returncode()} "
            f"{time.monotonic() - since:.1f}s {phase}: {crash_line(child.log_path)}"
        )
        result.deaths.append(line)
        print(f"    {line}; started again", flush=True)


def _epoch_marked(rt: Runtime) -> bool:
    """True once a sweep found the loss and handed all open work to the broker again."""
    try:
        return bool(rt.redis.exists(keys.epoch()))
    except RedisError:
        return False


def _check(opts: Options, rt: Runtime, smtp: DevSMTPServer, result: RunResult) -> None:
    """Read the run's outcome from SQL, Redis and the SMTP server, and list what broke a rule."""
    v = result.violations
    v.extend(f"process died: {line}" for line in result.deaths)
    result.counts = counts = status_counts(rt)
    # Before anything that may rebuild a grant: reconcile sees Redis as the run left it.
    result.grants = list(reconcile(rt))
    messages = list(smtp.handler.messages)
    ours = [m for m in messages if is_contact_message(m)]
    result.received = len(ours)
    result.notices = len(messages) - len(ours)
    seen = Counter(crashkit.message_id(m) for m in messages)
    result.duplicates = {mid: n for mid, n in seen.items() if n > 1}
    result.audit = a = crashkit.audit_sends(rt, Send.user_id == USER, USER, ours)
    result.claimed_after = final_statuses(rt, result.claimed)
    if result.logs is not None:
        result.rebuilds = rebuilds(result.logs)

    if open_count(result.at_kill) == 0:
        v.append("the kill landed after every send was terminal: nothing was mid-stream")
    if sum(counts.values()) != opts.sends:
        v.append(f"{sum(counts.values())} sends stored, {opts.sends} submitted")
    if open_count(counts):
        v.append(f"{open_count(counts)} sends not terminal: {describe(counts)}")
    elif result.terminal_after is not None and result.terminal_after > opts.limit:
        v.append(
            f"terminal {result.terminal_after:.0f}s after the restart (limit {opts.limit:.0f}s)"
        )
    charged = a.sent + a.unknown
    if charged != opts.charged:
        v.append(f"sent + unknown = {a.sent} + {a.unknown} = {charged}, expected {opts.charged}")
    expected_failed = Counter({QUOTA_EXHAUSTED: opts.sends - opts.charged})
    if +a.failed_by_reason != +expected_failed:
        v.append(f"failed by reason {dict(a.failed_by_reason)}, expected {dict(+expected_failed)}")
    if result.duplicates:
        v.append(f"{len(result.duplicates)} Message-IDs received more than once")
    for name, items in (
        ("sent but not received exactly once", a.sent_not_once),
        ("failed (credit back) but received", a.failed_but_received),
        ("without exactly one matching timeline event", a.event_problems),
        ("received messages of no send", a.foreign),
    ):
        if items:
            v.append(f"{len(items)} {name}: {items[:3]}")
    for g in result.grants:
        if not g.in_step:
            v.append(
                f"reconcile: grant {g.grant} differs: redis (used, total, notified)={g.redis} "
                f"ledger={g.ledger}"
            )
    if a.ledger_used != charged:
        v.append(f"the ledger counts {a.ledger_used} used, sent + unknown = {charged}")
    if a.redis_used != charged:
        v.append(f"Redis counts {a.redis_used} used, sent + unknown = {charged}")


# --------------------------------------------------------------------------- report


def report(opts: Options, r: RunResult) -> None:
    a = r.audit
    print(f"run {r.number}:", flush=True)
    if a is not None:
        failed = ", ".join(f"{k}={n}" for k, n in sorted(a.failed_by_reason.items())) or "none"
        print(
            f"  sent={a.sent} unknown={a.unknown} failed={a.failed} ({failed}); "
            f"SMTP received {r.received} SmartPlan messages, {r.notices} notices, "
            f"{len(r.duplicates)} duplicate Message-IDs"
        )
        print(
            f"  killed at {r.received_at_kill} received (due at {r.kill_at}); open work enqueued "
            f"again {_secs(r.recovered_after)} and all terminal {_secs(r.terminal_after)} after "
            f"the restart; producer retried {r.refused} submissions"
        )
        print(
            f"  credits used: Redis {a.redis_used}/{a.redis_total}, "
            f"ledger {a.ledger_used}/{a.ledger_total}, sent + unknown {a.sent + a.unknown}"
        )
        for g in r.grants:
            state = "in step" if g.in_step else "DIFFERS"
            print(f"  reconcile {g.user_id} {g.grant}: {state} redis={g.redis} ledger={g.ledger}")
        print(f"  claimed but not reserved when Redis came back: {len(r.claimed)}")
        for line in r.claimed_after:
            print(f"    now {line}")
        for line in r.rebuilds:
            print(f"  {line}")
    if r.stuck:
        print("  still open (oldest first):")
        for line in r.stuck:
            print(f"    {line}")
    for line in r.violations:
        print(f"  VIOLATION: {line}")
    if r.violations and opts.workdir is not None:
        print(f"  logs: {r.logs}")
    print(flush=True)


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}s"


def summary(opts: Options, results: list[RunResult]) -> None:
    head = (
        f"{'run':>3} {'kill@':>5} {'claim':>5} {'sent':>5} {'quota':>5} {'other':>5} {'unkn':>5} "
        f"{'open':>5} {'smtp':>5} {'dup':>4} {'died':>4} {'requeue':>8} {'terminal':>9} "
        f"{'redis/ledger used':>17}  {'reconcile':<9} verdict"
    )
    print(
        f"summary: {len(results)} runs of {opts.sends} sends against {opts.credits} credits, "
        f"{opts.database}, seed {opts.seed}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        a = r.audit
        if a is None:
            first = r.violations[0].splitlines()[0]
            print(f"{r.number:>3} {r.received_at_kill:>5}  (no result) FAIL: {first}")
            continue
        quota = a.failed_by_reason[QUOTA_EXHAUSTED]
        clean = all(g.in_step for g in r.grants)
        print(
            f"{r.number:>3} {r.received_at_kill:>5} {len(r.claimed):>5} {a.sent:>5} {quota:>5} "
            f"{a.failed - quota:>5} {a.unknown:>5} {open_count(r.counts):>5} {r.received:>5} "
            f"{len(r.duplicates):>4} {len(r.deaths):>4} "
            f"{_secs(r.recovered_after):>8} {_secs(r.terminal_after):>9} "
            f"{f'{a.redis_used}/{a.ledger_used}':>17}  {'clean' if clean else 'DIFFERS':<9} "
            f"{'ok' if not r.violations else 'FAIL'}"
        )
    print(
        "kill@: SmartPlan messages received at the kill; claim: sends claimed but not reserved "
        "when Redis came back; quota/other: failed quota_exhausted / for another reason; "
        "died: processes that exited by themselves (started again); "
        "requeue, terminal: seconds from the restart to the sweep enqueueing open work again, "
        "and to every send terminal"
    )
    failed = sum(1 for r in results if r.violations)
    print(f"{len(results) - failed} of {len(results)} runs kept every rule", flush=True)


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)  # unwind, so every child process is killed
    rng = random.Random(opts.seed)
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="redis-loss-drill-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"Redis-loss drill: {opts.runs} runs of {opts.sends} SmartPlan sends against "
        f"{opts.credits} credits, SMTP {opts.smtp_delay}s per message, {opts.database}, "
        f"seed {opts.seed}; files in {root}",
        flush=True,
    )
    results: list[RunResult] = []
    try:
        for number in range(1, opts.runs + 1):
            kill_at = opts.kill_after
            if kill_at is None:
                kill_at = rng.randint(max(1, opts.charged // 5), max(1, opts.charged * 3 // 4))
            folder = root / f"run{number}"
            folder.mkdir(parents=True, exist_ok=True)
            print(f"run {number}: kill Redis at {kill_at} received", flush=True)
            result = run_once(opts, number, kill_at, folder)
            results.append(result)
            report(opts, result)
    except KeyboardInterrupt:
        print("interrupted: every process of the drill was stopped", file=sys.stderr)
        if results:
            summary(opts, results)
        return 130
    finally:
        if opts.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary(opts, results)
    return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
