"""Campaigns accepted compactly (``CAMPAIGN_COMPACT_FROM``): answered ``reserving`` with their
recipients packed on the campaign row and their credits reserved; the first chunk task writes
the sends and starts the campaign. Credits stay exact through every step: counted once by a
Redis rebuild whether packed or written, written once whatever number of workers race, given
back when the request died before the answer."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import func, select

from devstack.devsmtp import DevSMTPServer
from dispatcher.campaigns import compact, control, create
from dispatcher.clock import FrozenClock
from dispatcher.credits.grants import campaign_key
from dispatcher.credits.ledger import snapshot
from dispatcher.credits.subscriptions import credits, ensure_current
from dispatcher.models import Campaign, CampaignStatus, Send, SendStatus
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import campaign_request, make_user, seed_used_credits, wait_for


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.with_overrides(
        campaign_chunk_size=100, smtp_pool_size=4, campaign_compact_from=200
    )


def _rows(rt: Runtime, campaign_id: str) -> list[tuple[str, SendStatus]]:
    with rt.sessions() as session:
        return [
            (r.idempotency_key, r.status)
            for r in session.execute(
                select(Send.idempotency_key, Send.status).where(Send.campaign_id == campaign_id)
            )
        ]


def _packed(rt: Runtime, campaign_id: str) -> bool:
    with rt.sessions() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(Campaign)
                .where(Campaign.id == campaign_id, Campaign.pending_recipients.is_not(None))
            )
            == 1
        )


def test_a_compact_campaign_is_counted_once_by_a_rebuild_packed_or_written(
    runtime: Runtime,
) -> None:
    # Given an agent with 100 credits used, and a campaign of 250 (compact from 200)
    rt = runtime
    make_user(rt)
    _, grant = ensure_current(rt, "agent-1")
    seed_used_credits(rt, "agent-1", 100)

    # When it is accepted
    view, chunks = create.create(rt, campaign_request(250))

    # Then it answers reserving, no send is written yet, and its credits are taken
    assert (view.status, view.recipients, chunks) == ("reserving", 250, [0])
    assert _rows(rt, view.id) == [] and _packed(rt, view.id)
    assert credits(rt, "agent-1").used == 350
    # ...the ledger counts the packed recipients pending under the campaign's key
    with rt.sessions() as session:
        snap = snapshot(session, grant)
    assert len(snap.charged_keys) == 100 and snap.pending == [(campaign_key(view.id), 250)]
    # ...so a Redis loss before the sends are written changes nothing
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == 350

    # When its first chunk task writes the sends (twice: a redelivered task)
    assert compact.finish(rt, view.id) is True
    assert compact.finish(rt, view.id) is False
    assert control.status_of(rt, view.id) is CampaignStatus.RUNNING

    # Then each recipient has one reserved send, nothing is packed any more, and the ledger
    # counts the sends instead, once
    rows = _rows(rt, view.id)
    assert len(rows) == 250 and {s for _, s in rows} == {SendStatus.RESERVED}
    assert not _packed(rt, view.id)
    with rt.sessions() as session:
        snap = snapshot(session, grant)
    assert len(snap.charged_keys) == 350 and snap.pending == []
    assert credits(rt, "agent-1").used == 350
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == 350


@pytest.mark.parametrize("round_", range(3))
def test_workers_racing_to_write_a_compact_campaigns_sends_write_them_once(
    runtime: Runtime, round_: int
) -> None:
    # Given a compact campaign of 1,200 recipients and six workers starting its chunks at
    # the same moment
    rt = runtime
    make_user(rt)
    view, _ = create.create(rt, campaign_request(1200))
    barrier = threading.Barrier(6)
    results: list[Any] = []

    def first_chunk_task() -> None:
        barrier.wait()
        try:
            results.append(compact.finish(rt, view.id))
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            results.append(exc)

    threads = [threading.Thread(target=first_chunk_task) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    # Then one of them started it, its sends were written once, and it holds exactly its
    # credits
    assert sorted(results) == [False] * 5 + [True]
    assert control.status_of(rt, view.id) is CampaignStatus.RUNNING
    keys = [k for k, _ in _rows(rt, view.id)]
    assert len(keys) == 1200 == len(set(keys))
    assert control.open_chunks(rt, view.id) == list(range(12))
    assert credits(rt, "agent-1").used == 1200
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == 1200


def test_a_compact_campaign_larger_than_the_balance_leaves_nothing(runtime: Runtime) -> None:
    rt = runtime
    make_user(rt)
    seed_used_credits(rt, "agent-1", 4800)  # 200 left
    with pytest.raises(create.InsufficientCredits):
        create.create(rt, campaign_request(300))
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 0
    assert credits(rt, "agent-1").used == 4800


def test_a_repeated_request_answers_with_the_compact_campaign_once_its_credits_are_taken(
    runtime: Runtime,
) -> None:
    rt = runtime
    make_user(rt)
    req = campaign_request(250, idempotency_key="spring-1")
    first, chunks = create.create(rt, req)
    again, more = create.create(rt, req)
    assert (again.id, again.replayed, again.status, more) == (first.id, True, "reserving", [])
    assert chunks == [0] and credits(rt, "agent-1").used == 250


@pytest.mark.parametrize("reserved", [False, True], ids=["before-reserve", "after-reserve"])
def test_a_compact_campaign_whose_request_died_is_failed_and_its_credits_come_back(
    runtime: Runtime, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, reserved: bool
) -> None:
    # Given a compact campaign whose request died before it could answer: before Redis
    # reserved its credits, or just after (before it marked them reserved)
    rt = runtime
    make_user(rt)
    reserve = rt.quota.reserve

    def dies(*args: Any, **kwargs: Any) -> Any:
        if reserved:
            reserve(*args, **kwargs)
        raise RedisConnectionError("connection lost")

    monkeypatch.setattr(rt.quota, "reserve", dies)
    with pytest.raises(RedisConnectionError):
        create.create(rt, campaign_request(250))
    monkeypatch.setattr(rt.quota, "reserve", reserve)
    with rt.sessions() as session:
        (campaign_id,) = session.scalars(select(Campaign.id)).all()
    assert credits(rt, "agent-1").used == (250 if reserved else 0)

    # Then no worker starts it (nobody was told it was accepted)
    assert compact.finish(rt, campaign_id) is False
    assert control.status_of(rt, campaign_id) is CampaignStatus.RESERVING
    clock.advance(compact.START_GRACE * 2)
    assert compact.sweep(rt) == 0
    assert _rows(rt, campaign_id) == [] and _packed(rt, campaign_id)

    # When the reserving sweep finds it after its grace
    clock.advance(control.RESERVING_GRACE)
    assert control.expire_reserving(rt) == 1

    # Then it failed, nothing is packed or sent, and no credit is kept
    assert control.status_of(rt, campaign_id) is CampaignStatus.FAILED
    assert not _packed(rt, campaign_id) and _rows(rt, campaign_id) == []
    assert credits(rt, "agent-1").used == 0
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == 0


def test_a_compact_campaign_whose_chunk_tasks_were_lost_is_started_by_the_sweep(
    runtime: Runtime, clock: FrozenClock
) -> None:
    # Given a compact campaign accepted, its first chunk task never handed out (create()
    # returns it; nobody enqueues it here)
    rt = runtime
    make_user(rt)
    view, _ = create.create(rt, campaign_request(250))

    # Then the sweep leaves it alone within its grace, and starts it after
    assert compact.sweep(rt) == 0
    clock.advance(compact.START_GRACE + timedelta(seconds=1))
    assert control.expire_reserving(rt) == 0  # not the reserving sweep's: its credits are held
    assert compact.sweep(rt) == 1
    assert control.status_of(rt, view.id) is CampaignStatus.RUNNING
    assert len(_rows(rt, view.id)) == 250 and credits(rt, "agent-1").used == 250
    assert compact.sweep(rt) == 0


def test_a_compact_campaign_is_delivered_end_to_end(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    # Given an agent and a campaign of 450 contacts, 3 of them invalid (compact from 200)
    make_user(runtime)
    body = {
        "user_id": "agent-1",
        "message": {
            "subject": "Open house, {{ first_name }}",
            "html": "<p>Hi {{ first_name }}</p>",
        },
        "recipients": [
            {
                "id": f"c{i}",
                "email": "nope" if i in (5, 50, 500) else f"person{i}@example.org",
                "fields": {"first_name": f"P{i}"},
            }
            for i in range(450)
        ],
    }

    # When it is posted
    r = api_client.post("/v1/campaigns", json=body)

    # Then it is answered while its credits are held and its sends not yet written
    assert r.status_code == 202, r.text
    answer = r.json()
    assert (answer["status"], answer["recipients"], answer["invalid"]) == ("reserving", 448, 2)

    # ...and the worker writes them (its first chunk task, which then hands out the other
    # four), and every valid contact gets one copy, with their name
    def done() -> bool:
        got = api_client.get(f"/v1/campaigns/{answer['id']}", params={"user_id": "agent-1"})
        return bool(got.json()["status"] == "completed")

    wait_for(done, timeout=60, what="the campaign completed")
    to = sorted(m.rcpt_tos[0] for m in smtp_server.messages)
    assert len(to) == 448 == len(set(to))
    assert "person5@example.org" not in to and "nope" not in to
    one = next(m for m in smtp_server.messages if m.rcpt_tos == ("person7@example.org",))
    assert b"Subject: Open house, P7" in one.data
    assert credits(runtime, "agent-1").used == 448


def test_a_compact_campaign_failed_by_the_sweep_before_its_request_marked_it_gives_back(
    runtime: Runtime, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a compact campaign's request so slow that the reserving sweep failed the campaign
    # between storing it and asking Redis for its credits
    rt = runtime
    make_user(rt)
    reserve = rt.quota.reserve

    def late(*args: Any, **kwargs: Any) -> Any:
        clock.advance(control.RESERVING_GRACE + timedelta(seconds=1))
        assert control.expire_reserving(rt) == 1
        return reserve(*args, **kwargs)

    monkeypatch.setattr(rt.quota, "reserve", late)

    # When the request gets its credits after all
    with pytest.raises(control.CampaignStateError):
        create.create(rt, campaign_request(250))

    # Then the campaign stays failed, nothing is packed or written, and no credit is kept
    with rt.sessions() as session:
        (c,) = session.scalars(select(Campaign)).all()
        assert (c.status, c.reserved_at) == (CampaignStatus.FAILED, None)
    assert not _packed(rt, c.id) and _rows(rt, c.id) == []
    assert credits(rt, "agent-1").used == 0
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == 0


def test_a_worker_lost_halfway_through_the_sends_leaves_the_rest_to_the_next(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a compact campaign of 250 (three chunks of 100, one per transaction) whose first
    # writer dies as it writes the third chunk, and Redis losing its data right then
    rt = runtime
    make_user(rt)
    monkeypatch.setattr(compact, "WRITE_SECONDS", 0.0)
    view, _ = create.create(rt, campaign_request(250))
    insert_sends = create.insert_sends
    calls: list[int] = []

    def dies_on_the_third(*args: Any) -> None:
        calls.append(len(calls))
        if len(calls) == 3:
            rt.redis.flushall()
            raise RuntimeError("worker lost")
        insert_sends(*args)

    monkeypatch.setattr(create, "insert_sends", dies_on_the_third)
    with pytest.raises(RuntimeError):
        compact.finish(rt, view.id)

    # Then two chunks are written, the campaign still reserving, and its credits counted
    # once by the rebuild (the rows written are within its packed count)
    assert len(_rows(rt, view.id)) == 200 and _packed(rt, view.id)
    assert control.status_of(rt, view.id) is CampaignStatus.RESERVING
    assert credits(rt, "agent-1").used == 250

    # When the next worker takes it up
    monkeypatch.setattr(create, "insert_sends", insert_sends)
    assert compact.finish(rt, view.id) is True

    # Then only the third chunk is written, once, and the credits are exact
    rows = _rows(rt, view.id)
    assert len(rows) == 250 == len({k for k, _ in rows})
    assert control.open_chunks(rt, view.id) == [0, 1, 2]
    assert credits(rt, "agent-1").used == 250
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == 250
