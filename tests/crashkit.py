"""Crash kit: real Celery worker processes that can be SIGKILLed, a private redis-server that can
be killed and restarted empty on its port, beat's recovery sweeps run from the test, and an audit
of a campaign's outcome against what the SMTP server received."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from unittest import mock

import redis
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, func, select

from devstack.devsmtp import Action, DevSMTPServer, Received, slow
from devstack.processes import HOST, Child, free_port
from dispatcher import recovery as outbox
from dispatcher.campaigns import control, create
from dispatcher.credits.ledger import snapshot
from dispatcher.credits.subscriptions import credits, ensure_current
from dispatcher.delivery import lifecycle
from dispatcher.models import Send, SendStatus, TimelineEvent
from dispatcher.ports import TaskQueue
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import worker_env
from workers.app import CAMPAIGN, SWEEP_OUTBOX_TASK, create_app

TERMINAL = (SendStatus.SENT, SendStatus.FAILED, SendStatus.UNKNOWN)

#: Chunks one campaign worker process runs at once: ``--pool solo`` (the process killed is the
#: one that talks SMTP).
WORKER_CONCURRENCY = 1


def crash_settings(settings: Settings, **changes: Any) -> Settings:
    """Short timings so lost work comes back within seconds, with the relations the settings
    enforce kept: backoff cap and task time limit below the visibility timeout, lease above
    the task time limit. Small chunks make many tasks, so kills land in many of them."""
    values: dict[str, Any] = dict(
        campaign_chunk_size=100,
        smtp_pool_size=4,
        visibility_timeout=10,
        task_time_limit=5,
        send_lease_seconds=6,
        retry_backoff_seconds=0.2,
        retry_backoff_max_seconds=2.0,
        smtp_timeout=5.0,
    )
    values.update(changes)
    return settings.with_overrides(**values)


# --------------------------------------------------------------------------- environment


# --------------------------------------------------------------------------- workers


def _ready(line: str) -> bool:
    """Celery's "<node> ready." line: the worker consumes from now on."""
    return line.rstrip().endswith(" ready.")


def _kill_group(child: Child) -> int | None:
    """SIGKILL the child's whole process group (it leads one) and reap it; its exit code."""
    if child.alive():  # not reaped yet, so its group id is still ours
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    child.stop(5)
    return child.returncode()


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _beat_ready(line: str) -> bool:
    """Beat's "beat: Starting..." line: it schedules from now on."""
    return "beat: Starting..." in line


class Workers:
    """Real ``celery -A workers.app`` processes, each its own process group: by default
    ``worker -Q campaign --pool solo`` (the process that runs the task is the one killed); any
    queue, pool and concurrency, and ``beat``, as the ``Procfile`` runs them."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.env = worker_env(settings)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.killed: set[str] = set()  # killed by the test, or replaced after dying
        self._ready_of: dict[str, Callable[[str], bool]] = {}

    def start(
        self,
        queue: str = CAMPAIGN,
        *,
        pool: str = "solo",
        concurrency: int | None = None,
        isolated: bool = True,
    ) -> Child:
        """Start a worker consuming ``queue``. ``isolated`` leaves out mingle, gossip and
        heartbeat (the workers do not talk to each other); without it the worker runs with
        Celery's defaults, as the ``Procfile`` starts it."""
        n = len(self.children) + 1
        name = f"crash{n}" if isolated else f"{queue}{n}"
        argv = [
            *(sys.executable, "-m", "celery", "-A", "workers.app", "worker"),
            *("-Q", queue, "-n", f"{name}@%h", "--pool", pool, "--loglevel", "INFO"),
        ]
        argv += ["--concurrency", str(concurrency or WORKER_CONCURRENCY)]
        if isolated:
            argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        return self._start(f"worker{n}" if isolated else name, argv, _ready)

    def start_beat(self) -> Child:
        """Start ``celery -A workers.app beat`` (its schedule file in this folder): the sweeps
        run at the period the app's beat schedule gives them."""
        n = len(self.children) + 1
        argv = [
            *(sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--loglevel", "INFO"),
            *("--schedule", str(self.folder / f"beat{n}-schedule")),
        ]
        return self._start(f"beat{n}", argv, _beat_ready)

    def _start(self, name: str, argv: list[str], ready: Callable[[str], bool]) -> Child:
        child = Child(name, argv, self.env, self.folder / f"{name}.log", ready_marker=ready)
        child.start()
        self.children.append(child)
        self._ready_of[name] = ready
        return child

    def restart_dead(self) -> list[Child]:
        """Start the same command again for every process that exited by itself, as a platform
        restarts a crashed process (the replacement logs to its own file); returns the dead."""
        dead = [c for c in self.children if c.name not in self.killed and not c.alive()]
        for c in dead:
            self.killed.add(c.name)
            self._start(f"{c.name}-r{len(self.children) + 1}", c.argv, self._ready_of[c.name])
        return dead

    def ready(self) -> list[Child]:
        """Workers that are consuming and have not been killed."""
        return [c for c in self.children if c.alive() and c.ready.is_set()]

    def wait_ready(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ready()) < count:
            self.check_none_died()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.ready())} of {count} workers became ready in {timeout:.0f}s"
                    + self.logs()
                )
            time.sleep(0.05)

    def kill(self, child: Child) -> int | None:
        """SIGKILL a worker (its whole process group); returns its exit code (-9)."""
        self.killed.add(child.name)
        return _kill_group(child)

    def signal(self, child: Child, sig: signal.Signals, *, group: bool = False) -> None:
        """Send ``sig`` to a worker's main process, as Kubernetes does to a container's first
        process, or with ``group`` to every process of it (its pool too), as Heroku does to a
        dyno. The worker is expected to exit from now on."""
        self.killed.add(child.name)
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(child.pid, sig)
            else:
                os.kill(child.pid, sig)

    def check_none_died(self) -> None:
        """Fail when a worker exited that the test did not kill (a crash of our code)."""
        for c in self.children:
            if c.name not in self.killed and not c.alive():
                raise AssertionError(
                    f"{c.name} exited by itself with code {c.returncode()}:\n"
                    + tail(c.log_path, 60)
                )

    def stop_all(self) -> None:
        for c in self.children:
            _kill_group(c)

    def logs(self) -> str:
        return f"\nworker logs in {self.folder}; last lines of the newest:\n" + (
            tail(self.children[-1].log_path) if self.children else "(none started)"
        )


