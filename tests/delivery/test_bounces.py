"""Bounces and complaints after delivery, by mail: the per-message return path (VERP), DSNs
(RFC 3464) and complaint reports (ARF, RFC 5965) delivered to the real inbound SMTP server.

Campaigns go through the HTTP API, the broker and a real Celery worker to a real SMTP server;
the reports come back over SMTP to the inbound server as a relay or mailbox provider sends them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher import recovery
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import inbound, returnpath, suppression
from dispatcher.delivery import smartplan as delivery
from dispatcher.models import FeedbackEvent
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import get_send, submit_send
from tests.conftest import free_port
from tests.helpers import campaign_body, make_user, run_campaign, send_request, timeline_rows

RELAY = "relay.example.net"


def dsn(original: Received, *, action: str = "failed", status: str = "5.1.1") -> bytes:
    """A DSN as Postfix writes it: the human part, the delivery-status part, the original's
    headers."""
    recipient = original.rcpt_tos[0]
    headers = original.data.split(b"\r\n\r\n", 1)[0].decode()
    return (
        f"From: MAILER-DAEMON@{RELAY}\r\n"
        f"To: {original.mail_from}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        "\r\n"
        "--B1\r\nContent-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
        "--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {RELAY}\r\n"
        "Arrival-Date: Tue, 10 Nov 2026 15:00:00 +0000\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: dns; mx.example.org\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected: "
        "User unknown in virtual mailbox table\r\n"
        "\r\n"
        "--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{headers}\r\n"
        "--B1--\r\n"
    ).encode()


def arf(original: Received, to: str) -> bytes:
    """A complaint report as RFC 5965's example shows it, with the original attached."""
    recipient = original.rcpt_tos[0]
    return (
        "From: <abusedesk@mailbox.example.net>\r\n"
        f"To: <{to}>\r\n"
        "Subject: FW: Earn money\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="part1"\r\n'
        "\r\n"
        '--part1\r\nContent-Type: text/plain; charset="US-ASCII"\r\n\r\n'
        "This is an email abuse report for an email message received from IP 192.0.2.1\r\n\r\n"
        "--part1\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\n"
        "User-Agent: SomeGenerator/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Mail-From: <{original.mail_from}>\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n"
        "Arrival-Date: Tue, 10 Nov 2026 15:00:00 +0000\r\n"
        "Source-IP: 192.0.2.1\r\n"
        "\r\n"
        "--part1\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        f"Return-Path: <{original.mail_from}>\r\n".encode().decode()
        + original.data.decode()
        + "\r\n--part1--\r\n"
    ).encode()


@pytest.fixture
def inbound_server(runtime: Runtime) -> Iterator[int]:
    """The inbound SMTP server over the test's runtime; yields its port."""
    port = free_port()
    server: Controller = inbound.start(runtime, "127.0.0.1", port)
    yield port
    server.stop()


def deliver_report(port: int, to: str, data: bytes) -> tuple[int, str]:
    """Send a report as a relay does: null sender, one recipient; the server's answer."""

    async def go() -> tuple[int, str]:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
            await client.mail("")
            await client.rcpt(to)
            reply = await client.data(data)
            return reply.code, reply.message

    return asyncio.run(go())


def reason_of(rt: Runtime, email: str) -> str | None:
    """Why agent-1's list suppresses ``email`` (None: it does not)."""
    with rt.sessions() as session:
        return suppression.reason_for(session, "agent-1", email, rt.clock.now())


def to(smtp: DevSMTPServer, address: str) -> Received:
    [found] = [m for m in smtp.messages if m.rcpt_tos == (address,)]
    return found


