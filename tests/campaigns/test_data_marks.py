"""A campaign recipient counts as "maybe delivered" only from the moment its message reached DATA.

Chunks mark each recipient in Redis after its RCPT was accepted and immediately before the DATA
command; a lost worker's recipients are settled by those marks. These tests read the marks from
inside a real aiosmtpd server while it talks to the dispatcher (the server's fault callback runs
at RCPT and after the final dot), and settle a lost worker's claims against marks in real Redis.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import select

from devstack.devsmtp import DROP_BEFORE_DATA, Action, DevSMTPServer, Received, reply
from dispatcher import keys
from dispatcher.campaigns import chunks, control, create
from dispatcher.campaigns.chunks import IN_DATA, OPEN_MARK
from dispatcher.campaigns.run import deliver as deliver_chunk
from dispatcher.clock import FrozenClock
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import lifecycle
from dispatcher.delivery.transports.base import Delivery
from dispatcher.errors import DeliveryDeferred, DeliveryRejected, NotAttempted
from dispatcher.models import CampaignStatus, Send, SendStatus
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime
from tests.crashkit import message_id
from tests.helpers import campaign_request, make_user

ACCEPTED = "250 2.0.0 OK: queued"


def _campaign(rt: Runtime, n: int) -> tuple[str, dict[str, Send]]:
    """A running campaign of agent-1 to person0..person{n-1}, all in chunk 0; its sends by
    address."""
    make_user(rt)
    view, _ = create.create(rt, campaign_request(n))
    with rt.sessions() as session:
        rows = session.scalars(select(Send).where(Send.campaign_id == view.id)).all()
        session.expunge_all()
    return view.id, {row.contact_email: row for row in rows}


def _by_address(rt: Runtime, campaign_id: str) -> dict[str, tuple[SendStatus, str | None, int]]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.contact_email, Send.status, Send.reason, Send.attempts).where(
                Send.campaign_id == campaign_id
            )
        ).all()
    return {email: (status, reason, attempts) for email, status, reason, attempts in rows}


def _received(server: DevSMTPServer) -> Counter[str]:
    return Counter(m.rcpt_tos[0] for m in server.messages)


def test_a_recipient_is_marked_once_its_rcpt_was_accepted_and_before_its_data(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer, redis_client: redis.Redis
) -> None:
    # Given a six-recipient campaign over two connections, and a server that refuses person1 at
    # RCPT (5xx), drops the connection at person2's RCPT and defers person3 after the final dot,
    # once each, and reads each recipient's mark at RCPT and after the final dot
    rt = make_runtime(campaign_chunk_size=50, smtp_pool_size=2)
    cid, sends = _campaign(rt, 6)
    key = keys.chunk_data(cid, 0)
    seen: list[tuple[str, str, bytes | None]] = []
    once: dict[tuple[str, str], str | Action] = {
        ("rcpt", "person1@example.org"): "550 5.1.1 no such user",
        ("rcpt", "person2@example.org"): DROP_BEFORE_DATA,
        ("data", "person3@example.org"): "451 4.3.0 try again later",
    }

    def fault(stage: str, got: Received) -> str | Action | None:
        address = got.rcpt_tos[-1]
        seen.append((stage, address, redis_client.hget(key, sends[address].id)))
        answer = once.pop((stage, address), None)
        if isinstance(answer, Action):
            return answer
        return reply(answer, stage) if answer is not None else None

    smtp_server.handler.fault = fault

    # When the chunk runs (and runs again for its deferred recipients)
    with pytest.raises(DeliveryDeferred):
        deliver_chunk(rt, f"{cid}:0")
    first_run = list(seen)
    after_first = {a: redis_client.hget(key, s.id) for a, s in sends.items()}
    assert deliver_chunk(rt, f"{cid}:0") is CampaignStatus.COMPLETED

    # Then no recipient was marked while its RCPT was being answered; every message the server
    # read was marked for its claim's attempt before DATA
    assert [(a, m) for stage, a, m in seen if stage == "rcpt" and m is not None] == []
    in_data = {(a, m) for stage, a, m in first_run if stage == "data"}
    assert in_data == {(f"person{i}@example.org", f"{IN_DATA}1".encode()) for i in (0, 3, 4, 5)}
    again = {(a, m) for stage, a, m in seen[len(first_run) :] if stage == "data"}
    assert again == {(f"person{i}@example.org", f"{IN_DATA}2".encode()) for i in (2, 3)}
    # and those refused or dropped at RCPT never were
    assert after_first["person1@example.org"] is None
    assert after_first["person2@example.org"] is None
    # And each outcome is the server's answer; everyone it accepted got exactly one copy
    outcomes = _by_address(rt, cid)
    assert outcomes["person1@example.org"] == (SendStatus.FAILED, Reason.HARD_BOUNCE, 1)
    assert {a: o[0] for a, o in outcomes.items() if a != "person1@example.org"} == {
        f"person{i}@example.org": SendStatus.SENT for i in (0, 2, 3, 4, 5)
    }
    assert _received(smtp_server) == Counter(f"person{i}@example.org" for i in (0, 2, 3, 4, 5))


def test_a_mark_that_cannot_be_written_sends_nothing_and_resets_the_conversation(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer, redis_client: redis.Redis
) -> None:
    # Given a campaign whose DATA marks cannot be written: while the first RCPT is answered the
    # chunk's key becomes a string, so the mark before DATA fails with a Redis error
    rt = make_runtime(campaign_chunk_size=50, smtp_pool_size=2)
    cid, sends = _campaign(rt, 5)
    key = keys.chunk_data(cid, 0)

    def fault(stage: str, _got: Received) -> None:
        if stage == "rcpt" and redis_client.type(key) == b"hash":
            redis_client.delete(key)
            redis_client.set(key, "not a hash")

    smtp_server.handler.fault = fault

    # When the chunk runs
    with pytest.raises(NotAttempted) as held:
        deliver_chunk(rt, f"{cid}:0")

    # Then the server never got as far as DATA: the pending MAIL and RCPT were reset, and every
    # recipient waits unattempted for the chunk's retry
    assert held.value.reason == Reason.GUARD_UNAVAILABLE
    assert smtp_server.handler.attempts == 0 and smtp_server.messages == []
    assert smtp_server.handler.resets >= 1
    assert set(_by_address(rt, cid).values()) == {(SendStatus.RESERVED, None, 0)}

    # And once Redis takes marks again, the retry sends each recipient exactly once
    smtp_server.handler.fault = None
    redis_client.delete(key)
    assert deliver_chunk(rt, f"{cid}:0") is CampaignStatus.COMPLETED
    assert _received(smtp_server) == Counter(list(sends))
    assert len({message_id(m) for m in smtp_server.messages}) == 5


@pytest.mark.parametrize("marks_whole", [True, False], ids=["marks-whole", "redis-lost-marks"])
def test_a_lost_workers_recipients_are_settled_by_their_data_marks(
    make_runtime: Callable[..., Runtime],
    smtp_server: DevSMTPServer,
    redis_client: redis.Redis,
    clock: FrozenClock,
    marks_whole: bool,
) -> None:
    # Given a worker that claimed four recipients and died: person0's message was accepted,
    # person1's DATA was under way, person2 carries a mark of an earlier claim (deferred after
    # its final dot), person3 never reached DATA
    rt = make_runtime(campaign_chunk_size=50)
    cid, sends = _campaign(rt, 4)
    claimed = lifecycle.claim_batch(rt, cid, 0, 50)
    assert {row.attempts for row in claimed} == {1}
    key = keys.chunk_data(cid, 0)
    marks = {
        sends["person0@example.org"].id: ACCEPTED,
        sends["person1@example.org"].id: f"{IN_DATA}1",
        sends["person2@example.org"].id: f"{IN_DATA}0",
    }
    if marks_whole:
        marks[OPEN_MARK] = "1"
    redis_client.hset(key, mapping=marks)

    # When its leases run out and the chunk runs again
    clock.advance(timedelta(seconds=rt.settings.send_lease_seconds + 1))
    assert deliver_chunk(rt, f"{cid}:0") is CampaignStatus.COMPLETED

    # Then the accepted message is sent and never resent; the one in DATA is unknown (credit
    # kept, never resent); those that never reached DATA are sent now, once. Should Redis have
    # lost the marks, all but the accepted one are unknown.
    outcomes = {a: o[:2] for a, o in _by_address(rt, cid).items()}
    lost = (SendStatus.UNKNOWN, Reason.WORKER_LOST)
    resent = (SendStatus.SENT, None) if marks_whole else lost
    assert outcomes == {
        "person0@example.org": (SendStatus.SENT, None),
        "person1@example.org": lost,
        "person2@example.org": resent,
        "person3@example.org": resent,
    }
    expected = ["person2@example.org", "person3@example.org"] if marks_whole else []
    assert _received(smtp_server) == Counter(expected)
    assert credits(rt, "agent-1").used == 4
    view = control.view(rt, cid)
    assert view.counts["unknown"] == (1 if marks_whole else 3)


def test_marks_asked_during_a_round_trip_share_the_next_one_and_each_waits_for_its_own(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a batch of eight messages: the first two reach DATA one after the other and end
    # (one accepted, one refused); the third asks for its mark, and while that round trip is
    # under way the other five ask for theirs
    rows = [SimpleNamespace(id=f"send-{i}", attempts=1) for i in range(8)]
    batch = chunks._Batch(ready=[(row, "subject", b"") for row in rows])
    key = "ced:test:{marks}:0:data"

    async def scenario() -> list[dict[bytes, bytes]]:
        client = AsyncRedis.from_url(redis_url)
        marks = chunks._DataMarks(client, key, batch)
        seen: list[dict[bytes, bytes]] = []

        async def conversation(item: int) -> None:
            await marks.before_data(item)
            seen.append(redis_client.hgetall(key))  # what the server may have from here on

        try:
            await conversation(0)
            await conversation(1)
            marks.after_data(0, Delivery(250, "2.0.0 OK"))
            marks.after_data(1, DeliveryRejected(Reason.HARD_BOUNCE, "550 no such user"))

            async def the_others() -> None:
                await asyncio.sleep(0)  # the third's round trip is under way
                await asyncio.gather(*(conversation(i) for i in range(3, 8)))

            await asyncio.gather(conversation(2), the_others())
        finally:
            await client.aclose()
        return seen

    # When they ask for their marks
    before = _writes(redis_client)
    seen = asyncio.run(scenario())
    after = _writes(redis_client)

    # Then each went on to DATA only once its own mark was stored for this claim
    for item, stored in zip((0, 1, 2), seen[:3], strict=True):
        assert stored[f"send-{item}".encode()] == f"{IN_DATA}1".encode()
    for stored in seen[3:]:
        assert all(stored[f"send-{i}".encode()] == f"{IN_DATA}1".encode() for i in range(3, 8))
    final = redis_client.hgetall(key)
    assert {k.decode(): v.decode() for k, v in final.items()} == {
        "send-0": "250 2.0.0 OK",  # how DATA ended went with the next mark
        **{f"send-{i}": f"{IN_DATA}1" for i in range(2, 8)},
    }
    # And the five marks asked during a round trip went together in the next one: four HSETs
    # at the server for eight marks, and one HDEL (the refused message's end, sent with the
    # third's mark)
    assert {name: after[name] - before[name] for name in after} == {"hset": 4, "hdel": 1}


def _writes(client: redis.Redis) -> dict[str, int]:
    """How many HSET and HDEL commands the server has run so far."""
    stats = client.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("hset", "hdel")}
