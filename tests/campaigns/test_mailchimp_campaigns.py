"""Campaigns routed to MailChimp end to end: API -> real worker -> local MailChimp server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from dispatcher.campaigns import control, create
from dispatcher.campaigns import run as campaign_run
from dispatcher.campaigns.mailchimp import MailchimpUnavailable
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery.sandbox import RenderLimits
from dispatcher.errors import SendBusy
from dispatcher.models import Campaign, TimelineEvent
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.fake_mailchimp import (
    BATCH_SUBSCRIBE,
    CREATE_CAMPAIGN,
    DEFAULT_KEY,
    DEFAULT_LIST,
    SEND,
    FakeMailchimp,
    Fault,
)
from tests.helpers import campaign_request, make_user, wait_for


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
        lambda: (
            api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()["status"]
            == "completed"
        ),
        timeout=60,
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
        lambda: (
            api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()["status"]
            == "failed"
        ),
        timeout=60,
    )
    view = api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()
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


def test_two_runs_of_one_mailchimp_job_at_once_send_it_once(
    make_runtime: Any, fake: FakeMailchimp
) -> None:
    # A redelivered or re-enqueued job while the first run still talks to MailChimp: the
    # second run finds the campaign leased and steps back; MailChimp gets one campaign.
    fake.latency = 0.1
    first, second = make_runtime(), make_runtime()
    connect(first)
    view, [chunk] = create.create(first, campaign_request(20, "mailchimp"))
    item = f"{view.id}:{chunk}"
    start = threading.Barrier(2)

    def run(rt: Runtime) -> str:
        start.wait()
        try:
            return campaign_run.deliver(rt, item).value
        except SendBusy:
            return "busy"

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(run, (first, second)))
    [campaign] = fake.campaigns()
    assert fake.send_actions[campaign.id] == 1
    assert results == ["busy", "completed"]
    # The run that stepped back, retried later, finds the work done and sends nothing more.
    assert campaign_run.deliver(second, item).value == "completed"
    assert len(fake.campaigns()) == 1 and fake.send_actions[campaign.id] == 1


def test_a_mailchimp_job_whose_run_died_is_taken_over_once_its_lease_ran_out(
    runtime: Runtime, fake: FakeMailchimp, clock: Any
) -> None:
    connect(runtime)
    view, [chunk] = create.create(runtime, campaign_request(5, "mailchimp"))
    # A run that died holding the job: its lease stays until it runs out.
    now = clock.now()
    hold_lease(runtime, view.id, now + timedelta(seconds=30))
    with pytest.raises(SendBusy) as busy:
        campaign_run.deliver(runtime, f"{view.id}:{chunk}")
    assert 29 <= busy.value.retry_after <= 32
    assert fake.campaigns() == []
    clock.advance(timedelta(seconds=31))
    assert campaign_run.deliver(runtime, f"{view.id}:{chunk}").value == "completed"
    [campaign] = fake.campaigns()
    assert fake.send_actions[campaign.id] == 1
    with runtime.sessions() as session:
        assert session.scalar(select(Campaign.lease_until).where(Campaign.id == view.id)) is None


def test_a_run_longer_than_its_lease_keeps_it_and_one_that_lost_it_stops(
    make_runtime: Any, fake: FakeMailchimp, clock: Any
) -> None:
    # A 3-second lease renewed every (real) second, while the clock runs a quarter faster.
    fake.latency = 0.8
    owner = make_runtime(task_time_limit=2, send_lease_seconds=3)
    other = make_runtime(task_time_limit=2, send_lease_seconds=3)
    connect(owner)
    view, [chunk] = create.create(owner, campaign_request(10, "mailchimp"))
    item = f"{view.id}:{chunk}"
    started = clock.now()
    ticking = threading.Event()

    def tick() -> None:
        while not ticking.wait(0.25):
            clock.advance(timedelta(seconds=0.3125))

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(campaign_run.deliver, owner, item)
            # Past the lease's first length on the clock, the run still holds it: renewed.
            wait_for(lambda: clock.now() - started >= timedelta(seconds=3.5), what="3.5 s on")
            assert not running.done()
            with pytest.raises(SendBusy):
                campaign_run.deliver(other, item)
            assert running.result(timeout=30).value == "completed"
    finally:
        ticking.set()
        ticker.join()
    [campaign] = fake.campaigns()
    assert fake.send_actions[campaign.id] == 1


def test_a_run_that_lost_its_lease_stops_before_it_creates_a_campaign(
    make_runtime: Any, fake: FakeMailchimp, clock: Any
) -> None:
    # Each MailChimp call takes a second; the lease is renewed every second.
    fake.latency = 1.0
    rt = make_runtime(task_time_limit=2, send_lease_seconds=3)
    connect(rt)
    view, [chunk] = create.create(rt, campaign_request(10, "mailchimp"))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(campaign_run.deliver, rt, f"{view.id}:{chunk}")
        time.sleep(0.3)  # the run holds the lease and is in its first call (the audience sync)
        # It stalls past its lease (as if): another run takes the job over.
        hold_lease(rt, view.id, clock.now() + timedelta(hours=1))
        with pytest.raises(SendBusy):
            running.result(timeout=30)  # its next renewal finds the lease gone: it stops
    assert fake.campaigns() == [], "the stopped run went on to create a campaign"
    assert fake.send_actions == {} or sum(fake.send_actions.values()) == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the suite's time
def test_a_mailchimp_job_counts_its_own_runs_and_waits_for_a_lease_cost_none(
    runtime: Runtime, fake: FakeMailchimp, clock: Any
) -> None:
    # MailChimp's audience endpoint answers 503 to every run: the job gives up after
    # SEND_MAX_RETRIES retries (3 here), counted in SQL, whatever Celery's count says.
    connect(runtime)
    view, [chunk] = create.create(runtime, campaign_request(3, "mailchimp"))
    item = f"{view.id}:{chunk}"
    fake.inject(BATCH_SUBSCRIBE, *[Fault.error(503)] * 40)
    for run in range(1, 4):
        with pytest.raises(MailchimpUnavailable):
            campaign_run.deliver(runtime, item)
        # Meanwhile a redelivered copy finds the job held: it steps back, costing no run.
        hold_lease(runtime, view.id, clock.now() + timedelta(seconds=5))
        with pytest.raises(SendBusy):
            campaign_run.deliver(runtime, item)
        clock.advance(timedelta(seconds=6))
        with runtime.sessions() as session:
            assert session.scalar(select(Campaign.attempts).where(Campaign.id == view.id)) == run
    # The fourth run is the last: it fails every recipient with the reason.
    assert campaign_run.deliver(runtime, item).value == "failed"
    after = control.view(runtime, view.id)
    assert after.counts["failed"] == 3 and "gave up after retries" in (after.detail or "")
    assert fake.campaigns() == []


def test_a_mailchimp_campaign_is_not_cancelled_while_its_job_talks_to_mailchimp(
    runtime: Runtime, clock: Any
) -> None:
    connect(runtime)
    view, _ = create.create(runtime, campaign_request(3, "mailchimp"))
    hold_lease(runtime, view.id, clock.now() + timedelta(seconds=30))
    with pytest.raises(control.CampaignStateError, match="MailChimp job runs"):
        control.cancel(runtime, view.id)
    assert control.view(runtime, view.id).status == "running"
    clock.advance(timedelta(seconds=31))  # the job ended (or died and its lease ran out)
    cancelled = control.cancel(runtime, view.id)
    assert cancelled.status == "cancelled"
    assert cancelled.failed_by_reason == {"campaign_cancelled": 3}


def hold_lease(rt: Runtime, campaign_id: str, until: Any) -> None:
    """Stand in for another run holding the campaign's job until ``until``."""
    with rt.sessions.begin() as session:
        session.execute(
            update(Campaign).where(Campaign.id == campaign_id).values(lease_until=until)
        )