def test_a_dsn_suppresses_the_address_shows_bounced_on_the_send_and_the_next_campaign_skips_it(
    runtime: Runtime,
    api_client: Any,
    smtp_server: DevSMTPServer,
    worker: Any,
    inbound_server: int,
) -> None:
    # Given a campaign the relay took for all three recipients (three credits spent)
    make_user(runtime)
    first = run_campaign(api_client, campaign_body(range(3)))
    assert credits(runtime, "agent-1").used == 3
    original = to(smtp_server, "person1@example.org")
    assert original.mail_from.startswith("bounce+") and original.mail_from.endswith(
        "@mail.example.com"
    )
    assert len({m.mail_from for m in smtp_server.messages}) == 3  # one return path per send
    [send_id] = [e.send_id for e in timeline_rows(runtime, "agent-1") if e.contact_id == "c1"]
    assert send_id is not None
    assert returnpath.parse(runtime.settings, original.mail_from) == returnpath.ReturnPath(send_id)

    # A forged return path (another tag) is refused at RCPT and changes nothing.
    local, _, domain = original.mail_from.partition("@")
    altered = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    made_up = "bounce+" + "0" * 32 + "-" + "a" * 16 + "@" + domain
    for bad in (altered, made_up):
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            deliver_report(inbound_server, bad, dsn(original))
        assert refused.value.code == 550
    with runtime.sessions() as session:
        assert session.scalars(select(FeedbackEvent)).all() == []
    assert reason_of(runtime, "person1@example.org") is None

    # When the relay's DSN reaches the inbound server at the send's return path (relays may
    # lower-case it: the address is lower case already)
    code, message = deliver_report(inbound_server, original.mail_from.upper(), dsn(original))
    assert (code, message) == (250, "2.0.0 hard_bounce recorded")
    again = deliver_report(inbound_server, original.mail_from, dsn(original))
    assert again[0] == 250  # the same DSN twice is recorded once

    # Then the address is suppressed as a hard bounce, from that campaign
    listed = api_client.get("/v1/users/agent-1/suppressions").json()["items"]
    assert [(s["email"], s["reason"], s["contact_id"]) for s in listed] == [
        ("person1@example.org", "hard_bounce", "c1")
    ]
    assert f"from campaign {first['id']}" in listed[0]["detail"]
    # and the contact's timeline shows the bounce on the original send, which stays sent
    events = api_client.get("/v1/contacts/c1/timeline", params={"user_id": "agent-1"}).json()
    kinds = [(e["kind"], e["status"], e["reason"], e["send_id"]) for e in events["items"]]
    assert kinds == [
        ("email_bounced", "sent", "hard_bounce", send_id),
        ("email_sent", "sent", None, send_id),
    ]
    bounced = events["items"][0]
    assert bounced["subject"] == "Open house, P1"
    assert bounced["source"] == {"type": "campaign", "campaign_id": first["id"]}
    assert "5.1.1" in bounced["detail"] and "User unknown" in bounced["detail"]
    assert get_send(runtime, send_id).status == "sent"
    assert credits(runtime, "agent-1").used == 3  # the relay took it: the credit stays spent

    # And the next campaign skips the address, uncharged
    smtp_server.handler.clear()
    second = run_campaign(api_client, campaign_body(range(3), name="Second"))
    assert (second["recipients"], second["suppressed"]) == (2, 1)
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == [
        "person0@example.org",
        "person2@example.org",
    ]
    assert credits(runtime, "agent-1").used == 3 + 2


