"""Scheduled campaigns: ``send_at`` accepted and refused, started by beat within a minute of
their time and never before, once, edited and cancelled until then, and charged to the month
they are sent in, on both sides of a month end (on the test's clock, whatever today is)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher.campaigns import control, schedule
from dispatcher.campaigns.create import create
from dispatcher.clock import FrozenClock
from dispatcher.credits.grants import grant_ref
from dispatcher.credits.ledger import snapshot
from dispatcher.credits.subscriptions import credits
from dispatcher.models import Campaign, Send, SendStatus
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import (
    campaign_request,
    make_user,
    seed_used_credits,
    timeline_rows,
    wait_for,
)
from workers.names import START_SCHEDULED_TASK

ZONE = "America/Denver"  # UTC-7 in November and December
#: 10:00 on 10 November in Denver.
MID_MONTH = datetime(2026, 11, 10, 17, 0, tzinfo=UTC)
#: 23:50 on 30 November in Denver: ten minutes before its month ends there (07:00 UTC).
LAST_MINUTES = datetime(2026, 12, 1, 6, 50, tzinfo=UTC)
MONTH_END = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(MID_MONTH)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.with_overrides(campaign_chunk_size=10, free_plan_credits=100)


def agent(rt: Runtime) -> str:
    return make_user(rt, timezone=ZONE)


def body(n: int, send_at: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "user_id": "agent-1",
        "message": {
            "subject": "Open house, {{ first_name }}",
            "html": "<p>Hi {{ first_name }}</p>",
        },
        "recipients": [
            {"id": f"c{i}", "email": f"person{i}@example.org", "fields": {"first_name": f"P{i}"}}
            for i in range(n)
        ],
        "send_at": send_at,
        **extra,
    }


def used(rt: Runtime, period: str) -> tuple[int, int]:
    """(Redis, SQL ledger) credits used in the agent's first grant of ``period``."""
    ref = grant_ref("agent-1", period, 1, ZONE)
    assert ref is not None
    with rt.sessions() as session:
        ledger = snapshot(session, ref).used
    return rt.quota.balance(ref)[0], ledger


