"""The delivery use case, without a broker, against real Redis, databases and SMTP server."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from devstack.devsmtp import DROP, DevSMTPServer
from dispatcher.credits.subscriptions import credits, ensure_current
from dispatcher.delivery import returnpath
from dispatcher.delivery import smartplan as delivery
from dispatcher.errors import DeliveryDeferred, SendBusy
from dispatcher.models import SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import get_send, submit_send
from tests.helpers import make_user, seed_used_credits, send_request, statuses, timeline_rows


def credits_used(rt: Runtime, user: str = "agent-1") -> int:
    return credits(rt, user).used


def test_a_send_is_rendered_sent_and_written_to_the_timeline(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    queue = InlineQueue()
    result = submit_send(runtime, queue, send_request(merge_fields={"first_name": "<Ann>"}))
    assert queue.enqueued == [result.send_id]

    assert delivery.deliver(runtime, result.send_id) is SendStatus.SENT

    [got] = smtp_server.messages
    msg = got.parsed()
    assert got.rcpt_tos == ("contact1@example.org",)
    # The return path names this send, signed (VERP): its bounces come back to us.
    assert got.mail_from == returnpath.address_for(runtime.settings, result.send_id)
    assert re.fullmatch(r"bounce\+[0-9a-f]{32}-[a-z2-7]{16}@mail\.example\.com", got.mail_from)
    assert msg["X-PM-Metadata-ced_return_path"] is None  # only when mail goes through Postmark
    assert msg["Subject"] == "Hello <Ann>"
    # kw.example.com is not a sending domain: the platform sends for the agent.
    assert msg["From"] == "Command Email <bounces@mail.example.com>"
    assert msg["Reply-To"] == "agent-1@kw.example.com"
    assert msg["Message-ID"] == get_send(runtime, result.send_id).message_id
    assert msg["Date"]
    html = msg.get_body(("html",)).get_content()
    assert "Hi &lt;Ann&gt;, your home value report" in html
    assert "Hi <Ann>, your home value report" in msg.get_body(("plain",)).get_content()
    assert b"\r\n" in got.data and b"\n" not in got.data.replace(b"\r\n", b"")
    [event] = timeline_rows(runtime, "agent-1")
    assert (event.kind.value, event.subject, event.contact_id) == (
        "email_sent",
        "Hello <Ann>",
        "contact-1",
    )
    assert event.source == {
        "type": "smartplan",
        "smartplan_id": "plan-7",
        "run_id": "run-1",
        "step_id": "step-1",
    }
    assert credits_used(runtime) == 1


def test_exhausted_send_fails_at_once_and_is_written_to_the_timeline(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", runtime.settings.free_plan_credits)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id

    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED

    assert smtp_server.messages == []
    view = get_send(runtime, send_id)
    assert (view.status, view.reason, view.attempts) == ("failed", "quota_exhausted", 0)
    [event] = timeline_rows(runtime, "agent-1")
    assert (event.kind.value, event.reason) == ("email_failed", "quota_exhausted")
    assert "5000 of 5000" in (event.detail or "")


def test_delivering_the_same_send_twice_sends_one_message_and_takes_one_credit(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id) is SendStatus.SENT
    assert delivery.deliver(runtime, send_id) is SendStatus.SENT
    assert len(smtp_server.messages) == 1
    assert credits_used(runtime) == 1
    assert len(timeline_rows(runtime, "agent-1")) == 1
    assert runtime.redis.xlen(runtime.settings.outcome_stream) == 1


def test_permanent_rejection_fails_and_returns_the_credit(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    smtp_server.handler.fault = lambda stage, _r: (
        "550 5.1.1 no such user" if stage == "rcpt" else None
    )
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED
    view = get_send(runtime, send_id)
    assert view.reason == "hard_bounce" and "550" in (view.detail or "")
    assert credits_used(runtime) == 0


def test_deferral_is_raised_for_retry_keeping_the_credit_then_sent(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    answers = iter(["451 4.3.0 try again later"])
    smtp_server.handler.fault = lambda stage, _r: next(answers, None) if stage == "data" else None
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    with pytest.raises(DeliveryDeferred):
        delivery.deliver(runtime, send_id)
    assert get_send(runtime, send_id).status == "reserved"
    assert credits_used(runtime) == 1
    assert delivery.deliver(runtime, send_id) is SendStatus.SENT
    assert len(smtp_server.messages) == 1 and credits_used(runtime) == 1


def test_deferral_on_the_final_attempt_fails_and_returns_the_credit(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    runtime = make_runtime(send_max_retries=0)  # the first attempt is the last
    make_user(runtime)
    smtp_server.handler.fault = lambda stage, _r: "421 4.7.0 busy" if stage == "data" else None
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED
    assert get_send(runtime, send_id).reason == "retries_exhausted"
    assert credits_used(runtime) == 0


def test_connection_lost_after_data_is_unknown_keeps_the_credit_and_is_not_resent(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    smtp_server.handler.fault = lambda stage, _r: DROP if stage == "data" else None
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id) is SendStatus.UNKNOWN
    smtp_server.handler.fault = None
    assert delivery.deliver(runtime, send_id) is SendStatus.UNKNOWN
    assert smtp_server.handler.attempts == 1
    assert credits_used(runtime) == 1
    [event] = timeline_rows(runtime, "agent-1")
    assert event.kind.value == "email_unknown"


def test_connection_refused_is_transient(runtime: Runtime, make_runtime: object) -> None:
    from tests.conftest import free_port

    rt = make_runtime(smtp_port=free_port())  # type: ignore[operator]
    make_user(rt)
    send_id = submit_send(rt, InlineQueue(), send_request()).send_id
    with pytest.raises(DeliveryDeferred) as info:
        delivery.deliver(rt, send_id)
    assert info.value.reason == "connect_failed"


def test_template_reaching_python_internals_fails_at_render_and_returns_the_credit(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    req = send_request(html="<p>{{ ''.__class__.__mro__[1].__subclasses__() }}</p>")
    send_id = submit_send(runtime, InlineQueue(), req).send_id
    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED
    view = get_send(runtime, send_id)
    assert view.reason == "render_error" and "sandbox" in (view.detail or "")
    assert smtp_server.messages == [] and credits_used(runtime) == 0
    [event] = timeline_rows(runtime, "agent-1")
    assert event.reason == "render_error"


def test_a_send_held_by_a_live_lease_is_busy_and_an_expired_one_becomes_unknown(
    runtime: Runtime, smtp_server: DevSMTPServer, clock: object
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from dispatcher.models import Send

    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    # Given a worker that took the credit and the lease, then died mid-conversation
    _, grant = ensure_current(runtime, "agent-1")
    runtime.quota.reserve(grant, send_request().idempotency_key)
    lease = runtime.clock.now() + timedelta(seconds=60)
    with runtime.sessions.begin() as s:
        s.execute(
            update(Send)
            .where(Send.id == send_id)
            .values(status=SendStatus.SENDING, lease_until=lease, period="2026-11", grant_seq=1)
        )
    # When the task is redelivered while the lease is live, it waits
    with pytest.raises(SendBusy) as busy:
        delivery.deliver(runtime, send_id)
    assert 55 < busy.value.retry_after <= 61
    # And once the lease has run out, the send is unknown: never resent, credit kept
    clock.advance(timedelta(seconds=61))  # type: ignore[attr-defined]
    assert delivery.deliver(runtime, send_id) is SendStatus.UNKNOWN
    assert smtp_server.messages == [] and credits_used(runtime) == 1
    assert get_send(runtime, send_id).reason == "worker_lost_during_smtp"


def test_two_credits_left_and_four_sends(runtime: Runtime, smtp_server: DevSMTPServer) -> None:
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", runtime.settings.free_plan_credits - 2)
    ids = [submit_send(runtime, InlineQueue(), send_request(n=n)).send_id for n in range(4)]
    results = [delivery.deliver(runtime, i).value for i in ids]
    assert results == ["sent", "sent", "failed", "failed"]
    assert statuses(runtime, "agent-1") == {"sent": 2, "failed": 2}
    assert len(smtp_server.messages) == 2
    assert credits_used(runtime) == runtime.settings.free_plan_credits


def test_the_retry_budget_is_the_sends_own_smtp_attempts(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    # Waits for a lease or for Redis retry the task too; only SMTP attempts count here.
    make_user(runtime)
    smtp_server.handler.fault = lambda stage, _r: "451 4.3.0 later" if stage == "data" else None
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    for _ in range(runtime.settings.send_max_retries):
        with pytest.raises(DeliveryDeferred):
            delivery.deliver(runtime, send_id)
    assert delivery.deliver(runtime, send_id) is SendStatus.FAILED
    view = get_send(runtime, send_id)
    assert (view.reason, view.attempts) == (
        "retries_exhausted",
        runtime.settings.send_max_retries + 1,
    )
    assert credits_used(runtime) == 0