def test_a_rerun_after_mailchimp_sent_records_contacts_refused_since_as_unknown(
    runtime: Runtime, fake: FakeMailchimp
) -> None:
    from dispatcher.campaigns.mailchimp import Member
    from dispatcher.campaigns.mailchimp_job import _send, render_for_mailchimp
    from dispatcher.models import User

    connect(runtime)
    view, [chunk] = create.create(runtime, campaign_request(4, "mailchimp"))
    # An earlier run got the campaign sent, then died before it recorded anything...
    with runtime.sessions() as session:
        c, user = session.get(Campaign, view.id), session.get(User, "agent-1")
        assert c is not None and user is not None
        session.expunge_all()
    members = [Member(f"person{i}@example.org", f"P{i}", None) for i in range(4)]
    rendered = render_for_mailchimp(c, RenderLimits.of(runtime.settings))
    asyncio.run(_send(runtime, c, user, members, rendered))
    [campaign] = fake.campaigns()
    assert fake.send_actions[campaign.id] == 1
    # ...and one contact unsubscribed in MailChimp before the job ran again.
    fake.add_member("person3@example.org", status="unsubscribed")

    assert campaign_run.deliver(runtime, f"{view.id}:{chunk}").value == "completed"
    after = control.view(runtime, view.id)
    assert (after.counts["sent"], after.counts["unknown"], after.counts["failed"]) == (3, 1, 0)
    assert len(fake.campaigns()) == 1 and fake.send_actions[campaign.id] == 1


