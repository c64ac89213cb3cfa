"""SmartPlan steps go before campaigns (dispatcher/delivery/priority.py): a SmartPlan task that
waited past SMARTPLAN_LAG_SECONDS in its queue marks SmartPlan as behind in Redis, and while the
mark lives a running campaign's lanes rest between messages; real Redis, SMTP server and worker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from prometheus_client import REGISTRY

from devstack.devsmtp import DevSMTPServer, slow
from dispatcher.delivery import priority
from dispatcher.delivery.priority import BEHIND_KEY, Behind, Yield
from dispatcher.redisclient import connect_async
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.campaigns.test_campaigns import campaign_body, finished, to_contacts
from tests.helpers import make_user, wait_for
from tests.test_smartplan_e2e import send_body

LANES = 4


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.with_overrides(
        campaign_chunk_size=500, smtp_pool_size=LANES, smartplan_lag_seconds=0.3
    )


@pytest.fixture
def long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mark that outlives the test's reading of it (the worker's wait is real, its hold is
    what a slow test machine could let expire before the assertion)."""
    monkeypatch.setattr(priority, "HOLD_SECONDS", 60.0)


def test_a_step_that_waited_past_the_lag_marks_smartplan_behind_one_that_did_not_does_not(
    runtime: Runtime,
    api_client: Any,
    celery_app: Any,
    smtp_server: DevSMTPServer,
    redis_client: redis.Redis,
    long_hold: None,
) -> None:
    make_user(runtime)
    # A step queued while no worker runs waits in the broker: past the 0.3 s lag.
    assert api_client.post("/v1/sends", json=send_body(1)).status_code == 202
    time.sleep(0.8)
    with start_worker(celery_app, pool="threads", concurrency=4, perform_ping_check=False):
        wait_for(lambda: len(smtp_server.messages) == 1, what="the step that waited")
        mark = redis_client.get(BEHIND_KEY)
        assert mark is not None and float(mark) >= 0.8, mark
        assert 0 < redis_client.pttl(BEHIND_KEY) <= 60_000

        # With the worker idle, a step goes at once: no mark.
        redis_client.delete(BEHIND_KEY)
        assert api_client.post("/v1/sends", json=send_body(2)).status_code == 202
        wait_for(lambda: len(smtp_server.messages) == 2, what="the step that did not wait")
        assert redis_client.get(BEHIND_KEY) is None


def test_a_campaign_slows_while_smartplan_is_behind_and_completes_after(
    runtime: Runtime,
    api_client: Any,
    smtp_server: DevSMTPServer,
    redis_client: redis.Redis,
    worker: Any,
) -> None:
    make_user(runtime)
    # Each message takes the relay at least 0.2 s: a lane sends at most 5 a second, and
    # resting REST_RATIO times that long after each, at most one a second.
    smtp_server.handler.fault = lambda stage, got: slow(0.2) if stage == "data" else None
    rested_before = rested()
    redis_client.set(BEHIND_KEY, "2.000", px=60_000)  # as a SmartPlan worker behind sets it
    cid = api_client.post("/v1/campaigns", json=campaign_body(100)).json()["id"]

    # It does not stop: each lane still sends.
    wait_for(lambda: len(to_contacts(smtp_server)) >= LANES, timeout=30, what="a slow start")
    start, at_start = time.monotonic(), len(to_contacts(smtp_server))
    time.sleep(3.0)
    elapsed = time.monotonic() - start
    sent = len(to_contacts(smtp_server)) - at_start
    # Not yielding, the four lanes would send about 5 a second each: some 60 in this time.
    bound = LANES * (elapsed / ((1 + priority.REST_RATIO) * 0.2) + 2)
    assert 0 < sent <= bound, (sent, bound)

    # SmartPlan caught up: the campaign goes on at full speed and completes, nobody twice.
    redis_client.delete(BEHIND_KEY)
    wait_for(lambda: finished(api_client, cid), timeout=60, what="the campaign completed")
    got = to_contacts(smtp_server)
    assert len(got) == 100 and len({m.message_id for m in got}) == 100
    # Operators see the rest: at least 0.8 s for each message counted above but the first.
    assert rested() - rested_before >= 0.8 * (sent - LANES), (rested(), rested_before)


def rested() -> float:
    """The worker's (this process's) dispatcher_campaign_rested_seconds_total."""
    return REGISTRY.get_sample_value("dispatcher_campaign_rested_seconds_total") or 0.0


def test_a_lane_rests_a_multiple_of_its_last_message_while_the_mark_lives(
    redis_url: str, redis_client: redis.Redis
) -> None:
    now = [50.0]

    async def rests(mark_ms: int | None, message_seconds: float) -> float:
        """What a lane rests before its second message, its first having taken so long."""
        if mark_ms is not None:
            redis_client.set(BEHIND_KEY, "1", px=mark_ms)
        client = connect_async(redis_url)
        try:
            yielding = Yield(client, clock=lambda: now[0])
            await yielding.turn()  # the first message: no rest, whatever the mark
            first = yielding.paused
            now[0] += message_seconds
            await yielding.turn()
            assert first == 0
            return yielding.paused
        finally:
            await client.aclose()
            redis_client.delete(BEHIND_KEY)

    assert asyncio.run(rests(None, 0.05)) == 0  # nobody behind: no rest at all
    assert asyncio.run(rests(60_000, 0.05)) == pytest.approx(priority.REST_RATIO * 0.05)
    assert asyncio.run(rests(60_000, 5.0)) == priority.MAX_PAUSE  # never more


def test_a_process_marks_at_most_every_mark_every_and_only_past_the_lag(
    redis_client: redis.Redis, redis_url: str, runtime: Runtime
) -> None:
    now = [100.0]
    behind = Behind(runtime.redis, 0.3, clock=lambda: now[0])
    assert not behind.waited(0.3)  # at the lag, not past it
    assert redis_client.get(BEHIND_KEY) is None
    assert behind.waited(0.5)
    assert redis_client.get(BEHIND_KEY) == b"0.500"
    assert 0 < redis_client.pttl(BEHIND_KEY) <= priority.HOLD_SECONDS * 1000
    redis_client.delete(BEHIND_KEY)
    now[0] += priority.MARK_EVERY / 2
    assert not behind.waited(0.9)  # marked a moment ago: no second SET
    assert redis_client.get(BEHIND_KEY) is None
    now[0] += priority.MARK_EVERY
    assert behind.waited(0.9)
    assert Behind(runtime.redis, 0).waited(3600) is False  # the rule turned off
