"""Campaigns routed to MailChimp end to end: API -> real worker -> local MailChimp server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from dispatcher.models import TimelineEvent
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from dispatcher.subscriptions import credits
from tests.fake_mailchimp import (
    BATCH_SUBSCRIBE,
    CREATE_CAMPAIGN,
    DEFAULT_KEY,
    DEFAULT_LIST,
    SEND,
    FakeMailchimp,
    Fault,
)
from tests.helpers import make_user, wait_for


@pytest.fixture
def fake() -> Iterator[FakeMailchimp]:
    with FakeMailchimp() as server:
        yield server


@pytest.fixture
def settings(settings: Settings, fake: FakeMailchimp) -> Settings:
    return settings.with_overrides(mailchimp_base_url=fake.base_url)


def body(n: int) -> dict[str, Any]:
    return {
        "user_id": "agent-1",
        "provider": "mailchimp",
        "message": {
            "subject": "Market update for {{ first_name }}",
            "html": "<p>Hi {{ first_name }}, prices are up.</p>",
        },
        "recipients": [
            {"id": f"c{i}", "email": f"person{i}@example.org", "fields": {"first_name": f"P{i}"}}
            for i in range(n)
        ],
    }


def connect(runtime: Runtime) -> None:
    make_user(runtime, mailchimp_api_key=DEFAULT_KEY, mailchimp_list_id=DEFAULT_LIST)


def events(runtime: Runtime) -> list[TimelineEvent]:
    with runtime.sessions() as s:
        return list(s.scalars(select(TimelineEvent).where(TimelineEvent.user_id == "agent-1")))


def test_mailchimp_campaign_with_429s_and_503s_is_sent_once_and_costs_nothing(
    runtime: Runtime, api_client: Any, worker: Any, fake: FakeMailchimp
) -> None:
    connect(runtime)
    fake.inject(BATCH_SUBSCRIBE, Fault.throttle(retry_after=0.05), Fault.error(503))
    fake.inject(CREATE_CAMPAIGN, Fault.error(503))
    fake.inject(SEND, Fault.throttle(), Fault.error(503))
    r = api_client.post("/v1/campaigns", json=body(30))
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    wait_for(
        lambda: api_client.get(f"/v1/campaigns/{cid}").json()["status"] == "completed", timeout=60
    )
    [campaign] = fake.campaigns()
    assert fake.send_actions[campaign.id] == 1
    assert len(fake.members()) == 30
    assert "*|FNAME|*" in campaign.settings["subject_line"]
    timeline = events(runtime)
    assert len(timeline) == 30
    assert {e.kind.value for e in timeline} == {"email_sent"}
    assert all("MailChimp" in (e.detail or "") for e in timeline)
    assert {e.source["provider"] for e in timeline} == {"mailchimp"}
    assert credits(runtime, "agent-1").used == 0


def test_mailchimp_400_fails_with_its_detail_on_the_timeline_and_no_credit(
    runtime: Runtime, api_client: Any, worker: Any, fake: FakeMailchimp
) -> None:
    connect(runtime)
    fake.inject(CREATE_CAMPAIGN, Fault.reject("Your Campaign is not ready to send."))
    cid = api_client.post("/v1/campaigns", json=body(5)).json()["id"]
    wait_for(
        lambda: api_client.get(f"/v1/campaigns/{cid}").json()["status"] == "failed", timeout=60
    )
    view = api_client.get(f"/v1/campaigns/{cid}").json()
    assert view["failed_by_reason"] == {"mailchimp_rejected": 5}
    assert "Your Campaign is not ready to send." in view["detail"]
    timeline = events(runtime)
    assert len(timeline) == 5
    assert all("Your Campaign is not ready to send." in (e.detail or "") for e in timeline)
    assert fake.send_actions == {} or sum(fake.send_actions.values()) == 0
    assert credits(runtime, "agent-1").used == 0


def test_a_mailchimp_campaign_needs_a_connected_account(runtime: Runtime, api_client: Any) -> None:
    make_user(runtime)
    r = api_client.post("/v1/campaigns", json=body(3))
    assert r.status_code == 422 and r.json()["field"] == "provider"