# --------------------------------------------------------------------------- Redis


class RestartableRedis:
    """A private redis-server without persistence that the test can SIGKILL and start again,
    empty, on the same port."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("this test needs redis-server on PATH (it kills and restarts it)")
        self.binary = binary
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.child: Child | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> None:
        self.starts += 1
        argv = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.folder), "--loglevel", "warning"]
        log = self.folder / f"redis{self.starts}.log"
        self.child = Child(f"redis{self.starts}", argv, os.environ, log)
        self.child.start()
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or not self.child.alive():
                        raise AssertionError(
                            f"redis-server did not start on port {self.port}:\n{tail(log)}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> int | None:
        """SIGKILL the server: with no persistence every key is lost."""
        assert self.child is not None
        return _kill_group(self.child)

    def stop(self) -> None:
        if self.child is not None:
            _kill_group(self.child)

    def __enter__(self) -> RestartableRedis:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- beat


class CountingQueue:
    """A task queue that counts the campaign chunks handed to it."""

    def __init__(self, inner: TaskQueue) -> None:
        self.inner = inner
        self.chunks = 0

    def enqueue_send(self, send_id: str) -> None:
        self.inner.enqueue_send(send_id)

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        self.inner.enqueue_sends(send_ids)

    def enqueue_system_email(self, email_id: str) -> None:
        self.inner.enqueue_system_email(email_id)

    def enqueue_campaign_chunk(self, campaign_id: str, chunk: int) -> None:
        self.inner.enqueue_campaign_chunk(campaign_id, chunk)
        self.chunks += 1


class Beat:
    """Beat's role, played from the test loop: every ``every`` seconds it runs the body of the
    very task beat schedules (``dispatcher.sweep_outbox``: outbox sweep, recovery of work whose
    task message was lost, expiries) in this process, through its own Celery app.

    ``lifecycle.stale_after`` adds a fixed 60 s margin, sized for production, to the bound its
    docstring names (longer than the longest retry countdown plus a lease, so live work is never
    taken for lost); here it is that bound alone, so lost work is found within seconds.
    """

    def __init__(self, settings: Settings, rt: Runtime, every: float = 1.0) -> None:
        self.queue = CountingQueue(rt.queue)
        self.rt = Runtime(settings, queue=self.queue)
        self.app = create_app(settings, self.rt)
        self.task = self.app.tasks[SWEEP_OUTBOX_TASK]
        bound = settings.retry_backoff_max_seconds + settings.send_lease_seconds + 1
        self.stale_after = timedelta(seconds=bound)
        self.every = every
        self.runs = 0
        self.errors: list[str] = []
        self._next = 0.0

    @property
    def recovered(self) -> int:
        """Campaign chunks beat handed to the broker again."""
        return self.queue.chunks

    def tick(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        self.runs += 1
        try:
            with mock.patch.object(outbox, "stale_after", lambda _rt: self.stale_after):
                self.task()
        except (RedisError, KombuError, OSError) as exc:
            # As under beat: a run that finds Redis away fails, and the next one runs anyway.
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.app.close()
        self.rt.close()


# --------------------------------------------------------------------------- the stack


class Stack:
    """The test's runtime (producer side), a Celery app that only publishes, beat, and the
    worker processes; leaving the block kills every process it started."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        # The real clock: workers stamp leases with theirs.
        self.rt = Runtime(settings)
        self.app = create_app(settings, self.rt)  # publishes campaign chunks for the producer
        self.beat = Beat(settings, self.rt)
        self.workers = Workers(settings, folder / "workers")

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.workers.stop_all()
        finally:
            self.app.close()
            self.beat.close()
            self.rt.close()


