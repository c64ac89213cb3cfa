"""Command Email campaigns end to end: HTTP API -> broker -> real Celery worker -> real SMTP."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.credits.subscriptions import credits
from dispatcher.models import Campaign, Send, TimelineEvent
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import ON_BOTH_BROKERS, make_user, seed_used_credits, timeline_rows, wait_for
from workers.app import CAMPAIGN, SEND_CAMPAIGN_CHUNK_TASK


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.with_overrides(campaign_chunk_size=100, smtp_pool_size=4)


def recipients(n: int, bad: dict[int, str] | None = None) -> list[dict[str, Any]]:
    out = [
        {"id": f"c{i}", "email": f"person{i}@example.org", "fields": {"first_name": f"P{i}"}}
        for i in range(n)
    ]
    for i, email in (bad or {}).items():
        out[i]["email"] = email
    return out


def campaign_body(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "user_id": "agent-1",
        "name": "Spring open house",
        "message": {
            "subject": "Open house this weekend, {{ first_name }}",
            "html": "<h1>Open house</h1><p>Hi {{ first_name }}, come by!</p>",
        },
        "recipients": recipients(n),
        **extra,
    }


def to_contacts(server: DevSMTPServer) -> list[Received]:
    return [m for m in server.messages if m.rcpt_tos[0].startswith("person")]


def settled_count(server: DevSMTPServer, api: Any, campaign_id: str) -> int:
    """The number of messages once the batches handed out before a pause have finished: no
    recipient of the campaign is ``sending`` and no task runs in the worker."""
    from celery.worker import state

    def quiet() -> bool:
        counts = api.get(f"/v1/campaigns/{campaign_id}", params={"user_id": "agent-1"}).json()[
            "counts"
        ]
        return counts["sending"] == 0 and not state.active_requests

    wait_for(quiet, what="the batches in flight finished")
    return len(server.messages)


def finished(api: Any, campaign_id: str) -> bool:
    return api.get(f"/v1/campaigns/{campaign_id}", params={"user_id": "agent-1"}).json()[
        "status"
    ] in (
        "completed",
        "cancelled",
        "failed",
    )


def test_a_campaign_larger_than_the_balance_is_refused_whole(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", 4400)  # 600 left
    r = api_client.post("/v1/campaigns", json=campaign_body(1000))
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["code"] == "insufficient_credits"
    assert (body["needed"], body["remaining"]) == (1000, 600)
    assert "1,000 credits" in body["detail"] and "600 of 5,000" in body["detail"]
    with runtime.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Campaign)) == 0
        assert (
            s.scalar(select(func.count()).select_from(Send).where(Send.campaign_id.is_not(None)))
            == 0
        )
    assert credits(runtime, "agent-1").remaining == 600
    assert smtp_server.messages == []


def test_invalid_addresses_are_reported_never_sent_never_charged(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    body = campaign_body(500)
    body["recipients"] = recipients(
        500, {7: "not-an-address", 250: "x@localhost", 499: "a b@example.org"}
    )
    r = api_client.post("/v1/campaigns", json=body)
    assert r.status_code == 202, r.text
    created = r.json()
    assert (created["recipients"], created["invalid"], created["suppressed"]) == (497, 3, 0)
    invalid = api_client.get(
        f"/v1/campaigns/{created['id']}/invalid", params={"user_id": "agent-1"}
    ).json()["items"]
    assert [(i["index"], i["field"]) for i in invalid] == [
        (7, "recipients[7].email"),
        (250, "recipients[250].email"),
        (499, "recipients[499].email"),
    ]
    wait_for(lambda: finished(api_client, created["id"]), timeout=60)
    done = api_client.get(f"/v1/campaigns/{created['id']}", params={"user_id": "agent-1"}).json()
    assert (done["status"], done["counts"]["sent"], done["progress"]) == ("completed", 497, 1.0)
    got = to_contacts(smtp_server)
    assert len(got) == 497 and len({m.message_id for m in got}) == 497
    assert {m.rcpt_tos[0] for m in got}.isdisjoint(
        {"not-an-address", "x@localhost", "a b@example.org"}
    )
    msg = got[0].parsed()
    assert msg["Subject"].startswith("Open house this weekend, P")
    assert msg.get_body(("html",)).get_content().startswith("<h1>Open house</h1>")
    assert credits(runtime, "agent-1").used == 497
    with runtime.sessions() as s:
        events = s.scalar(
            select(func.count())
            .select_from(TimelineEvent)
            .where(TimelineEvent.kind == "email_sent")
        )
    assert events == 497


@ON_BOTH_BROKERS
def test_pause_resume_cancel_never_sends_twice_and_returns_unsent_credits(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)

    def slow(stage: str, _r: Received) -> None:
        if stage == "data":
            time.sleep(0.004)
        return None

    smtp_server.handler.fault = slow
    cid = api_client.post("/v1/campaigns", json=campaign_body(1500)).json()["id"]
    wait_for(lambda: len(smtp_server.messages) >= 100, what="first messages")
    assert (
        api_client.post(f"/v1/campaigns/{cid}/pause", params={"user_id": "agent-1"}).json()[
            "status"
        ]
        == "paused"
    )
    paused_at = settled_count(smtp_server, api_client, cid)  # batches in flight finish
    time.sleep(1.0)
    assert len(smtp_server.messages) == paused_at, "sending went on while paused"
    assert paused_at < 1500
    assert (
        api_client.post(f"/v1/campaigns/{cid}/pause", params={"user_id": "agent-1"}).status_code
        == 409
    )
    assert (
        api_client.post(f"/v1/campaigns/{cid}/resume", params={"user_id": "agent-1"}).json()[
            "status"
        ]
        == "running"
    )
    wait_for(lambda: len(smtp_server.messages) >= paused_at + 100, what="resumed sending")
    cancelled = api_client.post(f"/v1/campaigns/{cid}/cancel", params={"user_id": "agent-1"}).json()
    assert cancelled["status"] == "cancelled"
    wait_for(
        lambda: (
            api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()["done"]
            == 1500
        ),
        what="every recipient settled",
    )
    time.sleep(0.5)
    final = api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()
    sent = final["counts"]["sent"]
    assert 0 < sent < 1500
    assert final["failed_by_reason"] == {"campaign_cancelled": 1500 - sent}
    got = to_contacts(smtp_server)
    assert len(got) == sent
    assert max(Counter(m.message_id for m in got).values()) == 1
    assert max(Counter(m.rcpt_tos[0] for m in got).values()) == 1
    assert credits(runtime, "agent-1").used == sent
    assert (
        api_client.post(f"/v1/campaigns/{cid}/resume", params={"user_id": "agent-1"}).status_code
        == 409
    )


def test_a_chunk_delivered_twice_sends_nobody_two_copies(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, celery_app: Any, worker: Any
) -> None:
    make_user(runtime)
    cid = api_client.post("/v1/campaigns", json=campaign_body(300)).json()["id"]
    for chunk in (0, 1, 2, 0, 1, 2):
        celery_app.send_task(SEND_CAMPAIGN_CHUNK_TASK, args=[f"{cid}:{chunk}"], queue=CAMPAIGN)
    wait_for(lambda: finished(api_client, cid), timeout=60)
    time.sleep(1.0)
    got = to_contacts(smtp_server)
    assert len(got) == 300 and len({m.message_id for m in got}) == 300
    assert credits(runtime, "agent-1").used == 300


@ON_BOTH_BROKERS
def test_refused_and_deferred_recipients(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    deferred_once: set[str] = set()

    def fault(stage: str, r: Received) -> str | None:
        rcpt = r.rcpt_tos[-1]
        if stage == "rcpt" and rcpt.startswith("person1@"):
            return "550 5.1.1 mailbox unknown"
        if stage == "data" and rcpt.startswith("person2") and rcpt not in deferred_once:
            deferred_once.add(rcpt)
            return "451 4.3.0 try again later"
        return None

    smtp_server.handler.fault = fault
    cid = api_client.post("/v1/campaigns", json=campaign_body(250)).json()["id"]
    wait_for(lambda: finished(api_client, cid), timeout=60)
    final = api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()
    assert final["status"] == "completed"
    assert final["failed_by_reason"] == {"hard_bounce": 1}
    assert final["counts"]["sent"] == 249
    got = to_contacts(smtp_server)
    assert len(got) == 249 and len({m.message_id for m in got}) == 249
    assert len(deferred_once) == 61  # person2, person20-29, person200-249
    assert credits(runtime, "agent-1").used == 249


def test_a_cancelled_recipients_timeline_shows_the_subject_as_rendered_for_them(
    runtime: Runtime, api_client: Any
) -> None:
    # Given a campaign accepted but not yet sent (no worker runs in this test)
    make_user(runtime)
    cid = api_client.post("/v1/campaigns", json=campaign_body(3)).json()["id"]
    # When the agent cancels it
    cancelled = api_client.post(f"/v1/campaigns/{cid}/cancel", params={"user_id": "agent-1"})
    assert cancelled.json()["status"] == "cancelled"
    # Then each contact's timeline shows their own subject, not the template's merge field
    events = timeline_rows(runtime, "agent-1")
    assert sorted((e.contact_id, e.reason, e.subject) for e in events) == [
        (f"c{i}", "campaign_cancelled", f"Open house this weekend, P{i}") for i in range(3)
    ]
    assert credits(runtime, "agent-1").used == 0
