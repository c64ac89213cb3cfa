"""The period-sensitive paths on the last minutes of a month and the first of the next, run in
the processes and commands a deployment runs them in, on the test's clock (whatever today is)."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from dispatcher.clock import FrozenClock
from dispatcher.credits import subscriptions
from dispatcher.credits.subscriptions import change, credits, orders
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery.transports.memory import MemoryTransport
from dispatcher.models import Send
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.settings import Settings
from tests.helpers import make_user, send_request, worker_env

USER = "agent-den"
ZONE = "America/Denver"
#: 23:58:30 on 30 November in Denver (UTC-7), then 00:01 on 1 December there.
LAST_MINUTES = datetime(2026, 12, 1, 6, 58, 30, tzinfo=UTC)
FIRST_MINUTES = datetime(2026, 12, 1, 7, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(LAST_MINUTES)


def _child(settings: Settings, job: str, send_ids: list[str], out: Any) -> None:
    """A separate process built from the settings alone, as a worker or beat builds its own."""
    rt = Runtime(settings, transport=MemoryTransport())
    try:
        if job == "renew":
            out.put(subscriptions.renew_due(rt))
        for send_id in send_ids:
            out.put(delivery.deliver(rt, send_id).value)
    finally:
        rt.close()


def in_child(settings: Settings, job: str, send_ids: Sequence[str] = ()) -> list[Any]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(settings, job, list(send_ids), out))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    return [out.get(timeout=5) for _ in range((job == "renew") + len(send_ids))]


def command(settings: Settings, *argv: str) -> tuple[int, str]:
    """``dispatcher ARGV`` as an operator runs it: a process of its own, settings from its
    environment."""
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *argv],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def submit(rt: Runtime, n: int, tag: str) -> list[str]:
    return [
        submit_send(rt, InlineQueue(), send_request(USER, n=i, run_id=f"run-{tag}")).send_id
        for i in range(n)
    ]


def at(settings: Settings, when: datetime) -> Settings:
    """The same settings with every process's clock reading ``when`` now."""
    offset = (when - datetime.now(UTC)).total_seconds()
    return settings.with_overrides(clock_offset_seconds=offset)


def test_month_end_and_month_start_in_workers_beat_and_commands(
    runtime: Runtime, clock: FrozenClock
) -> None:
    rt = runtime
    make_user(rt, USER, timezone=ZONE)
    change(rt, USER, "upgrade", "10k")

    # Given the last minutes of November in Denver: a worker process charges November's grant
    sent = in_child(at(rt.settings, LAST_MINUTES), "deliver", submit(rt, 3, "nov"))
    assert sent == ["sent"] * 3
    with rt.sessions() as session:
        periods = session.scalars(select(Send.period).where(Send.user_id == USER)).all()
    assert set(periods) == {"2026-11"}
    code, out = command(at(rt.settings, LAST_MINUTES), "credits", "show", USER)
    assert code == 0, out
    assert "period      2026-11: 2026-11-01T00:00:00-06:00 to 2026-12-01T00:00:00-07:00" in out
    assert "3 used of 10,000" in out
    code, out = command(at(rt.settings, LAST_MINUTES), "reconcile")
    assert (code, "0 grants differ" in out) == (0, True), out

    # When the month turns in Denver, beat renews the plan in its own process (eager) ...
    clock.set(FIRST_MINUTES)
    december = at(rt.settings, FIRST_MINUTES)
    assert in_child(december, "renew") == [1]
    # ... and a worker process charges the new grant, with the credits of November gone
    assert in_child(december, "deliver", submit(rt, 2, "dec")) == ["sent"] * 2

    # Then the test, the workers and the commands agree on December
    c = credits(rt, USER)
    assert (c.period, c.total, c.used) == ("2026-12", 10_000, 2)
    renewals = [o for o in orders(rt, USER) if o.kind == "renewal"]
    assert [o.period for o in renewals] == ["2026-12"]
    code, out = command(december, "credits", "show", USER)
    assert code == 0, out
    assert "period      2026-12: 2026-12-01T00:00:00-07:00 to 2027-01-01T00:00:00-07:00" in out
    assert "2 used of 10,000" in out
    code, out = command(december, "reconcile")
    assert (code, "0 grants differ" in out) == (0, True), out