def start_campaign(rt: Runtime, user_id: str, n: int) -> str:
    """Create a Command Email campaign of ``n`` recipients and hand its chunks to the broker."""
    view, chunks = create.create(
        rt,
        create.CampaignRequest(
            user_id=user_id,
            provider="command_email",
            name="crash test",
            subject="Open house this weekend, {{ first_name }}",
            html="<h1>Open house</h1><p>Hi {{ first_name }}, come by!</p>",
            recipients=[
                create.Recipient(f"c{i}", f"person{i}@example.org", {"first_name": f"P{i}"})
                for i in range(n)
            ],
        ),
    )
    control.enqueue(rt, view.id, chunks)
    return view.id


def slow_relay(delay: float) -> Callable[[str, Received], Action | None]:
    """An SMTP fault that answers each final dot only after ``delay`` seconds (the message is
    kept either way): a worker killed meanwhile leaves a message the server may have."""

    def fault(stage: str, _r: Received) -> Action | None:
        return slow(delay) if stage == "data" else None

    return fault


def open_and_leased(rt: Runtime, campaign_id: str) -> tuple[int, int]:
    """(recipients still open, recipients held under a lease by some worker) right now."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.status, func.count())
            .where(Send.campaign_id == campaign_id, Send.status.in_(lifecycle.OPEN_STATUSES))
            .group_by(Send.status)
        ).all()
    by = {s: n for s, n in rows}
    return sum(by.values()), by.get(SendStatus.SENDING, 0)


class Progress:
    """Logs a campaign's progress every few seconds (pytest shows it on failure, or with -s)."""

    def __init__(self, every: float = 3.0) -> None:
        self.started = time.monotonic()
        self.every = every
        self._next = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, view: control.CampaignView, received: int, extra: str = "") -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        c = view.counts
        print(
            f"[{self.elapsed():5.1f}s] {view.status} {view.done}/{view.recipients} done: "
            f"sent={c['sent']} unknown={c['unknown']} failed={c['failed']} "
            f"sending={c['sending']} reserved={c['reserved']}; smtp received={received} {extra}",
            flush=True,
        )


# --------------------------------------------------------------------------- kills


def connections_per_worker(settings: Settings) -> int:
    """SMTP connections one campaign worker process holds open at most: each chunk it runs at
    once reuses up to ``SMTP_POOL_SIZE``. A kill leaves at most this many recipients with a
    message in DATA, the only ones that may end ``unknown``."""
    return settings.smtp_pool_size * WORKER_CONCURRENCY


@dataclass(frozen=True)
class Kill:
    at: float  # seconds into the campaign
    worker: str
    exit_code: int | None
    open_before: int  # recipients still open just before the kill
    leased_before: int  # of which held under a lease (mid-conversation somewhere)


@dataclass
class KillRun:
    """A campaign run to its end while campaign workers were SIGKILLed."""

    view: control.CampaignView
    kills: list[Kill] = field(default_factory=list)

    @property
    def landed(self) -> list[Kill]:
        """Kills made while recipients of the campaign were still open."""
        return [k for k in self.kills if k.open_before > 0]


