"""Usage notifications (R5, I3): each threshold once per grant, in-app and by email, even under
concurrency, redelivery and Redis losing its data."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher.api.app import create_api
from dispatcher.credits import notices
from dispatcher.credits.quota import GrantUnstable, Reservation
from dispatcher.credits.subscriptions import change, credits, ensure_current
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import system_mail
from dispatcher.delivery.transports.memory import MemoryTransport
from dispatcher.errors import NotAttempted
from dispatcher.models import Notification, SystemEmail
from dispatcher.ports import InlineQueue
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.settings import Settings
from tests.helpers import make_user, seed_used_credits, send_request


def submit(rt: Runtime, user: str, count: int, start: int = 0) -> list[str]:
    q = InlineQueue()
    return [
        submit_send(rt, q, send_request(user, n=i, run_id=f"r{i}")).send_id
        for i in range(start, start + count)
    ]


def notified(rt: Runtime, user: str) -> list[int]:
    with rt.sessions() as s:
        return list(
            s.scalars(
                select(Notification.threshold)
                .where(Notification.user_id == user)
                .order_by(Notification.id)
            ).all()
        )


def notice_emails(rt: Runtime, user: str) -> list[SystemEmail]:
    with rt.sessions() as s:
        return list(
            s.scalars(
                select(SystemEmail).where(
                    SystemEmail.user_id == user, SystemEmail.kind == "usage_notice"
                )
            ).all()
        )


def test_each_threshold_is_notified_once_in_app_and_by_email(
    make_runtime: Any, smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(free_plan_credits=20)
    make_user(rt)
    queue = InlineQueue()
    rt.queue = queue
    results = [delivery.deliver(rt, i).value for i in submit(rt, "agent-1", 22)]
    assert results == ["sent"] * 20 + ["failed"] * 2
    assert notified(rt, "agent-1") == [80, 85, 90, 95, 100]
    # Each notice was enqueued on the system queue once, and each goes out once.
    assert len(queue.system_emails) == 5 == len(set(queue.system_emails))
    for email_id in queue.system_emails:
        assert system_mail.deliver(rt, email_id).value == "sent"
        assert system_mail.deliver(rt, email_id).value == "sent"  # redelivered: nothing more
    notices = [m for m in smtp_server.messages if m.rcpt_tos == ("agent-1@kw.example.com",)]
    assert [m.parsed()["Subject"] for m in notices] == [
        f"You have used {t}% of your Command Email sends this month" for t in (80, 85, 90, 95)
    ] + ["Command Email limit reached: sends are now failing"]
    body = notices[0].parsed().get_body(("plain",)).get_content()
    assert "Used: 16 of 20 sends, 4 left." in body
    assert "This period ends on November 30, 2026" in body
    assert "((" not in body and "))" not in body
    api = TestClient(create_api(rt, queue), headers={"Authorization": "Bearer test-token-123"})
    items = api.get("/v1/users/agent-1/notifications").json()["items"]
    assert [n["threshold"] for n in items] == [100, 95, 90, 85, 80]
    assert items[0]["title"] == "Limit reached: sends are now failing"
    assert api.get("/v1/users/agent-1/credits").json()["thresholds_notified"] == [
        80,
        85,
        90,
        95,
        100,
    ]


def test_a_jump_over_several_thresholds_notifies_the_highest_once(make_runtime: Any) -> None:
    rt = make_runtime(free_plan_credits=20, transport=MemoryTransport())
    make_user(rt)
    seed_used_credits(rt, "agent-1", 17)  # 85%, nothing notified yet
    [send_id] = submit(rt, "agent-1", 1)
    delivery.deliver(rt, send_id)  # 18 of 20: 90%
    assert notified(rt, "agent-1") == [90]
    assert credits(rt, "agent-1").thresholds_notified == [80, 85, 90]


def test_upgrade_re_arms_thresholds_against_the_new_total(make_runtime: Any) -> None:
    rt = make_runtime(
        free_plan_credits=20, plan_catalog=(("p40", 40, 1000),), transport=MemoryTransport()
    )
    make_user(rt)
    for i in submit(rt, "agent-1", 17):
        delivery.deliver(rt, i)
    assert notified(rt, "agent-1") == [80, 85]
    change(rt, "agent-1", "upgrade", "p40")
    for i in submit(rt, "agent-1", 32, start=100):
        delivery.deliver(rt, i)
    assert notified(rt, "agent-1") == [80, 85, 80]


def test_a_redelivered_send_does_not_notify_again(make_runtime: Any) -> None:
    rt = make_runtime(free_plan_credits=10, transport=MemoryTransport())
    make_user(rt)
    ids = submit(rt, "agent-1", 8)
    for i in ids:
        delivery.deliver(rt, i)
    for i in ids:
        delivery.deliver(rt, i)
    assert notified(rt, "agent-1") == [80]


def _race(settings: Settings, send_ids: list[str], start: Any) -> None:
    rt = Runtime(settings, transport=MemoryTransport())
    start.wait()
    for send_id in send_ids:
        delivery.deliver(rt, send_id)
    rt.close()


@pytest.mark.slow
def test_racing_processes_across_80_and_100_percent_notify_in_order_at_most_once(
    make_runtime: Any, smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(free_plan_credits=100, transport=MemoryTransport())
    mailer = make_runtime()  # the same database, with the real SMTP transport
    ctx = mp.get_context("fork")
    sent = 0
    for round_ in range(4):
        user = f"racer-{round_}"
        make_user(rt, user)
        seed_used_credits(rt, user, 76)  # the race crosses 80, 85, 90, 95 and 100
        ids = submit(rt, user, 32)
        start = ctx.Event()
        procs = [ctx.Process(target=_race, args=(rt.settings, ids[i::8], start)) for i in range(8)]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        # Each threshold at most once, never a lower one after a higher one, and the limit
        # always (a threshold is skipped only when a racer's higher one committed first).
        got = notified(rt, user)
        assert got == sorted(set(got)) and got[-1] == 100, f"round {round_}: {got}"
        sent += len(got)
        c = credits(rt, user)
        assert (c.used, c.remaining) == (100, 0)
        emails = notice_emails(rt, user)
        assert len(emails) == len(got)
        for e in sorted(emails, key=lambda e: e.notification_id or 0):
            system_mail.deliver(mailer, e.id)
    subjects = Counter(m.parsed()["Subject"] for m in smtp_server.messages)
    assert sum(subjects.values()) == sent and set(subjects.values()) <= {1, 2, 3, 4}
    assert subjects["Command Email limit reached: sends are now failing"] == 4


def test_redis_flushed_mid_stream_neither_overspends_nor_notifies_twice(
    make_runtime: Any,
) -> None:
    rt = make_runtime(free_plan_credits=60, transport=MemoryTransport())
    make_user(rt)
    ids = submit(rt, "agent-1", 90)
    stop = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while not stop.wait(0.02):
            rt.redis.flushall()
            flushes += 1

    def worker(chunk: list[str]) -> None:
        for send_id in chunk:
            # As a task retries any Redis error: a grant flushed away during each of its
            # rebuilds (GrantUnstable) is tried again, never a reason to stop delivering.
            for _ in range(100):
                try:
                    delivery.deliver(rt, send_id)
                    break
                except GrantUnstable:
                    continue

    f = threading.Thread(target=flusher)
    f.start()
    workers = [threading.Thread(target=worker, args=(ids[i::4],)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    f.join()
    assert flushes >= 3
    outbox = rt.transport.outbox  # type: ignore[attr-defined]
    sent = len(outbox)
    assert sent <= 60
    assert len({m for _, m in outbox}) == sent
    # Credits held only by sends caught between a claim and a flush come back once settled.
    assert sent >= 60 - 4 * flushes
    thresholds = notified(rt, "agent-1")
    assert len(thresholds) == len(set(thresholds))


def _notice_text(message: Any) -> str:
    return str(message.parsed().get_body(("plain",)).get_content())


def test_notices_state_the_crossing_figures_and_arrive_in_threshold_order(
    make_runtime: Any, smtp_server: DevSMTPServer
) -> None:
    """A bulk reservation from 78% to 99% names 95% with 95's figures (and says how far it
    went); the limit notice that follows waits until the 95% one has gone out."""
    rt = make_runtime(free_plan_credits=100)
    make_user(rt)
    seed_used_credits(rt, "agent-1", 78)
    _, grant = ensure_current(rt, "agent-1")
    jump = rt.quota.reserve(grant, "bulk-order", credits=21)
    assert notices.after_reservation(rt, grant, jump) == 95
    [send_id] = submit(rt, "agent-1", 1)
    assert delivery.deliver(rt, send_id).value == "sent"  # 100 of 100
    assert notified(rt, "agent-1") == [95, 100]
    with rt.sessions() as s:
        body95 = s.scalar(select(Notification.body).where(Notification.threshold == 95))
    assert body95 is not None and body95.startswith("95 of 100 sends used this month, 5 left.")
    assert "took usage on to 99" in body95
    by_threshold = {
        t: e.id
        for e in notice_emails(rt, "agent-1")
        for t in notified(rt, "agent-1")
        if e.subject.startswith("Command Email limit") == (t == 100)
    }
    # The limit notice is asked first: it waits, without an attempt, for the 95% one.
    with pytest.raises(NotAttempted) as waited:
        system_mail.deliver(rt, by_threshold[100])
    assert waited.value.reason == Reason.EARLIER_NOTICE_PENDING
    assert system_mail.deliver(rt, by_threshold[95]).value == "sent"
    assert system_mail.deliver(rt, by_threshold[100]).value == "sent"
    mails = [m for m in smtp_server.messages if m.rcpt_tos == ("agent-1@kw.example.com",)]
    assert [m.parsed()["Subject"] for m in mails] == [
        "You have used 95% of your Command Email sends this month",
        "Command Email limit reached: sends are now failing",
    ]
    text95 = _notice_text(mails[0])
    assert "Used: 95 of 100 sends, 5 left. The same send or campaign took usage on to 99." in text95
    for line in text95.splitlines():  # sentences are never broken across lines
        assert not line or line.endswith((".", ":")), line


def test_a_threshold_crossed_after_a_higher_one_was_notified_is_not(make_runtime: Any) -> None:
    """Two racers crossed 95% and 100%, and the 100% one committed first: no 95% after it."""
    rt = make_runtime(free_plan_credits=100, transport=MemoryTransport())
    make_user(rt)
    seed_used_credits(rt, "agent-1", 99)
    [send_id] = submit(rt, "agent-1", 1)
    delivery.deliver(rt, send_id)
    assert notified(rt, "agent-1") == [100]
    _, grant = ensure_current(rt, "agent-1")
    late = Reservation(granted=True, replay=False, used=96, total=100, threshold=95)
    assert notices.after_reservation(rt, grant, late) is None
    assert notified(rt, "agent-1") == [100]
