"""The fault matrix: one test per way the SMTP relay can misbehave, against a real aiosmtpd
server told what to do by a FaultPlan, real Redis and the SQL ledger.

Each test asserts what the server received, what the timeline says, whether the address is
suppressed and what happened to the credit.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select

from devstack.devsmtp import (
    DROP_AFTER_DATA,
    DROP_BEFORE_DATA,
    DevSMTPServer,
    FaultPlan,
    reply,
    slow,
)
from dispatcher import alerts
from dispatcher import recovery as outbox
from dispatcher.campaigns import control, create
from dispatcher.campaigns.run import deliver as deliver_chunk
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import lifecycle, relay, suppression
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.ratelimit import RateLimit, RelayRateLimiter
from dispatcher.delivery.transports.smtp import SMTPConfig, SMTPTransport
from dispatcher.errors import DeliveryDeferred, NotAttempted
from dispatcher.models import CampaignStatus, Send, SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import SubmitResult, get_send, submit_batch, submit_send
from tests.helpers import (
    campaign_request,
    make_user,
    reserved_attempts,
    send_request,
    timeline_rows,
)

ADDRESS = "contact1@example.org"


def used(rt: Runtime) -> int:
    return credits(rt, "agent-1").used


def suppressed(rt: Runtime, email: str = ADDRESS) -> str | None:
    with rt.sessions() as session:
        return suppression.reason_for(session, "agent-1", email, rt.clock.now())


def one_send(rt: Runtime) -> str:
    make_user(rt)
    return submit_send(rt, InlineQueue(), send_request()).send_id


def events(rt: Runtime) -> list[tuple[str, str | None]]:
    return [(e.kind.value, e.reason) for e in timeline_rows(rt, "agent-1")]


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(reply("421 4.7.0 too many connections, slow down"), id="421-at-rcpt"),
        pytest.param(reply("451 4.3.0 local error, try later", stage="data"), id="451-at-data"),
        pytest.param(DROP_BEFORE_DATA, id="drop-before-data"),
    ],
)
def test_transient_faults_keep_the_credit_and_the_retry_sends_exactly_once(
    runtime: Runtime, smtp_server: DevSMTPServer, fault: Any
) -> None:
    send_id = one_send(runtime)
    smtp_server.handler.fault = FaultPlan(by_recipient={ADDRESS: [fault]})

    with pytest.raises(DeliveryDeferred):
        delivery.deliver(runtime, send_id)
    assert smtp_server.messages == []
    view = get_send(runtime, send_id)
    assert view.status == "reserved" and used(runtime) == 1  # credit held for the retry
    assert events(runtime) == []  # nothing terminal yet

    assert delivery.deliver(runtime, send_id) is SendStatus.SENT
    assert [m.rcpt_tos for m in smtp_server.messages] == [(ADDRESS,)]
    assert events(runtime) == [("email_sent", None)]
    assert used(runtime) == 1 and suppressed(runtime) is None


def test_550_hard_bounce_fails_suppresses_the_address_and_returns_the_credit(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    send_id = one_send(runtime)
    smtp_server.handler.fault = FaultPlan(
        by_recipient={ADDRESS: [reply("550 5.1.1 <contact1@example.org>: no such user")]}
    )

    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED

    assert smtp_server.messages == []
    assert events(runtime) == [("email_failed", "hard_bounce")]
    assert suppressed(runtime) == "hard_bounce"
    assert used(runtime) == 0
    # The next SmartPlan step to that address is refused before any credit is taken.
    again = submit_send(runtime, InlineQueue(), send_request(step_id="step-2")).send_id
    assert delivery.deliver(runtime, again) is SendStatus.FAILED
    assert get_send(runtime, again).reason == "suppressed"
    assert smtp_server.handler.attempts == 0 and used(runtime) == 0


def test_554_policy_refusal_fails_the_message_alerts_and_does_not_suppress(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    send_id = one_send(runtime)
    smtp_server.handler.fault = FaultPlan(
        by_recipient={ADDRESS: [reply("554 5.7.1 message refused: spam content", stage="data")]}
    )

    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED

    assert smtp_server.messages == []
    assert events(runtime) == [("email_failed", "policy_rejected")]
    assert suppressed(runtime) is None
    assert used(runtime) == 0
    [alert] = alerts.recent(runtime).items
    assert (alert.kind, alert.user_id) == ("policy_rejected", "agent-1")


def test_554_policy_refusal_in_a_campaign_pauses_it_and_alerts(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(campaign_chunk_size=50, smtp_pool_size=1)
    make_user(rt)
    smtp_server.handler.fault = FaultPlan(
        schedule=[None] * 3 + [reply("554 5.7.1 refused for policy reasons", stage="data")]
    )
    view, _ = create.create(rt, campaign_request(120))  # chunks of 50
    assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.PAUSED

    after = control.view(rt, view.id)
    assert after.status == "paused" and "policy" in (after.detail or "")
    assert after.failed_by_reason == {"policy_rejected": 1}
    sent = after.counts["sent"]
    assert len(smtp_server.messages) == sent == 3  # no message started after the refusal
    assert after.counts["reserved"] == 116  # the rest of the chunk and the others wait
    assert suppressed(rt, "person3@example.org") is None
    assert used(rt) == 119  # the refused one's credit is back
    [alert] = alerts.recent(rt).items
    assert (alert.kind, alert.campaign_id) == ("policy_rejected", view.id)
    # A chunk task still in the queue sends nothing while paused.
    assert deliver_chunk(rt, f"{view.id}:1") is CampaignStatus.PAUSED
    assert len(smtp_server.messages) == 3


def test_a_policy_refusal_pauses_even_a_small_campaign_and_resume_completes_it(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    # Given a 21-recipient campaign whose third recipient's message the relay refuses (554)
    rt = runtime  # 8 SMTP connections
    make_user(rt)
    plan = FaultPlan(
        by_recipient={"person2@example.org": [reply("554 5.7.1 refused: content", stage="data")]}
    )
    refused_at: list[float] = []

    def fault(stage: str, got: Any) -> Any:
        action = plan(stage, got)
        if stage == "data" and action is not None:
            refused_at.append(time.time())
        return action

    smtp_server.handler.fault = fault
    view, _ = create.create(rt, campaign_request(21))

    # When its chunk runs: only conversations already under way finish after the refusal
    assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.PAUSED
    started_after = [t for t in smtp_server.handler.mail_at if t > refused_at[0]]
    assert len(started_after) <= rt.settings.smtp_pool_size - 1
    paused = control.view(rt, view.id)
    assert paused.failed_by_reason == {"policy_rejected": 1}
    assert paused.counts["sent"] == len(smtp_server.messages) < 20
    assert paused.counts["sending"] == 0 and "paused" in (paused.detail or "")
    assert [a.kind for a in alerts.recent(rt).items] == ["policy_rejected"]

    # Then a resume goes on where it stopped, and nobody gets two copies
    control.resume(rt, view.id, queue=InlineQueue())
    assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.COMPLETED
    done = control.view(rt, view.id)
    assert (done.counts["sent"], done.failed_by_reason) == (20, {"policy_rejected": 1})
    got = Counter(m.rcpt_tos[0] for m in smtp_server.messages)
    assert len(got) == 20 and max(got.values()) == 1
    assert "person2@example.org" not in got
    assert len(alerts.recent(rt).items) == 1


def test_recipients_deferred_beside_a_policy_refusal_are_kept_for_the_resume(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(campaign_chunk_size=50, smtp_pool_size=1)
    make_user(rt)
    smtp_server.handler.fault = FaultPlan(
        by_recipient={
            "person1@example.org": [reply("451 4.3.0 later")],
            "person2@example.org": [reply("554 5.7.1 policy", stage="data")],
        }
    )
    view, _ = create.create(rt, campaign_request(60))
    assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.PAUSED
    after = control.view(rt, view.id)
    assert after.counts["sending"] == 0  # nobody left behind a lease
    control.resume(rt, view.id, queue=InlineQueue())
    for chunk in (0, 1):
        deliver_chunk(rt, f"{view.id}:{chunk}")
    done = control.view(rt, view.id)
    assert (done.status, done.counts["sent"], done.failed_by_reason) == (
        "completed",
        59,
        {"policy_rejected": 1},
    )
    got = Counter(m.rcpt_tos[0] for m in smtp_server.messages)
    assert got["person1@example.org"] == 1 and max(got.values()) == 1


def test_connection_dropped_after_data_is_unknown_keeps_the_credit_and_is_never_resent(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    send_id = one_send(runtime)
    smtp_server.handler.fault = FaultPlan(by_recipient={ADDRESS: [DROP_AFTER_DATA]})

    assert delivery.deliver(runtime, send_id) is SendStatus.UNKNOWN
    assert delivery.deliver(runtime, send_id) is SendStatus.UNKNOWN  # a redelivery

    assert len(smtp_server.messages) == 1  # the server had it once; never offered again
    assert events(runtime) == [("email_unknown", "ambiguous_delivery")]
    assert used(runtime) == 1 and suppressed(runtime) is None


def test_no_reply_to_the_final_dot_within_the_timeout_is_unknown(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(smtp_timeout=2.0)
    send_id = one_send(rt)
    smtp_server.handler.fault = FaultPlan(by_recipient={ADDRESS: [slow(4.0)]})

    assert delivery.deliver(rt, send_id) is SendStatus.UNKNOWN

    assert events(rt) == [("email_unknown", "ambiguous_delivery")]
    assert used(rt) == 1
    assert smtp_server.handler.attempts == 1


def test_a_slow_reply_within_the_timeout_is_sent(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    send_id = one_send(runtime)
    smtp_server.handler.fault = FaultPlan(by_recipient={ADDRESS: [slow(0.5)]})

    assert delivery.deliver(runtime, send_id) is SendStatus.SENT
    assert len(smtp_server.messages) == 1 and used(runtime) == 1


def test_a_clear_relay_is_asked_about_once_a_second_and_a_halt_is_seen_within_it(
    make_runtime: Callable[..., Runtime], redis_client: redis.Redis, monkeypatch: Any
) -> None:
    monkeypatch.setattr(relay, "CLEAR_SECONDS", 0.3)
    worker, other_worker = make_runtime(), make_runtime()

    # Fifty messages checked on a clear relay ask Redis once
    before = _gets(redis_client)
    for _ in range(50):
        worker.relay.check()
    assert _gets(redis_client) - before == 1

    # A halt another worker sets is seen once the clear answer is older than CLEAR_SECONDS
    other_worker.relay.halt("535 5.7.8 authentication failed (at login)")
    time.sleep(0.35)
    with pytest.raises(NotAttempted) as held:
        worker.relay.check()
    assert held.value.reason == "relay_halted"
    with pytest.raises(NotAttempted):
        worker.relay.check()  # a halt is never reused: asked again, still halted

    # Lifted, the next message goes; a halt this worker sets holds back its next one at once
    assert other_worker.relay.resume()
    worker.relay.check()
    worker.relay.check()
    worker.relay.halt("535 5.7.8 authentication failed (at login)")
    with pytest.raises(NotAttempted):
        worker.relay.check()


def _gets(client: redis.Redis) -> int:
    """How many GET commands the Redis server has run."""
    calls: int = client.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    return calls


def test_refused_credentials_halt_the_relay_for_every_worker_and_alert_once(
    make_runtime: Callable[..., Runtime],
) -> None:
    server = DevSMTPServer(credentials=("relay-user", "right-password"))
    server.start()
    try:
        rt = make_runtime(
            smtp_port=server.port,
            smtp_username="relay-user",
            smtp_password="wrong-password",
            smtp_allow_plaintext_auth=True,  # a relay on loopback (TLS: test_tls.py)
        )
        other_worker = make_runtime(
            smtp_port=server.port,
            smtp_username="relay-user",
            smtp_password="wrong-password",
            smtp_allow_plaintext_auth=True,  # a relay on loopback (TLS: test_tls.py)
        )
        make_user(rt)
        first = submit_send(rt, InlineQueue(), send_request()).send_id
        second = submit_send(rt, InlineQueue(), send_request(n=2)).send_id

        with pytest.raises(NotAttempted) as halted:
            delivery.deliver(rt, first)
        assert halted.value.reason == "relay_halted"
        with pytest.raises(NotAttempted):
            delivery.deliver(other_worker, second)  # held back without connecting

        assert server.messages == []
        assert [get_send(rt, s).attempts for s in (first, second)] == [0, 0]
        assert [get_send(rt, s).status for s in (first, second)] == ["reserved", "reserved"]
        assert used(rt) == 2 and events(rt) == []  # credits held, nothing failed
        [alert] = alerts.recent(rt).items
        assert alert.kind == "smtp_auth_failed" and "535" in alert.detail
        assert "wrong-password" not in alert.detail

        # Ops fix the password and lift the halt: both go, once each.
        fixed = make_runtime(
            smtp_port=server.port,
            smtp_username="relay-user",
            smtp_password="right-password",
            smtp_allow_plaintext_auth=True,
        )
        assert fixed.relay.resume()
        assert delivery.deliver(fixed, first) is SendStatus.SENT
        assert delivery.deliver(fixed, second) is SendStatus.SENT
        assert sorted(m.rcpt_tos[0] for m in server.messages) == [
            "contact1@example.org",
            "contact2@example.org",
        ]
        assert used(rt) == 2
    finally:
        server.stop()


def test_a_partial_refusal_of_recipients_is_read_from_the_replies(
    smtp_server: DevSMTPServer,
) -> None:
    import asyncio

    smtp_server.handler.fault = FaultPlan(
        by_recipient={"gone@example.org": [reply("550 5.1.1 no such user")]}
    )
    transport = SMTPTransport(SMTPConfig("127.0.0.1", smtp_server.port, timeout=5))
    envelope = Envelope("bounces@mail.example.com", ("gone@example.org", "here@example.org"))
    message = b"Subject: hi\r\nMessage-ID: <partial@x>\r\n\r\nhello\r\n"

    result = asyncio.run(transport.send(envelope, message))

    assert result.refused == {"gone@example.org": (550, "5.1.1 no such user")}
    [got] = smtp_server.messages
    assert got.rcpt_tos == ("here@example.org",)


def test_a_send_stuck_in_reserved_past_its_hold_gets_its_credit_back_fenced(
    runtime: Runtime, smtp_server: DevSMTPServer, clock: Any
) -> None:
    send_id = one_send(runtime)
    smtp_server.handler.fault = FaultPlan(by_recipient={ADDRESS: [reply("451 4.3.0 later")]})
    with pytest.raises(DeliveryDeferred):
        delivery.deliver(runtime, send_id)  # reserved, credit held, then its task is lost
    assert used(runtime) == 1

    # Within the hold the sweeper leaves it alone.
    clock.advance(timedelta(seconds=lifecycle.reservation_hold(runtime).total_seconds() - 1))
    assert outbox.expire_reservations(runtime) == 0

    # A worker picks it up at the last moment: it renews the hold, so a sweeper that read the
    # old lease loses its compare-and-set and takes nothing from a send in progress.
    with runtime.sessions() as session:
        old_lease = session.scalar(select(Send.lease_until).where(Send.id == send_id))
    assert old_lease is not None
    clock.advance(timedelta(seconds=2))
    assert delivery.deliver(runtime, send_id) is SendStatus.SENT
    assert not delivery.expire_reservation(runtime, send_id, old_lease)
    assert get_send(runtime, send_id).status == "sent" and used(runtime) == 1

    # A second send whose task is gone for good: past the hold, the credit comes back and the
    # step gets its terminal outcome.
    other = submit_send(runtime, InlineQueue(), send_request(n=2)).send_id
    smtp_server.handler.fault = FaultPlan(schedule=[reply("451 4.3.0 later")])
    with pytest.raises(DeliveryDeferred):
        delivery.deliver(runtime, other)
    assert used(runtime) == 2
    # Past the hold but never enqueued again since: it may only be late, so it is left alone;
    # the stale-work sweep enqueues it again instead.
    runtime.queue = InlineQueue()
    clock.advance(timedelta(seconds=lifecycle.reservation_hold(runtime).total_seconds() + 1))
    assert outbox.expire_reservations(runtime) == 0
    assert outbox.recover_stale(runtime)[0] == 1
    # That task too was lost: a whole stale period later, the credit comes back.
    clock.advance(lifecycle.stale_after(runtime) + timedelta(seconds=1))
    assert outbox.expire_reservations(runtime) == 1
    view = get_send(runtime, other)
    assert (view.status, view.reason) == ("failed", "reservation_expired")
    assert used(runtime) == 1
    # A late redelivery of its task finds it settled and sends nothing.
    assert delivery.deliver(runtime, other) is SendStatus.FAILED
    assert len(smtp_server.messages) == 1


def test_a_wait_longer_than_any_countdown_is_parked_and_picked_up_by_the_beat_sweep(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer, clock: Any
) -> None:
    from celery.contrib.testing.worker import start_worker

    from tests.helpers import wait_for
    from workers.app import create_app
    from workers.queue import CeleryTaskQueue

    rt = make_runtime(smtp_rate_per_hour=1)  # a send must wait about an hour
    app = create_app(rt.settings, rt)
    make_user(rt)
    queue = CeleryTaskQueue(app)
    # The hour's one message went out a moment ago (through another worker, say).
    hourly = RelayRateLimiter(rt.redis, rt.relay.relay, RateLimit.from_settings(rt.settings))
    assert hourly.try_acquire() == 0.0
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        second = submit_send(rt, queue, send_request(n=2)).send_id

        def parked() -> bool:
            with rt.sessions() as session:
                return session.scalar(select(Send.retry_at).where(Send.id == second)) is not None

        wait_for(parked, what="second parked")
        view = get_send(rt, second)
        assert (view.status, view.attempts) == ("reserved", 0)  # credit held, not an attempt
        with rt.sessions() as session:
            due = session.scalar(select(Send.retry_at).where(Send.id == second))
        assert due is not None
        assert 3000 < (due - clock.now()).total_seconds() <= 3601
        assert smtp_server.messages == []

        # Beat's sweep leaves it until it is due, then hands it to the broker again.
        inline = InlineQueue()
        rt.queue = inline
        outbox.sweep(rt)
        assert second not in inline.enqueued
        clock.advance(timedelta(seconds=3601))
        outbox.sweep(rt)
        assert second in inline.enqueued
        with rt.sessions() as session:
            assert session.scalar(select(Send.retry_at).where(Send.id == second)) is None
    assert used(rt) == 1  # its credit, held while it waits


def test_steps_of_a_batch_that_must_wait_longer_than_any_countdown_are_parked(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer, clock: Any
) -> None:
    """A batch task whose steps the relay's hourly limit holds back for about an hour parks
    each of them in SQL, as a single send's task does (a countdown that long the Redis broker
    would redeliver early); the sweep hands them to the broker when due."""
    from celery.contrib.testing.worker import start_worker

    from tests.helpers import wait_for
    from workers.app import create_app
    from workers.queue import CeleryTaskQueue

    rt = make_runtime(smtp_rate_per_hour=1)
    app = create_app(rt.settings, rt)
    make_user(rt)
    hourly = RelayRateLimiter(rt.redis, rt.relay.relay, RateLimit.from_settings(rt.settings))
    assert hourly.try_acquire() == 0.0  # the hour's one message went out a moment ago
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        answers = submit_batch(rt, CeleryTaskQueue(app), [send_request(n=n) for n in (1, 2, 3)])
        ids = [a.send_id for a in answers if isinstance(a, SubmitResult)]
        assert len(ids) == 3

        def due() -> dict[str, Any]:
            with rt.sessions() as session:
                rows = session.execute(select(Send.id, Send.retry_at).where(Send.id.in_(ids))).all()
            return {i: at for i, at in rows if at is not None}

        wait_for(lambda: len(due()) == 3, what="the batch's steps parked")
        for send_id, at in due().items():
            view = get_send(rt, send_id)
            assert (view.status, view.attempts) == ("reserved", 0)  # credit held, no attempt
            assert 3000 < (at - clock.now()).total_seconds() <= 3601
        assert smtp_server.messages == []
        inline = InlineQueue()
        rt.queue = inline
        outbox.sweep(rt)
        assert not set(ids) & set(inline.enqueued)
        clock.advance(timedelta(seconds=3601))
        outbox.sweep(rt)
        assert set(ids) <= set(inline.enqueued)
    assert used(rt) == 3  # their credits, held while they wait


def test_a_relay_guard_that_cannot_be_asked_holds_the_message_back_not_unknown(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from dispatcher.delivery.ratelimit import RateLimit
    from dispatcher.delivery.relay import RelayGuard
    from tests.conftest import free_port

    # Nothing listens there: every call to the guard fails at once.
    dead = redis_lib.Redis(
        port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    guard = RelayGuard(
        dead, "test", limit=RateLimit(per_second=10), halt_seconds=60, on_halt=lambda _d: None
    )
    transport = SMTPTransport(
        SMTPConfig("127.0.0.1", smtp_server.port, timeout=5), pool_size=2, guard=guard
    )
    rt = make_runtime(transport=transport)
    send_id = one_send(rt)

    with pytest.raises(NotAttempted) as held:
        delivery.deliver(rt, send_id)
    assert held.value.reason == "guard_unavailable"
    view = get_send(rt, send_id)
    assert (view.status, view.attempts) == ("reserved", 0)  # not sending, not unknown
    assert smtp_server.messages == [] and events(rt) == []

    rt2 = make_runtime(campaign_chunk_size=50, transport=transport)
    view2, _ = create.create(rt2, campaign_request(5))
    with pytest.raises(NotAttempted):
        deliver_chunk(rt2, f"{view2.id}:0")
    after = control.view(rt2, view2.id)
    assert after.counts["reserved"] == 5 and after.counts["unknown"] == 0
    assert smtp_server.messages == []


def test_a_throttled_chunk_yields_before_its_time_limit_leaving_nobody_behind(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    rt = make_runtime(
        campaign_chunk_size=50,
        smtp_pool_size=4,
        smtp_rate_per_second=10,
        task_time_limit=6,  # the chunk stops starting messages after 3 s
        send_lease_seconds=10,
    )
    make_user(rt)
    view, _ = create.create(rt, campaign_request(50))
    with pytest.raises(NotAttempted) as held:
        deliver_chunk(rt, f"{view.id}:0")
    assert held.value.reason == "chunk_yield"
    after = control.view(rt, view.id)
    sent = after.counts["sent"]
    assert 1 <= sent <= 45, sent  # about three seconds' worth at 10/s, never all 50
    assert after.counts["reserved"] == 50 - sent  # the rest waits for the retry, unattempted
    assert after.counts["sending"] == after.counts["unknown"] == 0
    assert reserved_attempts(rt, view.id) == {0}
    assert len(smtp_server.messages) == sent


def test_a_system_email_held_back_by_a_halted_relay_is_queued_not_lost(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    from dispatcher.credits.subscriptions import change
    from dispatcher.delivery import system_mail
    from dispatcher.models import SystemEmail

    make_user(runtime)
    change(runtime, "agent-1", "upgrade", "10k")  # a receipt to send
    with runtime.sessions() as session:
        [email] = session.scalars(select(SystemEmail)).all()
    runtime.relay.halt("535 5.7.8 authentication failed (at login)")

    with pytest.raises(NotAttempted):
        system_mail.deliver(runtime, email.id)
    with runtime.sessions() as session:
        row = session.get(SystemEmail, email.id)
        assert row is not None and (row.status, row.attempts) == (SendStatus.QUEUED, 0)

    runtime.relay.resume()
    assert system_mail.deliver(runtime, email.id) is SendStatus.SENT
    assert len(smtp_server.messages) == 1