def run_with_kills(
    stack: Stack,
    server: DevSMTPServer,
    campaign_id: str,
    rng: random.Random,
    kills: int,
    limit: float,
    spread: tuple[float, float] = (0.02, 0.75),
) -> KillRun:
    """Run the campaign to its end while beat's sweeps run, SIGKILLing a random ready worker
    (a replacement starting each time) at ``kills`` random points of its progress within
    ``spread``, at least a second apart and at a random moment of a conversation. Fails once
    the campaign ran ``limit`` seconds."""
    plan = sorted(rng.uniform(*spread) for _ in range(kills))
    run = KillRun(control.view(stack.rt, campaign_id))
    last_kill = 0.0
    progress = Progress()
    while True:
        run.view = view = control.view(stack.rt, campaign_id)
        progress.log(view, len(server.messages), f"kills={len(run.kills)}")
        if view.status != "running":
            return run
        stack.workers.check_none_died()
        stack.beat.tick()
        due = plan and view.progress >= plan[0]
        victims = stack.workers.ready()
        if due and victims and progress.elapsed() - last_kill >= 1.0:
            time.sleep(rng.uniform(0.0, 0.4))  # a random point of the conversation
            victim = rng.choice(victims)
            open_, leased = open_and_leased(stack.rt, campaign_id)
            code = stack.workers.kill(victim)
            run.kills.append(Kill(progress.elapsed(), victim.name, code, open_, leased))
            print(f"  killed {victim.name} ({open_} open, {leased} leased)", flush=True)
            stack.workers.start()
            plan.pop(0)
            last_kill = progress.elapsed()
        check_time_left(stack, progress, campaign_id, view, limit)
        time.sleep(0.1)


def check_time_left(
    stack: Stack, progress: Progress, campaign_id: str, view: control.CampaignView, limit: float
) -> None:
    """Fail, saying where the campaign stands, once a phase ran past ``limit`` seconds."""
    if progress.elapsed() > limit:
        raise AssertionError(
            f"campaign not completed after {limit:.0f}s: {view}; "
            f"open chunks {control.open_chunks(stack.rt, campaign_id)}; "
            f"beat recovered {stack.beat.recovered}" + stack.workers.logs()
        )


_SENT_AGAIN = re.compile(r"(\d+) recipients of a lost worker never reached DATA")


def sent_again(workers: Workers) -> int:
    """Recipients that lost workers had claimed but not carried to DATA, handed back to be sent
    (as the chunks that found them logged it)."""
    total = 0
    for child in workers.children:
        with contextlib.suppress(OSError):
            text = child.log_path.read_text("utf-8", "replace")
            total += sum(int(n) for n in _SENT_AGAIN.findall(text))
    return total


# --------------------------------------------------------------------------- audit

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def message_id(m: Received) -> str:
    head = m.data.split(b"\r\n\r\n", 1)[0]
    found = _MESSAGE_ID.search(head)
    return found.group(1).decode("ascii") if found else m.message_id


@dataclass(frozen=True)
class Audit:
    """Finished sends (a campaign's recipients, or a user's SmartPlan sends) as SQL, Redis
    and the SMTP server see them."""

    recipients: int
    counts: Counter[str]
    failed_by_reason: Counter[str]
    not_terminal: list[str]  # "contact: status"
    event_problems: list[str]  # recipients without exactly one matching terminal event
    received_twice: dict[str, int]  # Message-ID -> times the server took it
    sent_not_once: list[str]  # "sent" recipients the server took other than exactly once
    failed_but_received: list[str]
    foreign: list[str]  # Message-IDs received that belong to no recipient of the campaign
    unknown_received: int  # unknown outcomes the server did take
    unknown_not_received: int  # unknown outcomes it never saw: charged, never delivered
    redis_used: int
    redis_total: int
    ledger_used: int
    ledger_total: int

    @property
    def sent(self) -> int:
        return self.counts["sent"]

    @property
    def unknown(self) -> int:
        return self.counts["unknown"]

    @property
    def failed(self) -> int:
        return self.counts["failed"]


def audit(rt: Runtime, campaign_id: str, user_id: str, server: DevSMTPServer) -> Audit:
    """A campaign's recipients against everything the server received."""
    return audit_sends(rt, Send.campaign_id == campaign_id, user_id, list(server.messages))