def test_a_complaint_report_suppresses_and_is_on_the_timeline_and_the_outcome_stream(
    runtime: Runtime, smtp_server: DevSMTPServer, inbound_server: int
) -> None:
    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id).value == "sent"
    [original] = smtp_server.messages
    runtime.outcomes.ensure_group("plans")
    runtime.outcomes.read("plans", "c1")  # the terminal `sent` entry, read before

    # A complaint report, sent to the send's return path, is recorded as a complaint.
    code, _ = deliver_report(inbound_server, original.mail_from, arf(original, "x@y"))
    assert code == 250

    assert reason_of(runtime, "contact1@example.org") == "complaint"
    last = timeline_rows(runtime, "agent-1")[-1]
    assert (last.kind.value, last.status.value, last.reason, last.send_id) == (
        "email_complained",
        "sent",
        "complaint",
        send_id,
    )
    [(_, outcome)] = runtime.outcomes.read("plans", "c1")
    assert (outcome.send_id, outcome.status, outcome.reason, outcome.step_id) == (
        send_id,
        "complained",
        "complaint",
        "step-1",
    )
    # Should Redis lose the stream, beat's sweep publishes the entry again (with the outcome).
    runtime.redis.delete(
        runtime.settings.outcome_stream, f"{runtime.settings.outcome_stream}:epoch"
    )
    runtime.clock.advance(timedelta(minutes=1))  # type: ignore[attr-defined]
    assert recovery.republish_outcomes(runtime) == 2
    again = runtime.outcomes.read("plans", "c1")
    assert sorted(o.status for _, o in again) == ["complained", "sent"]

    # The plan's next email to the contact is not sent and costs nothing.
    used = credits(runtime, "agent-1").used
    second = submit_send(runtime, InlineQueue(), send_request(step_id="step-2")).send_id
    assert delivery.deliver(runtime, second).value == "failed"
    assert credits(runtime, "agent-1").used == used


def test_soft_bounces_are_counted_and_the_limit_suppresses(
    make_runtime: Any, smtp_server: DevSMTPServer
) -> None:
    rt: Runtime = make_runtime(soft_bounce_limit=2)
    make_user(rt)
    port = free_port()
    server = inbound.start(rt, "127.0.0.1", port)
    try:
        for n, step in enumerate(("step-1", "step-2")):
            send_id = submit_send(rt, InlineQueue(), send_request(step_id=step)).send_id
            assert delivery.deliver(rt, send_id).value == "sent"
            original = smtp_server.messages[n]
            assert reason_of(rt, "contact1@example.org") is None
            report = dsn(original, action="delayed", status="4.2.2")
            assert deliver_report(port, original.mail_from, report)[0] == 250
    finally:
        server.stop()
    assert reason_of(rt, "contact1@example.org") == "soft_bounce"
    bounced = [e for e in timeline_rows(rt, "agent-1") if e.kind.value == "email_bounced"]
    assert [e.reason for e in bounced] == ["soft_bounce", "soft_bounce"]
    assert bounced[-1].detail is not None and bounced[-1].detail.endswith("address suppressed")


def test_the_plain_bounce_mailbox_matches_reports_by_a_signed_reference_only(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any, inbound_server: int
) -> None:
    make_user(runtime)
    run_campaign(api_client, campaign_body(range(2)))
    mailbox = returnpath.mailbox(runtime.settings)
    assert mailbox == "bounce@mail.example.com"

    # A DSN naming the email only by its Message-ID (no signed reference) matches nothing:
    # anyone holding a copy could write it.
    bare = to(smtp_server, "person0@example.org")
    headers_only = EmailMessage()
    headers_only["Message-ID"] = bare.message_id
    headers_only["To"] = "person0@example.org"
    copy = Received(bare.mail_from, bare.rcpt_tos, bytes(headers_only))
    assert deliver_report(inbound_server, mailbox, dsn(copy)) == (
        250,
        "2.0.0 taken (no email of ours matches)",
    )
    # A feedback-loop complaint attaching the original matches by its signed return path.
    original = to(smtp_server, "person1@example.org")
    assert deliver_report(inbound_server, mailbox, arf(original, mailbox)) == (
        250,
        "2.0.0 complaint recorded",
    )
    listed = api_client.get("/v1/users/agent-1/suppressions").json()["items"]
    assert [(s["email"], s["reason"]) for s in listed] == [("person1@example.org", "complaint")]
    # Mail to any other address is refused, as before.
    with pytest.raises(aiosmtplib.SMTPRecipientRefused):
        deliver_report(inbound_server, "postmaster@mail.example.com", dsn(original))
