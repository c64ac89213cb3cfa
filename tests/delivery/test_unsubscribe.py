"""Bulk-sender headers, one-click unsubscribe (RFC 8058) and the suppression list, end to end:
HTTP API -> broker -> real Celery worker -> real SMTP server, then the recipient's POST."""

from __future__ import annotations

import asyncio
import base64
import re
import urllib.parse
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.clock import FrozenClock
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import inbound, suppression, unsubscribe
from dispatcher.delivery import smartplan as delivery
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.conftest import free_port
from tests.helpers import campaign_body, make_user, run_campaign, send_request, wait_for

AUTH = {"Authorization": "Bearer test-token-123"}


def one_click_url(message: Received) -> str:
    """The link as a mailbox provider reads it: from the raw field, never decoded (a field
    folded into encoded words is no link to them)."""
    match = re.search(
        rb"^List-Unsubscribe: <(https?://[^>]+/u/[A-Za-z0-9_-]+)>,\r\n <mailto:[^>]+>\r\n",
        message.data,
        re.MULTILINE,
    )
    assert match, message.data[:800]
    return match[1].decode("ascii")


def test_campaign_mail_carries_the_bulk_sender_headers(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    run_campaign(api_client, campaign_body(range(3)))

    assert len(smtp_server.messages) == 3
    tokens = set()
    for m in smtp_server.messages:
        msg = m.parsed()
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert re.fullmatch(r"<[0-9a-f-]{36}\.[0-9a-f]{12}\.mail\.example\.com>", msg["List-Id"])
        header = str(msg["List-Unsubscribe"])
        assert "<mailto:unsubscribe@mail.example.com?subject=unsubscribe%20" in header
        url = one_click_url(m)
        assert url.startswith("http://127.0.0.1:8000/u/")
        token = url.rsplit("/", 1)[1]
        # Opaque: 32 random-looking bytes (the send's id and the tag), naming neither the
        # agent, the contact nor the address.
        assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == 32
        for secret in ("agent-1", "person", "example.org"):
            assert secret not in token
        tokens.add(token)
    assert len(tokens) == 3  # one per recipient


def test_one_click_post_suppresses_the_contact_and_the_next_campaign_skips_it_uncharged(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    run_campaign(api_client, campaign_body(range(5)))
    assert credits(runtime, "agent-1").used == 5
    [to_person2] = [m for m in smtp_server.messages if m.rcpt_tos == ("person2@example.org",)]
    path = "/u/" + one_click_url(to_person2).rsplit("/u/", 1)[1]

    # The mailbox provider's POST: no cookie, no bearer token, the RFC 8058 body.
    r = api_client.post(
        path,
        content="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": ""},
    )
    assert r.status_code == 200, r.text
    again = api_client.post(path, content="List-Unsubscribe=One-Click")
    assert again.status_code == 200  # idempotent

    listed = api_client.get("/v1/users/agent-1/suppressions").json()["items"]
    assert [(s["email"], s["reason"], s["contact_id"]) for s in listed] == [
        ("person2@example.org", "unsubscribe", "c2")
    ]

    smtp_server.handler.clear()
    second = run_campaign(api_client, campaign_body(range(5), name="Second"))
    assert second["recipients"] == 4
    assert second["suppressed"] == 1
    skipped = api_client.get(
        f"/v1/campaigns/{second['id']}/suppressed", params={"user_id": "agent-1"}
    ).json()
    assert skipped == {
        "items": [
            {
                "index": 2,
                "contact_id": "c2",
                "email": "person2@example.org",
                "field": None,
                "reason": "unsubscribe",
            }
        ],
        "next_cursor": None,
    }
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == [
        f"person{i}@example.org" for i in (0, 1, 3, 4)
    ]
    assert credits(runtime, "agent-1").used == 5 + 4  # the suppressed contact cost nothing


def test_a_forged_or_tampered_token_is_refused_and_suppresses_nobody(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    run_campaign(api_client, campaign_body(range(1)))
    token = one_click_url(smtp_server.messages[0]).rsplit("/", 1)[1]
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    other_key = runtime.settings.with_overrides(unsubscribe_secret="another-secret-0123456789")
    forged = unsubscribe.token_for(other_key, unsubscribe.send_id_of(runtime.settings, token))

    for bad in (flipped, forged, "x" * 43, "not-a-token"):
        r = api_client.post(f"/u/{bad}", content="List-Unsubscribe=One-Click")
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["field"] == "token"
    assert api_client.get("/v1/users/agent-1/suppressions").json()["items"] == []


def test_opening_the_link_does_not_unsubscribe(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    run_campaign(api_client, campaign_body(range(1)))
    path = "/u/" + one_click_url(smtp_server.messages[0]).rsplit("/u/", 1)[1]

    page = api_client.get(path)
    assert page.status_code == 200 and 'method="post"' in page.text
    assert api_client.get("/v1/users/agent-1/suppressions").json()["items"] == []


def test_manual_entries_expire_and_can_be_removed(
    runtime: Runtime, api_client: Any, clock: FrozenClock
) -> None:
    make_user(runtime)
    r = api_client.post(
        "/v1/users/agent-1/suppressions",
        json={"email": "Someone@Example.org", "expires_at": "2026-11-12T00:00:00Z"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["email"] == "someone@example.org"
    with runtime.sessions() as s:
        now = runtime.clock.now()
        assert suppression.reason_for(s, "agent-1", "SOMEONE@example.org", now) == "manual"
    bad = api_client.post(
        "/v1/users/agent-1/suppressions",
        json={"email": "x@example.org", "expires_at": "2020-01-01T00:00:00Z"},
    )
    assert bad.status_code == 422 and bad.json()["field"] == "expires_at"
    bad = api_client.post("/v1/users/agent-1/suppressions", json={"email": "nope"})
    assert bad.status_code == 422 and bad.json()["field"] == "email"

    clock.advance(timedelta(days=2))
    assert api_client.get("/v1/users/agent-1/suppressions").json()["items"] == []

    api_client.post("/v1/users/agent-1/suppressions", json={"email": "someone@example.org"})
    gone = "/v1/users/agent-1/suppressions/someone@example.org"
    unexplained = api_client.delete(gone)
    assert unexplained.status_code == 422 and unexplained.json()["field"] == "why"
    assert api_client.delete(gone, params={"why": "  "}).json()["field"] == "why"
    assert api_client.get("/v1/users/agent-1/suppressions").json()["items"] != []  # still there
    why = "the contact asked again by phone, 2026-11-12"
    assert api_client.delete(gone, params={"why": why}).status_code == 204
    assert api_client.get("/v1/users/agent-1/suppressions").json()["items"] == []
    assert api_client.delete(gone, params={"why": why}).status_code == 404
    # The removal is on record: which address, the entry as it was, who (the token's
    # fingerprint, never the token), when and why
    [record] = api_client.get("/v1/users/agent-1/suppression-removals").json()["items"]
    assert (record["email"], record["reason"], record["why"]) == (
        "someone@example.org",
        "manual",
        why,
    )
    assert record["removed_by"] == "api:api-1"  # the client's name
    assert "test-token-123" not in record["removed_by"]
    assert record["removed_at"].startswith(clock.now().date().isoformat())


def test_an_expired_entry_can_be_renewed_and_a_permanent_one_is_never_shortened(
    runtime: Runtime, api_client: Any, clock: FrozenClock
) -> None:
    make_user(runtime)
    url = "/v1/users/agent-1/suppressions"
    api_client.post(url, json={"email": "a@example.org", "expires_at": "2026-11-11T00:00:00Z"})
    clock.advance(timedelta(days=2))  # expired
    renewed = api_client.post(
        url, json={"email": "a@example.org", "expires_at": "2026-12-31T00:00:00Z"}
    )
    assert renewed.status_code == 201
    assert renewed.json()["expires_at"].startswith("2026-12-31")
    assert [s["email"] for s in api_client.get(url).json()["items"]] == ["a@example.org"]

    with runtime.sessions.begin() as session:
        suppression.add(
            session,
            "agent-1",
            "b@example.org",
            suppression.SuppressionReason.UNSUBSCRIBE,
            clock.now(),
            contact_id="c-b",
        )
    later = api_client.post(
        url, json={"email": "b@example.org", "expires_at": "2026-12-01T00:00:00Z"}
    )
    kept = later.json()
    assert (kept["reason"], kept["expires_at"], kept["contact_id"]) == ("unsubscribe", None, "c-b")


def smartplan_body(step: str) -> dict[str, Any]:
    return {
        "user_id": "agent-1",
        "contact": {"id": "c-9", "email": "pat@example.org", "fields": {"first_name": "Pat"}},
        "smartplan": {"plan_id": "buyers-drip", "run_id": "run-1", "step_id": step},
        "message": {"subject": "Step {{ first_name }}", "html": "<p>New listings</p>"},
    }


def test_smartplan_mail_unsubscribes_in_one_click_and_the_next_step_is_skipped_uncharged(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    first = api_client.post("/v1/sends", json=smartplan_body("step-1")).json()["id"]
    wait_for(
        lambda: (
            api_client.get(f"/v1/sends/{first}", params={"user_id": "agent-1"}).json()["status"]
            == "sent"
        )
    )
    [message] = smtp_server.messages
    msg = message.parsed()
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert re.fullmatch(r"<plan-[0-9a-f]{12}\.[0-9a-f]{12}\.mail\.example\.com>", msg["List-Id"])
    assert "mailto:unsubscribe@mail.example.com" in str(msg["List-Unsubscribe"])

    path = "/u/" + one_click_url(message).rsplit("/u/", 1)[1]
    r = api_client.post(path, content="List-Unsubscribe=One-Click", headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    listed = api_client.get("/v1/users/agent-1/suppressions").json()["items"]
    assert [s["reason"] for s in listed] == ["unsubscribe"]
    # recorded as what it was: a SmartPlan step's email, not "campaign -"
    assert [s["detail"] for s in listed] == [
        "one-click unsubscribe from SmartPlan buyers-drip step step-1"
    ]

    second = api_client.post("/v1/sends", json=smartplan_body("step-2")).json()["id"]
    wait_for(
        lambda: (
            api_client.get(f"/v1/sends/{second}", params={"user_id": "agent-1"}).json()["status"]
            == "failed"
        )
    )
    assert (
        api_client.get(f"/v1/sends/{second}", params={"user_id": "agent-1"}).json()["reason"]
        == "suppressed"
    )
    assert len(smtp_server.messages) == 1
    assert credits(runtime, "agent-1").used == 1


def mailto_of(message: Received) -> tuple[str, str]:
    """(address, subject) of the raw List-Unsubscribe mailto."""
    found = re.search(rb" <mailto:([^?>]+)\?subject=([^>]+)>\r\n", message.data)
    assert found, message.data[:800]
    return found[1].decode(), urllib.parse.unquote(found[2].decode())


def test_an_unsubscribe_by_mail_suppresses_the_contact_and_a_forged_one_is_refused(
    runtime: Runtime, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id).value == "sent"
    address, subject = mailto_of(smtp_server.messages[0])
    assert address == "unsubscribe@mail.example.com" and subject.startswith("unsubscribe ")

    port = free_port()
    server = inbound.start(runtime, "127.0.0.1", port)
    try:

        async def mail(to: str, subject: str) -> None:
            message = EmailMessage()
            message["From"] = "contact1@example.org"
            message["To"] = to
            message["Subject"] = subject
            message.set_content("sent from my phone")
            await aiosmtplib.send(message, hostname="127.0.0.1", port=port, timeout=10)

        # Mail for anyone else, or with a forged or altered token, is refused and changes nothing.
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            asyncio.run(mail("postmaster@mail.example.com", subject))
        token = subject.split()[1]
        altered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
        for bad in ("unsubscribe me please", f"unsubscribe {altered}"):
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                asyncio.run(mail(address, bad))
            assert refused.value.code == 550
        with runtime.sessions() as session:
            assert (
                suppression.reason_for(
                    session, "agent-1", "contact1@example.org", runtime.clock.now()
                )
                is None
            )

        asyncio.run(mail(address, subject))  # what the mail client sends: 250
    finally:
        server.stop()
    with runtime.sessions() as session:
        reason = suppression.reason_for(
            session, "agent-1", "contact1@example.org", runtime.clock.now()
        )
    assert reason is not None and "unsubscribe" in reason
    [entry] = suppression.listing(runtime, "agent-1").items
    assert entry.detail == "mail unsubscribe from SmartPlan plan-7 step step-1"
    # The plan's next email to the contact is not sent and costs nothing.
    second = submit_send(runtime, InlineQueue(), send_request(step_id="step-2")).send_id
    assert delivery.deliver(runtime, second).value == "failed"
    assert len(smtp_server.messages) == 1
    assert credits(runtime, "agent-1").used == 1


def test_an_unsubscribe_by_mail_the_database_cannot_take_is_deferred_without_details(
    runtime: Runtime, make_runtime: Any, smtp_server: DevSMTPServer, tmp_path: Any
) -> None:
    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    assert delivery.deliver(runtime, send_id).value == "sent"
    address, subject = mailto_of(smtp_server.messages[0])
    # A server whose database is away: the sender's server must try again later (4xx), and
    # learn nothing about our insides.
    away = make_runtime(database_url=f"sqlite:///{tmp_path}/missing/dispatcher.db")
    port = free_port()
    server = inbound.start(away, "127.0.0.1", port)
    try:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "c@example.org", address, subject
        message.set_content("please")
        with pytest.raises(aiosmtplib.SMTPDataError) as deferred:
            asyncio.run(aiosmtplib.send(message, hostname="127.0.0.1", port=port, timeout=10))
    finally:
        server.stop()
    assert deferred.value.code == 451
    assert "SQL" not in deferred.value.message and "sqlite" not in deferred.value.message.lower()