def test_a_run_our_redis_failed_is_not_counted_as_an_attempt(
    runtime: Runtime, make_runtime: Any, fake: FakeMailchimp
) -> None:
    from redis.exceptions import RedisError

    from tests.conftest import free_port

    connect(runtime)
    view, [chunk] = create.create(runtime, campaign_request(3, "mailchimp"))
    cut_off = make_runtime(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisError):  # the connection slots live in Redis
        campaign_run.deliver(cut_off, f"{view.id}:{chunk}")
    with runtime.sessions() as session:
        row = session.execute(
            select(Campaign.attempts, Campaign.lease_until).where(Campaign.id == view.id)
        ).one()
    assert (row.attempts, row.lease_until) == (0, None)
    assert fake.calls == []
    assert campaign_run.deliver(runtime, f"{view.id}:{chunk}").value == "completed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # 20 s of client backoff
def test_once_mailchimp_was_asked_to_send_a_failure_is_unknown_and_no_cancel_is_taken(
    runtime: Runtime, fake: FakeMailchimp
) -> None:
    # The send action never gets a clear answer: MailChimp may or may not have sent it.
    connect(runtime)
    view, [chunk] = create.create(runtime, campaign_request(3, "mailchimp"))
    item = f"{view.id}:{chunk}"
    fake.inject(SEND, *[Fault.error(503)] * 100)
    with pytest.raises(MailchimpUnavailable):
        campaign_run.deliver(runtime, item)
    # It may have gone out: a cancel would write "cancelled before this email was sent".
    with pytest.raises(control.CampaignStateError, match="MailChimp may have sent it"):
        control.cancel(runtime, view.id)
    # The runs go on until the budget (3 retries) is spent; then nobody is recorded failed.
    for _ in range(2):
        with pytest.raises(MailchimpUnavailable):
            campaign_run.deliver(runtime, item)
    assert campaign_run.deliver(runtime, item).value == "failed"
    after = control.view(runtime, view.id)
    assert (after.counts["unknown"], after.counts["failed"]) == (3, 0)
    with runtime.sessions() as session:
        details = session.scalars(
            select(TimelineEvent.detail).where(TimelineEvent.user_id == "agent-1")
        ).all()
    assert len(details) == 3 and all("may have reached" in (d or "") for d in details)
