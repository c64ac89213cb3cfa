"""A refund Redis could not take when the failure was recorded is made later by the sweep:
the failure and the flag are one transaction, the refund happens once per key."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from redis.exceptions import RedisError
from sqlalchemy import func, select, text

from devstack.devsmtp import DevSMTPServer, FaultPlan, reply
from dispatcher.campaigns import control, create
from dispatcher.clock import FrozenClock
from dispatcher.credits import refunds
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import smartplan as delivery
from dispatcher.errors import DeliveryDeferred
from dispatcher.models import Send, SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.conftest import free_port
from tests.helpers import campaign_request, make_user, send_request

RECIPIENTS = 30


def used(rt: Runtime, user_id: str) -> int:
    _, grant = ensure_current(rt, user_id)
    state = rt.quota.state(grant)
    assert state is not None, "the grant is in Redis"
    return state[0]


def refunds_due(rt: Runtime) -> int:
    with rt.sessions() as session:
        return int(session.scalar(select(func.count()).where(Send.refund_due.is_(True))) or 0)


def start(rt: Runtime, n: int) -> str:
    view, _chunks = create.create(rt, campaign_request(n))
    return view.id


def test_a_cancel_whose_refund_redis_refused_is_refunded_by_the_sweep_once(
    runtime: Runtime, make_runtime: Callable[..., Runtime], clock: FrozenClock
) -> None:
    make_user(runtime, "agent-1")
    campaign_id = start(runtime, RECIPIENTS)
    assert used(runtime, "agent-1") == RECIPIENTS

    # Cancelled through a process whose Redis is unreachable: SQL records the cancellation
    # and the cancel is answered; the refund after the commit fails and is left to the sweep.
    cut_off = make_runtime(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert control.cancel(cut_off, campaign_id).status == "cancelled"
    assert control.view(runtime, campaign_id).failed_by_reason == {"campaign_cancelled": RECIPIENTS}
    assert used(runtime, "agent-1") == RECIPIENTS  # Redis still holds the credits...
    assert refunds_due(runtime) == RECIPIENTS  # ...and SQL knows they are owed

    # Too early for the sweep: the request that recorded them may still be making them.
    assert refunds.retry_due(runtime) == 0
    clock.advance(refunds.RETRY_AFTER + timedelta(seconds=1))
    assert refunds.retry_due(runtime) == RECIPIENTS
    assert used(runtime, "agent-1") == 0
    assert refunds_due(runtime) == 0
    # Made once: another sweep and a late refund of the same keys give nothing more.
    assert refunds.retry_due(runtime) == 0
    with runtime.sessions() as session:
        ids = list(session.scalars(select(Send.id).where(Send.campaign_id == campaign_id)))
    assert refunds.give_back(runtime, ids) == 0
    assert used(runtime, "agent-1") == 0


def test_a_smartplan_refund_redis_refused_is_made_by_the_sweep(
    runtime: Runtime,
    make_runtime: Callable[..., Runtime],
    clock: FrozenClock,
    smtp_server: DevSMTPServer,
) -> None:
    make_user(runtime, "agent-1")
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    # Reserved and deferred, then its task is lost for good...
    smtp_server.handler.fault = FaultPlan(schedule=[reply("451 4.3.0 later")])
    with pytest.raises(DeliveryDeferred):
        delivery.deliver(runtime, send_id)
    assert used(runtime, "agent-1") == 1
    with runtime.sessions() as session:
        lease = session.scalar(select(Send.lease_until).where(Send.id == send_id))
    assert lease is not None
    # ...so its reservation expires, but the Redis that should take the credit back is gone.
    cut_off = make_runtime(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisError):  # the refund is left to the sweep; the outcome's
        delivery.expire_reservation(cut_off, send_id, lease)  # stream entry fails too
    with runtime.sessions() as session:
        send = session.get(Send, send_id)
        assert send is not None
        assert (send.status, send.reason, send.refund_due) == (
            SendStatus.FAILED,
            "reservation_expired",
            True,
        )
    assert used(runtime, "agent-1") == 1

    clock.advance(refunds.RETRY_AFTER + timedelta(seconds=1))
    assert refunds.retry_due(runtime) == 1
    assert used(runtime, "agent-1") == 0
    assert refunds_due(runtime) == 0


def test_the_sweeps_indexes_hold_only_the_sends_they_look_for(runtime: Runtime) -> None:
    """The refund sweep's and the parked sends' indexes are partial (every other send costs
    them nothing when stored or moved on), and the refund sweep's query matches its index's
    condition: on SQLite, whose plan follows from the schema alone, it searches the index
    rather than scanning every send."""
    engine = runtime.engine
    names = ("ix_sends_retry_at", "ix_sends_refund_due")
    if engine.dialect.name == "sqlite":
        schema = "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
    else:
        schema = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'sends'"
    with engine.connect() as conn:
        found = {name: sql for name, sql in conn.execute(text(schema)) if name in names}
        # As SQLite and PostgreSQL print them, without what only one of them prints.
        ddl = {
            name: " ".join(
                sql.lower()
                .replace("public.", "")
                .replace(" using btree", "")
                .translate(str.maketrans("", "", "()"))
                .split()
            )
            for name, sql in found.items()
        }
        assert ddl["ix_sends_retry_at"].endswith("on sends retry_at where retry_at is not null")
        assert ddl["ix_sends_refund_due"].split(" where ")[1] in (
            "refund_due is 1",
            "refund_due is true",
        ), ddl
        assert ddl["ix_sends_refund_due"].split(" where ")[0].endswith("on sends updated_at")
        if engine.dialect.name == "sqlite":
            query = refunds.due_since(runtime.clock.now(), 100)
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            plan = " ".join(row[-1] for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
            assert "USING INDEX ix_sends_refund_due" in plan, plan
