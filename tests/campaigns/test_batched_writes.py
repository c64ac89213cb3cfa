"""A chunk's outcomes are written one UPDATE per outcome class and batch, even when every
message's reply differs (an SMTP server's reply usually names its queue id), and each
recipient still gets its own reply, one timeline event, once, however often it is settled."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, select

from devstack.devsmtp import DevSMTPServer, Received, reply
from dispatcher.campaigns import create
from dispatcher.campaigns.run import deliver as deliver_chunk
from dispatcher.delivery import lifecycle
from dispatcher.delivery.lifecycle import Outcome
from dispatcher.models import CampaignStatus, Send, SendStatus, TimelineEvent
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime
from tests.helpers import campaign_request, make_user


@contextmanager
def send_updates(rt: Runtime) -> Iterator[list[str]]:
    """The UPDATE statements on sends issued meanwhile."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE SENDS"):
            seen.append(statement)

    event.listen(rt.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(rt.engine, "before_cursor_execute", before)


def _details(rt: Runtime, campaign_id: str) -> dict[str, tuple[SendStatus, str | None]]:
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.contact_email, Send.status, Send.detail).where(
                Send.campaign_id == campaign_id
            )
        ).all()
    return {email: (status, detail) for email, status, detail in rows}


def _events(rt: Runtime) -> list[tuple[str, str | None]]:
    with rt.sessions() as session:
        return [
            (e.contact_id, e.detail)
            for e in session.scalars(select(TimelineEvent).order_by(TimelineEvent.id))
        ]


def test_a_batch_with_a_reply_per_message_is_one_update_and_each_keeps_its_reply(
    make_runtime: Callable[..., Runtime], smtp_server: DevSMTPServer
) -> None:
    # Given a 30-recipient chunk and a server whose every acceptance names its own queue id
    rt = make_runtime(campaign_chunk_size=50)
    make_user(rt)
    view, _ = create.create(rt, campaign_request(30))
    queue_ids = itertools.count(1000)

    def accept_with_queue_id(stage: str, _got: Received) -> Any:
        return (
            reply(f"250 2.0.0 Ok: queued as Q{next(queue_ids)}", "data")
            if stage == "data"
            else None
        )

    smtp_server.handler.fault = accept_with_queue_id

    # When the chunk runs
    with send_updates(rt) as updates:
        assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.COMPLETED

    # Then each recipient is sent with its own reply, on its timeline once
    details = _details(rt, view.id)
    assert {status for status, _ in details.values()} == {SendStatus.SENT}
    replies = {detail for _, detail in details.values()}
    assert replies == {f"250 2.0.0 Ok: queued as Q{n}" for n in range(1000, 1030)}
    events = _events(rt)
    assert len(events) == 30 and {detail for _, detail in events} == replies
    # And the outcomes took one UPDATE (the claim another), not one per recipient
    settles = [u for u in updates if "finished_at" in u]
    assert len(settles) == 1

    # And the same chunk delivered again (a duplicated task) changes nothing
    assert deliver_chunk(rt, f"{view.id}:0") is CampaignStatus.COMPLETED
    assert _details(rt, view.id) == details and _events(rt) == events


def test_outcomes_settled_twice_are_recorded_once_each_with_their_own_detail(
    make_runtime: Callable[..., Runtime],
) -> None:
    # Given a claimed batch of 12 and outcomes in three classes, every detail its own
    rt = make_runtime(campaign_chunk_size=50)
    make_user(rt)
    view, _ = create.create(rt, campaign_request(12))
    claimed = lifecycle.claim_batch(rt, view.id, 0, 50)
    outcomes = [
        Outcome(row.id, SendStatus.SENT, None, f"250 ok {i}")
        if i < 8
        else Outcome(row.id, SendStatus.FAILED, Reason.HARD_BOUNCE, f"550 no user {i}")
        if i < 10
        else Outcome(row.id, SendStatus.UNKNOWN, Reason.WORKER_LOST, None)
        for i, row in enumerate(claimed)
    ]

    # When they are settled, and settled again (a retry after a crash that lost the answer)
    with send_updates(rt) as updates:
        first = lifecycle.settle(rt, outcomes, (SendStatus.SENDING,))
    again = lifecycle.settle(rt, outcomes, (SendStatus.SENDING,))

    # Then the first call settled all twelve, one UPDATE per class, and the second none
    assert sorted(first) == sorted(row.id for row in claimed) and again == []
    assert len([u for u in updates if "finished_at" in u]) == 3
    with rt.sessions() as session:
        stored = dict(session.execute(select(Send.id, Send.detail)).all())
        events = session.execute(select(TimelineEvent.send_id, TimelineEvent.detail)).all()
    assert stored == {o.send_id: o.detail for o in outcomes}
    assert sorted(events) == sorted((o.send_id, o.detail) for o in outcomes)