def sends_of(rt: Runtime, campaign_id: str) -> list[tuple[SendStatus, str | None, str | None]]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.status, Send.reason, Send.period).where(Send.campaign_id == campaign_id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def campaign_row(rt: Runtime, campaign_id: str) -> Campaign:
    with rt.sessions() as session:
        c = session.get(Campaign, campaign_id)
        assert c is not None
        session.expunge(c)
        return c


# --------------------------------------------------------------------------- accepting


def test_send_at_is_an_instant_or_a_local_time_in_the_agent_s_zone_and_bad_ones_name_it(
    runtime: Runtime, api_client: Any
) -> None:
    agent(runtime)
    local = api_client.post("/v1/campaigns", json=body(3, "2026-11-12T09:30:00"))
    assert local.status_code == 202, local.text
    created = local.json()
    assert created["status"] == "scheduled"
    # 09:30 in Denver is 16:30 UTC.
    assert datetime.fromisoformat(created["send_at"]) == datetime(2026, 11, 12, 16, 30, tzinfo=UTC)
    instant = api_client.post("/v1/campaigns", json=body(3, "2026-11-12T09:30:00+01:00"))
    assert datetime.fromisoformat(instant.json()["send_at"]) == datetime(
        2026, 11, 12, 8, 30, tzinfo=UTC
    )
    refused = {
        "2026-11-10T09:59:00": "is not in the future",  # a minute ago in Denver
        "2027-11-11T09:00:00": "more than 365 days ahead",
        "next tuesday": "is not an ISO 8601 date and time",
        "2026-11-12": "has no time of day",
        "2027-03-14T02:30:00": "does not exist in America/Denver",  # summer time starts
    }
    for given, problem in refused.items():
        r = api_client.post("/v1/campaigns", json=body(3, given))
        assert r.status_code == 422, (given, r.text)
        assert r.json()["field"] == "send_at" and problem in r.json()["detail"], r.text
    with runtime.sessions() as session:
        assert len(session.scalars(select(Campaign.id)).all()) == 2  # nothing of the refused
    assert credits(runtime, "agent-1").used == 6


# --------------------------------------------------------------------------- starting


def test_a_due_campaign_is_sent_by_the_worker_and_one_not_yet_due_is_not(
    runtime: Runtime,
    api_client: Any,
    celery_app: Any,
    worker: Any,
    smtp_server: DevSMTPServer,
    clock: FrozenClock,
) -> None:
    """Given two campaigns scheduled ten and twenty minutes ahead, when beat's task runs a
    second before the first's time nothing starts; when it runs 30 s after it (beat runs it
    every 15 s, so a campaign starts within 15 s of its time plus the task's own run) the
    first is sent whole by the real worker, and the second is still waiting, unsent."""
    agent(runtime)
    first = api_client.post("/v1/campaigns", json=body(12, "2026-11-10T10:10:00")).json()
    second = api_client.post(
        "/v1/campaigns", json=body(5, "2026-11-10T17:20:00Z", name="later")
    ).json()
    due = datetime.fromisoformat(first["send_at"])
    entry = celery_app.conf.beat_schedule["start-scheduled"]
    assert entry["task"] == START_SCHEDULED_TASK and entry["schedule"] <= 30

    clock.set(due - timedelta(seconds=1))
    assert schedule.start_due(runtime) == 0
    assert control.view(runtime, first["id"]).status == "scheduled"

    clock.set(due + timedelta(seconds=30))
    celery_app.send_task(START_SCHEDULED_TASK)

    def done() -> bool:
        return control.view(runtime, first["id"]).status == "completed"

    wait_for(done, what="the due campaign completed")
    received = sorted(m.rcpt_tos[0] for m in smtp_server.messages)
    assert received == sorted(f"person{i}@example.org" for i in range(12))
    later = control.view(runtime, second["id"])
    assert later.status == "scheduled" and later.counts["reserved"] == 5
    assert credits(runtime, "agent-1").used == 17  # both hold their credits, once


def test_two_sweeps_at_once_start_a_campaign_once_and_take_its_credits_once(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """A campaign for next month holds nothing until it starts; two beats (or a sweep
    delivered twice) racing at its time reserve its credits once and start it once."""
    agent(runtime)
    at = datetime(2026, 12, 3, 16, 0, tzinfo=UTC)
    view, work = create(runtime, campaign_request(30, send_at=at))
    assert (view.status, work) == ("scheduled", [])
    assert used(runtime, "2026-11") == (0, 0)
    clock.set(at + timedelta(seconds=5))
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def race() -> None:
        barrier.wait()
        results.append(schedule.start(runtime, view.id))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert schedule.start_due(runtime) == 0  # the next sweep finds nothing due
    assert control.view(runtime, view.id).status == "running"
    assert used(runtime, "2026-12") == (30, 30)


def test_a_scheduled_mailchimp_campaign_waits_costs_nothing_and_starts_at_its_time(
    runtime: Runtime, clock: FrozenClock
) -> None:
    make_user(runtime, timezone=ZONE, mailchimp_api_key="k" * 32 + "-us1", mailchimp_list_id="L1")
    at = datetime(2026, 11, 10, 18, 0, tzinfo=UTC)
    view, work = create(runtime, campaign_request(6, provider="mailchimp", send_at=at))
    assert (view.status, work, view.counts["queued"]) == ("scheduled", [], 6)
    clock.set(at - timedelta(seconds=1))
    assert schedule.start_due(runtime) == 0
    clock.set(at)
    assert schedule.start_due(runtime) == 1
    assert control.view(runtime, view.id).status == "running"
    assert credits(runtime, "agent-1").used == 0


# --------------------------------------------------------------------------- editing, cancelling


def test_a_scheduled_campaign_is_edited_until_it_starts_then_refused(
    runtime: Runtime, api_client: Any, clock: FrozenClock
) -> None:
    agent(runtime)
    created = api_client.post("/v1/campaigns", json=body(4, "2026-11-20T09:00:00")).json()
    path, owner = f"/v1/campaigns/{created['id']}", {"user_id": "agent-1"}
    r = api_client.patch(
        path,
        params=owner,
        json={"send_at": "2026-11-21T08:00:00", "message": {"subject": "Moved, {{ first_name }}"}},
    )
    assert r.status_code == 200, r.text
    assert datetime.fromisoformat(r.json()["send_at"]) == datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
    c = campaign_row(runtime, created["id"])
    assert (c.subject, c.html) == ("Moved, {{ first_name }}", "<p>Hi {{ first_name }}</p>")
    # It holds November's credits: December cannot be its month.
    r = api_client.patch(path, params=owner, json={"send_at": "2026-12-02T09:00:00"})
    assert r.status_code == 422 and r.json()["field"] == "send_at", r.text
    assert "holds 2026-11's credits" in r.json()["detail"]
    r = api_client.patch(path, params=owner, json={"message": {"subject": "{{ broken"}})
    assert r.status_code == 422 and r.json()["field"].startswith("message"), r.text
    assert campaign_row(runtime, created["id"]).subject == "Moved, {{ first_name }}"

    clock.set(datetime(2026, 11, 21, 15, 0, 20, tzinfo=UTC))
    assert schedule.start_due(runtime) == 1
    r = api_client.patch(path, params=owner, json={"message": {"subject": "Too late"}})
    assert r.status_code == 409 and "running" in r.json()["detail"], r.text
    r = api_client.post(f"{path}/cancel", params=owner)
    assert r.status_code == 200  # a running one is cancelled as before


def test_a_scheduled_campaign_cancelled_before_it_starts_gives_every_credit_back(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, clock: FrozenClock
) -> None:
    agent(runtime)
    seed_used_credits(runtime, "agent-1", 10)
    created = api_client.post("/v1/campaigns", json=body(40, "2026-11-10T11:00:00")).json()
    assert credits(runtime, "agent-1").used == 50
    assert used(runtime, "2026-11") == (50, 50)
    r = api_client.post(f"/v1/campaigns/{created['id']}/cancel", params={"user_id": "agent-1"})
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert (cancelled["status"], cancelled["cancelled"]) == ("cancelled", 40)
    assert used(runtime, "2026-11") == (10, 10)  # every credit back, in Redis and the ledger
    assert {row[:2] for row in sends_of(runtime, created["id"])} == {
        (SendStatus.FAILED, "campaign_cancelled")
    }
    assert sum(e.reason == "campaign_cancelled" for e in timeline_rows(runtime, "agent-1")) == 40
    # One for next month holds nothing: its cancel gives nothing back and takes nothing.
    later = api_client.post("/v1/campaigns", json=body(7, "2026-12-02T11:00:00")).json()
    assert used(runtime, "2026-11") == (10, 10)
    r = api_client.post(f"/v1/campaigns/{later['id']}/cancel", params={"user_id": "agent-1"})
    assert r.json()["status"] == "cancelled" and used(runtime, "2026-11") == (10, 10)
    clock.set(datetime(2026, 12, 2, 18, 30, tzinfo=UTC))  # past both times: nothing starts
    assert schedule.start_due(runtime) == 0
    assert smtp_server.messages == []
    assert credits(runtime, "agent-1").used == 0  # December's grant, untouched


# --------------------------------------------------------------------------- month ends


def test_a_schedule_across_the_month_end_is_charged_to_the_month_it_is_sent_in(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """Ten minutes before November ends in Denver, with 95 of 100 credits used: a campaign at
    23:58 takes November's credits now; one of 30 at 00:05 on 1 December holds none (November
    could not pay for it) and is charged to December when it starts; one of 120 for December
    is accepted and fails whole at its time, December being short."""
    clock.set(LAST_MINUTES)
    agent(runtime)
    seed_used_credits(runtime, "agent-1", 90)
    november, _ = create(runtime, campaign_request(5, send_at="2026-11-30T23:58:00"))
    december, _ = create(runtime, campaign_request(30, send_at="2026-12-01T00:05:00"))
    too_big, _ = create(runtime, campaign_request(120, send_at="2026-12-01T00:06:00"))
    assert used(runtime, "2026-11") == (95, 95)
    assert {p for _, _, p in sends_of(runtime, december.id)} == {None}

    clock.set(MONTH_END - timedelta(minutes=2, seconds=-10))  # 23:58:10
    assert schedule.start_due(runtime) == 1
    assert campaign_row(runtime, november.id).period == "2026-11"

    clock.set(MONTH_END + timedelta(minutes=5, seconds=1))  # 00:05:01 on 1 December
    assert schedule.start_due(runtime) == 1
    assert used(runtime, "2026-11") == (95, 95)  # November paid nothing for it
    assert used(runtime, "2026-12") == (30, 30)
    assert campaign_row(runtime, december.id).period == "2026-12"
    assert {(s, p) for s, _, p in sends_of(runtime, december.id)} == {
        (SendStatus.RESERVED, "2026-12")
    }

    clock.set(MONTH_END + timedelta(minutes=6, seconds=1))
    assert schedule.start_due(runtime) == 0
    refused = control.view(runtime, too_big.id)
    assert refused.status == "failed"
    assert "needs 120 credits but only 70 of 100 remain" in (refused.detail or "")
    assert refused.failed_by_reason == {"quota_exhausted": 120}
    assert used(runtime, "2026-12") == (30, 30)  # nothing kept for it
    assert sum(e.reason == "quota_exhausted" for e in timeline_rows(runtime, "agent-1")) == 120


def test_a_campaign_holding_november_s_credits_that_starts_in_december_is_charged_to_december(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """Beat was down across the month end: the campaign due at 23:55 on 30 November starts at
    00:02 on 1 December. Its November credits go back to November (Redis having lost its data
    and rebuilt November's grant meanwhile, which holds them per recipient); December pays."""
    clock.set(LAST_MINUTES)
    agent(runtime)
    late, _ = create(runtime, campaign_request(8, send_at="2026-11-30T23:55:00"))
    assert used(runtime, "2026-11") == (8, 8)
    runtime.redis.flushall()
    assert used(runtime, "2026-11") == (8, 8)  # rebuilt from the ledger
    clock.set(MONTH_END + timedelta(minutes=2))
    assert schedule.start_due(runtime) == 1
    assert used(runtime, "2026-11") == (0, 0)
    assert used(runtime, "2026-12") == (8, 8)
    assert control.view(runtime, late.id).status == "running"
