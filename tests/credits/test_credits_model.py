"""Property-based stateful test: random sends, upgrades, downgrades, cancels, Redis flushes, beat
runs and clock moves across month ends and time zones, against real Redis and the database,
compared step by step with a small reference model of rules R1-R10."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import delete, select

from dispatcher.clock import FrozenClock
from dispatcher.credits.periods import period_at
from dispatcher.credits.subscriptions import change, credits, next_period_id, renew_due
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery.transports.memory import MemoryTransport
from dispatcher.errors import InvalidInput
from dispatcher.models import Base, Notification, Order
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import make_user, send_request

FREE = 10
PLANS = {"free": 10, "p20": 20, "p40": 40}
CATALOG = (("p20", 20, 1000), ("p40", 40, 2000))
ZONES = {
    "kiwi": "Pacific/Auckland",  # UTC+13 in November, daylight saving
    "angeleno": "America/Los_Angeles",  # daylight saving ends in November
    "islander": "Pacific/Kiritimati",  # UTC+14
    "londoner": "UTC",
}
THRESHOLDS = (80, 85, 90, 95, 100)


@dataclass
class UserModel:
    zone: str
    period: str
    plan: str = "free"
    pending: str | None = None
    total: int = FREE
    used: int = 0
    notified: int = 0
    orders: list[tuple[str, str, str]] = field(default_factory=list)
    notices: list[int] = field(default_factory=list)

    def roll(self, now: datetime) -> None:
        target = period_at(now, self.zone).id
        while self.period < target:
            self.period = next_period_id(self.period)
            self.plan, self.pending = self.pending or self.plan, None
            if self.plan != "free":
                self.orders.append(("renewal", self.plan, self.period))
            self.total, self.used, self.notified = PLANS[self.plan], 0, 0

    def regrant(self, plan: str) -> None:
        self.plan, self.pending = plan, None
        self.total, self.used, self.notified = PLANS[plan], 0, 0

    def send(self) -> str:
        if self.used >= self.total:
            return "failed"
        self.used += 1
        reached = max((t for t in THRESHOLDS if self.used * 100 >= t * self.total), default=0)
        if reached > self.notified:
            self.notified = reached
            self.notices.append(reached)
        return "sent"


class CreditsMachine(RuleBasedStateMachine):
    rt: Runtime
    clock: FrozenClock

    def __init__(self) -> None:
        super().__init__()
        with self.rt.sessions.begin() as s:
            for table in reversed(Base.metadata.sorted_tables):
                s.execute(delete(table))
        self.rt.redis.flushall()
        self.clock.set(datetime(2026, 10, 24, 12, tzinfo=UTC))
        self.model: dict[str, UserModel] = {}
        self.counter = 0
        for user, zone in ZONES.items():
            make_user(self.rt, user, timezone=zone)
            self.model[user] = UserModel(zone, period_at(self.clock.now(), zone).id)

    @rule(user=st.sampled_from(sorted(ZONES)), count=st.integers(1, 9))
    def send(self, user: str, count: int) -> None:
        m = self.model[user]
        m.roll(self.clock.now())
        for _ in range(count):
            self.counter += 1
            req = send_request(user, n=self.counter, run_id=f"run-{self.counter}")
            send_id = submit_send(self.rt, InlineQueue(), req).send_id
            assert delivery.deliver(self.rt, send_id).value == m.send()

    @rule(user=st.sampled_from(sorted(ZONES)), data=st.data())
    def upgrade(self, user: str, data: st.DataObject) -> None:
        m = self.model[user]
        m.roll(self.clock.now())
        larger = [p for p in PLANS if PLANS[p] > PLANS[m.plan]]
        if larger and data.draw(st.integers(0, 4), label="valid") > 0:
            plan = data.draw(st.sampled_from(larger), label="plan")
            change(self.rt, user, "upgrade", plan)
            m.orders.append(("upgrade", plan, m.period))
            m.regrant(plan)
        else:
            plan = data.draw(st.sampled_from([p for p in PLANS if p not in larger]), label="plan")
            with pytest.raises(InvalidInput):
                change(self.rt, user, "upgrade", plan)

    @rule(user=st.sampled_from(sorted(ZONES)), data=st.data())
    def downgrade(self, user: str, data: st.DataObject) -> None:
        m = self.model[user]
        m.roll(self.clock.now())
        smaller = [p for p in PLANS if PLANS[p] < PLANS[m.plan]]
        if smaller and data.draw(st.integers(0, 4), label="valid") > 0:
            plan = data.draw(st.sampled_from(smaller), label="plan")
            change(self.rt, user, "downgrade", plan)
            m.pending = plan
        else:
            plan = data.draw(st.sampled_from([p for p in PLANS if p not in smaller]), label="plan")
            with pytest.raises(InvalidInput):
                change(self.rt, user, "downgrade", plan)

    @rule(user=st.sampled_from(sorted(ZONES)))
    def cancel(self, user: str) -> None:
        m = self.model[user]
        m.roll(self.clock.now())
        if m.plan != "free":
            change(self.rt, user, "cancel")
            m.regrant("free")
        else:
            with pytest.raises(InvalidInput):
                change(self.rt, user, "cancel")

    @rule()
    def flush_redis(self) -> None:
        self.rt.redis.flushall()

    @rule()
    def beat(self) -> None:
        renew_due(self.rt)

    @rule(hours=st.sampled_from([1, 5, 11, 24, 24 * 6, 24 * 17, 24 * 31]))
    def advance_clock(self, hours: int) -> None:
        self.clock.advance(timedelta(hours=hours))

    @invariant()
    def matches_the_model(self) -> None:
        for user, m in self.model.items():
            m.roll(self.clock.now())
            c = credits(self.rt, user)
            assert (c.period, c.plan, c.pending_downgrade, c.total, c.used) == (
                m.period,
                m.plan,
                m.pending,
                m.total,
                m.used,
            ), user
            assert c.thresholds_notified == [t for t in THRESHOLDS if t <= m.notified], user
            with self.rt.sessions() as s:
                orders = [
                    (o.kind.value, o.plan, o.period)
                    for o in s.scalars(
                        select(Order).where(Order.user_id == user).order_by(Order.id)
                    )
                ]
                notices = list(
                    s.scalars(
                        select(Notification.threshold)
                        .where(Notification.user_id == user)
                        .order_by(Notification.id)
                    )
                )
            assert orders == m.orders, user
            assert notices == m.notices, user


@pytest.mark.slow
def test_credits_follow_the_rules_under_random_operations(
    make_runtime: Any, clock: FrozenClock
) -> None:
    CreditsMachine.rt = make_runtime(
        free_plan_credits=FREE, plan_catalog=CATALOG, transport=MemoryTransport()
    )
    CreditsMachine.clock = clock
    # The rules are the same on both databases; PostgreSQL's round trips cost more, so it
    # plays half as many random histories (the suite's time).
    postgres = CreditsMachine.rt.settings.database_url.startswith("postgresql")
    run_state_machine_as_test(
        CreditsMachine,
        settings=settings(
            max_examples=15 if postgres else 30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
