"""The outbox sweep enqueues work that was stored while the broker was out of reach."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker
from sqlalchemy import update

from devstack.devsmtp import Action, DevSMTPServer, FaultPlan
from dispatcher import monitoring
from dispatcher import recovery as outbox
from dispatcher.campaigns import control, create
from dispatcher.clock import FrozenClock
from dispatcher.credits.subscriptions import change, credits
from dispatcher.delivery import lifecycle
from dispatcher.delivery import smartplan as delivery
from dispatcher.errors import DeliveryDeferred
from dispatcher.models import Send, SendStatus
from dispatcher.ports import InlineQueue, OutboxOnly
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.crashkit import RestartableRedis
from tests.helpers import campaign_request, make_user, seed_used_credits, send_request, wait_for
from workers.app import create_app
from workers.queue import CeleryTaskQueue


def test_work_stored_without_a_broker_is_enqueued_once_by_the_sweep(
    runtime: Runtime, clock: FrozenClock
) -> None:
    # Given a process that cannot reach the broker (the CLI's queue leaves work to the sweep)
    make_user(runtime, mailchimp_api_key="k-us6", mailchimp_list_id="list1")
    runtime.queue = OutboxOnly()
    change(runtime, "agent-1", "upgrade", "10k")  # a receipt email
    c, _ = create.create(
        runtime,
        create.CampaignRequest(
            user_id="agent-1",
            provider="command_email",
            subject="s",
            html="<p>h</p>",
            recipients=[create.Recipient(f"c{i}", f"p{i}@example.org") for i in range(3)],
        ),
    )
    control.enqueue(runtime, c.id, [0])
    # A MailChimp campaign's recipients wait as queued sends for their campaign's job: the
    # sweep enqueues the campaign, never the recipients as sends of their own.
    mc, _ = create.create(
        runtime,
        create.CampaignRequest(
            user_id="agent-1",
            provider="mailchimp",
            subject="s",
            html="<p>h</p>",
            recipients=[create.Recipient(f"m{i}", f"m{i}@example.org") for i in range(3)],
        ),
    )
    submit_send(runtime, runtime.queue, send_request())
    queue = InlineQueue()
    runtime.queue = queue
    # When the sweep runs too early, nothing moves; after the grace, everything goes once
    assert outbox.sweep(runtime) == (0, 0, 0)
    clock.advance(timedelta(minutes=2))
    assert outbox.sweep(runtime) == (1, 1, 2)
    assert (len(queue.enqueued), len(queue.system_emails), sorted(queue.campaign_chunks)) == (
        1,
        1,
        sorted([(c.id, 0), (mc.id, 0)]),
    )
    assert outbox.sweep(runtime) == (0, 0, 0)


def test_work_whose_task_message_was_lost_is_enqueued_again_once_stale(
    runtime: Runtime, clock: FrozenClock, smtp_server: DevSMTPServer
) -> None:
    # Given a send deferred by the server (its retry message lives only in the broker)
    make_user(runtime)
    queue = InlineQueue()
    runtime.queue = queue
    send_id = submit_send(runtime, queue, send_request()).send_id
    smtp_server.handler.fault = lambda stage, _r: "451 4.3.0 later" if stage == "data" else None
    with pytest.raises(DeliveryDeferred):
        delivery.deliver(runtime, send_id)
    smtp_server.handler.fault = None
    queue.enqueued.clear()
    # When the broker loses that message, nothing happens while a retry could still come
    assert outbox.recover_stale(runtime) == (0, 0, 0)
    clock.advance(lifecycle.stale_after(runtime) + timedelta(seconds=1))
    # Then once stale it is enqueued again, and delivering it sends one message
    assert outbox.recover_stale(runtime) == (1, 0, 0)
    assert queue.enqueued == [send_id]
    assert delivery.deliver(runtime, send_id).value == "sent"
    assert len(smtp_server.messages) == 1
    assert outbox.recover_stale(runtime) == (0, 0, 0)


class _ProcessDied(BaseException):
    """Stands for the process dying at a given step (nothing after it runs)."""


@pytest.mark.parametrize("dies", ["before_reserving", "after_reserving"])
def test_a_campaign_whose_request_died_while_reserving_is_failed_and_its_credits_return(
    runtime: Runtime, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, dies: str
) -> None:
    from dispatcher.credits import notices
    from dispatcher.credits.subscriptions import credits

    make_user(runtime)
    if dies == "before_reserving":
        target, name = runtime.quota, "reserve"
    else:
        target, name = notices, "after_reservation"

    def die(*_a: object, **_k: object) -> None:
        raise _ProcessDied()

    monkeypatch.setattr(target, name, die)
    request = campaign_request(40)
    with pytest.raises(_ProcessDied):
        create.create(runtime, request)
    monkeypatch.undo()
    # Held meanwhile when the process got as far as reserving them.
    assert credits(runtime, "agent-1").used == (40 if dies == "after_reserving" else 0)

    assert control.expire_reserving(runtime) == 0  # the request may still be alive
    clock.advance(control.RESERVING_GRACE + timedelta(seconds=1))
    assert control.expire_reserving(runtime) == 1
    assert control.expire_reserving(runtime) == 0

    with runtime.sessions() as session:
        from sqlalchemy import select

        from dispatcher.models import Campaign

        c = session.scalars(select(Campaign)).one()
    view = control.view(runtime, c.id)
    assert view.status == "failed"
    assert view.failed_by_reason == {"campaign_not_started": 40}
    assert credits(runtime, "agent-1").used == 0
    runtime.redis.flushall()  # and the SQL ledger agrees
    assert credits(runtime, "agent-1").used == 0


def test_a_request_the_sweep_gave_up_on_gives_its_reservation_back_once(
    runtime: Runtime, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import func, select

    from dispatcher.credits import notices
    from dispatcher.credits.subscriptions import credits
    from dispatcher.models import Send

    make_user(runtime)
    real = notices.after_reservation

    def slow_request(*args: object, **kwargs: object) -> None:
        # The request stalls after reserving, long enough for the sweep to give up on it.
        clock.advance(control.RESERVING_GRACE + timedelta(seconds=1))
        assert control.expire_reserving(runtime) == 1
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(notices, "after_reservation", slow_request)
    request = campaign_request(40)
    with pytest.raises(control.CampaignStateError):
        create.create(runtime, request)
    assert credits(runtime, "agent-1").used == 0
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).where(Send.refund_due.is_(True))) == 0
    runtime.redis.flushall()  # and the SQL ledger agrees
    assert credits(runtime, "agent-1").used == 0


def test_step_outcomes_lost_with_redis_are_published_again(
    runtime: Runtime, smtp_server: DevSMTPServer, clock: FrozenClock
) -> None:
    from dispatcher.delivery.outcomes import OutcomeStream

    make_user(runtime)
    ids = [submit_send(runtime, InlineQueue(), send_request(n=n)).send_id for n in range(3)]
    for send_id in ids:
        delivery.deliver(runtime, send_id)
    stream = OutcomeStream(runtime.redis, runtime.settings.outcome_stream)
    clock.advance(timedelta(minutes=1))
    # No epoch marker yet: this Redis may be one that lost its data, so the recent outcomes
    # are published again (at least once: the engine dedupes on send_id).
    assert outbox.republish_outcomes(runtime) == 3
    assert sorted({o.send_id for _, o in stream.read("engine", "e1")}) == sorted(ids)
    assert outbox.republish_outcomes(runtime) == 0

    runtime.redis.flushall()  # Redis restarts empty: the stream and its group are gone
    assert outbox.republish_outcomes(runtime) == 3
    assert sorted(o.send_id for _, o in stream.read("engine", "e1")) == sorted(ids)
    assert outbox.republish_outcomes(runtime) == 0  # and only once per loss


def test_open_work_is_enqueued_again_at_once_when_redis_lost_its_data(
    runtime: Runtime, clock: FrozenClock
) -> None:
    # Given open work whose task messages are in the broker
    make_user(runtime)
    queue = InlineQueue()
    runtime.queue = queue
    send_id = submit_send(runtime, queue, send_request()).send_id
    view, chunks = create.create(runtime, campaign_request(3))
    control.enqueue(runtime, view.id, chunks, queue)
    assert outbox.recover_lost(runtime) == (1, 0, 1)  # a Redis never seen before: once
    queue.enqueued.clear()
    queue.campaign_chunks.clear()
    assert outbox.recover_lost(runtime) == (0, 0, 0)

    # When Redis loses its data (the broker's task messages with it), a minute later at most
    runtime.redis.flushall()
    clock.advance(timedelta(seconds=60))

    # Then the next sweep enqueues it all again at once, long before it would count as stale
    assert outbox.recover_stale(runtime) == (0, 0, 0)
    assert outbox.recover_lost(runtime) == (1, 0, 1)
    assert (queue.enqueued, queue.campaign_chunks) == ([send_id], [(view.id, 0)])
    assert outbox.recover_lost(runtime) == (0, 0, 0)  # once per loss


def test_a_retry_the_broker_does_not_take_is_parked_for_the_sweep_not_dropped(
    make_runtime: Callable[..., Runtime],
    smtp_server: DevSMTPServer,
    clock: FrozenClock,
    tmp_path: Path,
) -> None:
    """The relay defers a send (451) while the broker (Redis) is down: Celery cannot publish
    the retry and would drop the message. The wait is parked in SQL instead, the credit still
    held for the send, and the beat's sweep hands it to the broker once due: sent once."""
    with RestartableRedis(tmp_path / "redis") as broker:
        rt = make_runtime(redis_url=broker.url)
        app = create_app(rt.settings, rt)
        make_user(rt)
        smtp_server.handler.fault = FaultPlan(
            by_recipient={"contact1@example.org": [Action("rcpt", "451 4.3.0 later", delay=1.0)]}
        )
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            send_id = submit_send(rt, CeleryTaskQueue(app), send_request()).send_id
            wait_for(lambda: bool(smtp_server.handler.mail_at), what="the conversation")
            broker.kill()  # while the relay thinks it over: the retry has nowhere to go

            def parked() -> bool:
                with rt.sessions() as session:
                    send = session.get(Send, send_id)
                    return send is not None and send.retry_at is not None

            wait_for(parked, what="the send parked")
            broker.start()  # empty
            with rt.sessions() as session:
                send = session.get(Send, send_id)
                assert send is not None and send.retry_at is not None
                assert (send.status, send.attempts) == (SendStatus.RESERVED, 1)
                # A short wait (the retry's countdown), not the credit's hold of many minutes.
                assert (send.retry_at - clock.now()).total_seconds() <= 1.0
        inline = InlineQueue()
        rt.queue = inline
        clock.advance(timedelta(seconds=2))
        outbox.sweep(rt)
        assert inline.enqueued == [send_id]
        assert delivery.deliver(rt, send_id) is SendStatus.SENT
        assert len(smtp_server.messages) == 1
        assert credits(rt, "agent-1").used == 1


def test_the_sweeps_and_the_metrics_snapshot_read_while_a_write_is_under_way(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """The beat's sweeps and the metrics' snapshot read without waiting for the database's
    writer (on SQLite every write transaction holds the one writer): with another thread's
    write open they answer from the last commit, and that write stays open until they do."""
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", 3)
    writing, reads_done = threading.Event(), threading.Event()
    held_through_reads: list[bool] = []

    def write_uncommitted() -> None:
        with runtime.sessions.begin() as session:
            session.execute(
                update(Send).where(Send.user_id == "agent-1").values(status=SendStatus.SENDING)
            )
            writing.set()
            held_through_reads.append(reads_done.wait(10))

    writer = threading.Thread(target=write_uncommitted)
    writer.start()
    assert writing.wait(10)
    stale = outbox.recover_stale(runtime)
    stranded = outbox.sweep(runtime)
    finished = monitoring.finished_recently(runtime)
    reads_done.set()
    writer.join(10)
    assert held_through_reads == [True]  # the write was still open when the reads ended
    assert stale == (0, 0, 0) and stranded == (0, 0, 0)
    assert finished == {("smartplan", "sent"): 3}
    assert monitoring.finished_recently(runtime) == {("smartplan", "sending"): 3}  # committed