def audit_sends(
    rt: Runtime, which: ColumnElement[bool], user_id: str, messages: Iterable[Received]
) -> Audit:
    """The sends ``which`` selects (all charged to ``user_id``'s current grant) against
    ``messages``, the server's messages meant for them: anything else there is ``foreign``."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.id, Send.contact_id, Send.status, Send.reason, Send.message_id).where(which)
        ).all()
        events = session.execute(
            select(TimelineEvent.send_id, TimelineEvent.status).where(
                TimelineEvent.send_id.in_(select(Send.id).where(which))
            )
        ).all()
    events_of: dict[str, list[SendStatus]] = {}
    for send_id, status in events:
        events_of.setdefault(send_id, []).append(status)
    received = Counter(message_id(m) for m in messages)
    counts: Counter[str] = Counter()
    failed_by_reason: Counter[str] = Counter()
    not_terminal, event_problems = [], []
    sent_not_once, failed_but_received = [], []
    unknown_received = unknown_not_received = 0
    ours: set[str] = set()
    for send_id, contact_id, status, reason, mid in rows:
        ours.add(mid)
        counts[status.value] += 1
        if status not in TERMINAL:
            not_terminal.append(f"{contact_id}: {status.value}")
            continue
        got = events_of.get(send_id, [])
        if got != [status]:
            event_problems.append(
                f"{contact_id} is {status.value} with events {[e.value for e in got]}"
            )
        if status is SendStatus.FAILED:
            failed_by_reason[reason or "?"] += 1
            if mid in received:
                failed_but_received.append(contact_id)
        elif status is SendStatus.SENT and received[mid] != 1:
            sent_not_once.append(f"{contact_id} received {received[mid]} times")
        elif status is SendStatus.UNKNOWN:
            if mid in received:
                unknown_received += 1
            else:
                unknown_not_received += 1
    _, ref = ensure_current(rt, user_id)
    view = credits(rt, user_id)  # Redis (rebuilt from the ledger when it is missing)
    with rt.sessions() as session:
        snap = snapshot(session, ref)
    return Audit(
        recipients=len(rows),
        counts=counts,
        failed_by_reason=failed_by_reason,
        not_terminal=not_terminal,
        event_problems=event_problems,
        received_twice={k: n for k, n in received.items() if n > 1},
        sent_not_once=sent_not_once,
        failed_but_received=failed_but_received,
        foreign=sorted(set(received) - ours),
        unknown_received=unknown_received,
        unknown_not_received=unknown_not_received,
        redis_used=view.used,
        redis_total=view.total,
        ledger_used=snap.used,
        ledger_total=snap.total,
    )


def violations(result: Audit, grant: int, unknown_bound: int | None = None) -> list[str]:
    """What a finished campaign on a server that accepts every message breaks of the crash
    invariants (empty when none), with the offending recipients named: every recipient has one
    terminal status and one matching timeline event; nobody got two copies; every recipient
    not ``unknown`` was delivered exactly once (those a lost worker had claimed without
    reaching DATA were sent again, once); nobody failed; Redis and the SQL ledger both count
    sent + unknown of ``grant``; and, given ``unknown_bound``, no more are ``unknown``."""
    out: list[str] = []
    if result.not_terminal:
        out.append(
            f"{len(result.not_terminal)} recipients have no terminal status: "
            f"{result.not_terminal[:10]}"
        )
    if result.event_problems:
        out.append(
            f"{len(result.event_problems)} recipients lack exactly one terminal timeline event "
            f"matching their status: {result.event_problems[:10]}"
        )
    if result.received_twice:
        out.append(
            f"the SMTP server took {len(result.received_twice)} Message-IDs more than once: "
            f"{list(result.received_twice.items())[:10]}"
        )
    if result.sent_not_once:
        out.append(
            f"{len(result.sent_not_once)} recipients are 'sent' but the server did not get "
            f"their message exactly once: {result.sent_not_once[:10]}"
        )
    if result.failed_but_received:
        out.append(
            f"{len(result.failed_but_received)} recipients are 'failed' (credit returned) but "
            f"the server got their message: {result.failed_but_received[:10]}"
        )
    if result.foreign:
        out.append(f"the server got messages of no recipient: {result.foreign[:5]}")
    charged = result.sent + result.unknown
    if (result.redis_used, result.redis_total) != (charged, grant):
        out.append(
            f"Redis counts {result.redis_used} of {result.redis_total} credits used; "
            f"sent + unknown = {result.sent} + {result.unknown} = {charged} of {grant}"
        )
    if (result.ledger_used, result.ledger_total) != (charged, grant):
        out.append(
            f"the SQL ledger counts {result.ledger_used} of {result.ledger_total} credits used; "
            f"sent + unknown = {charged} of {grant}"
        )
    # Nothing here can make a recipient fail: the server accepts every message, and a worker
    # lost mid-conversation leaves its recipients `unknown` or sent again, never `failed`.
    if result.failed_by_reason:
        out.append(f"recipients failed: {dict(result.failed_by_reason)}")
    if unknown_bound is not None and result.unknown > unknown_bound:
        out.append(
            f"{result.unknown} recipients ended unknown ({result.unknown_not_received} of them "
            f"never reached the server), more than the bound {unknown_bound}"
        )
    return out
