"""Plans over time (R1, R2, R6-R10): upgrade, downgrade, cancel, renewal, orders and receipts."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher.api.app import create_api
from dispatcher.clock import FrozenClock
from dispatcher.credits import subscriptions
from dispatcher.credits.subscriptions import change, credits, ensure_current, orders, renew_due
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import system_mail
from dispatcher.delivery.transports.memory import MemoryTransport
from dispatcher.models import Order, SystemEmail
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import make_user, seed_used_credits, send_request

NZ_LAST_MINUTE = datetime(2026, 11, 30, 10, 59, tzinfo=UTC)  # 23:59 on Nov 30 in Auckland


@pytest.fixture
def api(runtime: Runtime) -> TestClient:
    return TestClient(
        create_api(runtime, InlineQueue()), headers={"Authorization": "Bearer test-token-123"}
    )


def send_n(rt: Runtime, user: str, n: int, tag: str = "") -> list[str]:
    """Deliver ``n`` SmartPlan sends for ``user`` through the in-memory transport."""
    out = []
    for i in range(n):
        send_id = submit_send(
            rt,
            InlineQueue(),
            send_request(user, n=i, run_id=f"run{tag}-{rt.clock.now():%Y%m%d%H%M%S}-{i}"),
        ).send_id
        out.append(delivery.deliver(rt, send_id).value)
    return out


def receipts(rt: Runtime, user: str) -> list[SystemEmail]:
    with rt.sessions() as s:
        return list(
            s.scalars(
                select(SystemEmail)
                .where(SystemEmail.user_id == user, SystemEmail.kind == "receipt")
                .order_by(SystemEmail.created_at)
            ).all()
        )


def test_plans_are_listed_smallest_first(api: TestClient) -> None:
    plans = api.get("/v1/plans").json()["items"]
    assert [(p["name"], p["monthly_credits"]) for p in plans] == [
        ("free", 5000),
        ("10k", 10_000),
        ("25k", 25_000),
        ("50k", 50_000),
        ("100k", 100_000),
    ]
    assert all(p["price_cents"] > 0 for p in plans[1:])


def test_upgrade_charges_grants_the_new_total_at_once_and_emails_a_receipt(
    runtime: Runtime, api: TestClient, smtp_server: DevSMTPServer
) -> None:
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", 4990)
    r = api.post("/v1/users/agent-1/subscription", json={"action": "upgrade", "plan": "25k"})
    assert r.status_code == 201, r.text
    order = r.json()["order"]
    assert (order["plan"], order["amount_cents"], order["credits"], order["kind"]) == (
        "25k",
        3000,
        25_000,
        "upgrade",
    )
    assert order["number"].startswith("CE-")
    c = api.get("/v1/users/agent-1/credits").json()
    assert (c["plan"], c["total"], c["used"], c["remaining"]) == ("25k", 25_000, 0, 25_000)
    assert c["thresholds_notified"] == []
    # The receipt goes to the platform address with the order number and recurring subtotal.
    [email] = receipts(runtime, "agent-1")
    assert system_mail.deliver(runtime, email.id).value == "sent"
    [got] = smtp_server.messages
    msg = got.parsed()
    assert got.rcpt_tos == ("agent-1@kw.example.com",)
    assert order["number"] in msg["Subject"]
    text = msg.get_body(("plain",)).get_content()
    for expected in (order["number"], "25k plan", "25,000", "$30.00", "Recurring subtotal"):
        assert expected in text
    assert order["number"] in msg.get_body(("html",)).get_content()


def test_receipts_go_to_the_communications_email_without_a_platform_address(
    runtime: Runtime,
) -> None:
    make_user(runtime, "agent-c", platform_email=None, communications_email="me@example.org")
    change(runtime, "agent-c", "upgrade", "10k")
    assert [e.to_address for e in receipts(runtime, "agent-c")] == ["me@example.org"]


def test_auckland_upgrade_at_the_last_minute_of_the_month(
    make_runtime: Any, clock: FrozenClock
) -> None:
    clock.set(NZ_LAST_MINUTE)
    rt = make_runtime(transport=MemoryTransport())
    make_user(rt, "kiwi", timezone="Pacific/Auckland")
    assert credits(rt, "kiwi").period == "2026-11"
    seed_used_credits(rt, "kiwi", 4999)
    # At 23:59 on the last day, in their zone, the upgrade gives the new total at once
    change(rt, "kiwi", "upgrade", "50k")
    assert send_n(rt, "kiwi", 3) == ["sent"] * 3
    c = credits(rt, "kiwi")
    assert (c.period, c.total, c.used, c.remaining) == ("2026-11", 50_000, 3, 49_997)
    # One minute later, in their zone, it is the plan's monthly credits again
    clock.advance(timedelta(minutes=1))
    c = credits(rt, "kiwi")
    assert (c.period, c.plan, c.total, c.used, c.remaining) == ("2026-12", "50k", 50_000, 0, 50_000)
    assert c.period_start == datetime(2026, 12, 1, tzinfo=c.period_start.tzinfo)
    assert [(o.kind, o.plan, o.period) for o in orders(rt, "kiwi")] == [
        ("upgrade", "50k", "2026-11"),
        ("renewal", "50k", "2026-12"),
    ]


def test_downgrade_waits_for_the_next_period(make_runtime: Any, clock: FrozenClock) -> None:
    clock.set(datetime(2026, 11, 15, 12, tzinfo=UTC))
    rt = make_runtime(transport=MemoryTransport())
    make_user(rt, "agent-d", timezone="America/New_York")
    change(rt, "agent-d", "upgrade", "50k")
    send_n(rt, "agent-d", 2)
    r = change(rt, "agent-d", "downgrade", "10k")
    assert (r.plan, r.pending_plan, r.order) == ("50k", "10k", None)
    c = credits(rt, "agent-d")
    assert (c.plan, c.total, c.used, c.pending_downgrade) == ("50k", 50_000, 2, "10k")
    # Still November in New York at 04:59 UTC on Dec 1
    clock.set(datetime(2026, 12, 1, 4, 59, tzinfo=UTC))
    assert credits(rt, "agent-d").plan == "50k"
    clock.set(datetime(2026, 12, 1, 5, 0, tzinfo=UTC))
    c = credits(rt, "agent-d")
    assert (c.period, c.plan, c.total, c.used, c.pending_downgrade) == (
        "2026-12",
        "10k",
        10_000,
        0,
        None,
    )
    assert [(o.kind, o.plan, o.amount_cents) for o in orders(rt, "agent-d")] == [
        ("upgrade", "50k", 5000),
        ("renewal", "10k", 1500),
    ]


def test_cancel_after_upgrade_gives_exactly_the_free_credits_and_stops_charges(
    make_runtime: Any, clock: FrozenClock
) -> None:
    rt = make_runtime(transport=MemoryTransport())
    make_user(rt, "agent-x")
    change(rt, "agent-x", "upgrade", "100k")
    change(rt, "agent-x", "downgrade", "25k")
    send_n(rt, "agent-x", 4)
    r = change(rt, "agent-x", "cancel")
    assert (r.plan, r.pending_plan, r.order) == ("free", None, None)
    c = credits(rt, "agent-x")
    assert (c.plan, c.total, c.used, c.remaining) == ("free", 5000, 0, 5000)
    clock.advance(timedelta(days=40))
    renew_due(rt)
    c = credits(rt, "agent-x")
    assert (c.plan, c.total, c.used) == ("free", 5000, 0)
    assert [o.kind for o in orders(rt, "agent-x")] == ["upgrade"]


def test_cancel_honours_a_configured_free_allowance(make_runtime: Any) -> None:
    rt = make_runtime(free_plan_credits=1234)
    make_user(rt, "agent-f")
    change(rt, "agent-f", "upgrade", "10k")
    change(rt, "agent-f", "cancel")
    assert credits(rt, "agent-f").remaining == 1234


def test_lazy_and_eager_renewal_agree_and_never_double_charge(
    make_runtime: Any, clock: FrozenClock
) -> None:
    clock.set(datetime(2026, 10, 20, tzinfo=UTC))
    rt = make_runtime(transport=MemoryTransport())
    for user in ("eager", "lazy"):
        make_user(rt, user, timezone="Europe/London")
        change(rt, user, "upgrade", "25k")
        change(rt, user, "downgrade", "10k")
    # Three month starts pass; beat runs at each for "eager", nothing runs for "lazy"
    for month_start in (
        datetime(2026, 11, 1, 0, 5, tzinfo=UTC),
        datetime(2026, 12, 1, 0, 5, tzinfo=UTC),
        datetime(2027, 1, 1, 0, 5, tzinfo=UTC),
    ):
        clock.set(month_start)
        renew_due(rt)
        renew_due(rt)  # a second beat run at the same time changes nothing
    eager = [(o.kind, o.plan, o.period, o.amount_cents) for o in orders(rt, "eager")]
    assert eager == [
        ("upgrade", "25k", "2026-10", 3000),
        ("renewal", "10k", "2026-11", 1500),
        ("renewal", "10k", "2026-12", 1500),
        ("renewal", "10k", "2027-01", 1500),
    ]
    # "lazy" was also picked up by the beat; reset it to compare the lazy path on its own.
    clock.set(datetime(2027, 1, 15, tzinfo=UTC))
    make_user(rt, "lazy2", timezone="Europe/London")
    clock.set(datetime(2027, 1, 20, tzinfo=UTC))
    change(rt, "lazy2", "upgrade", "25k")
    change(rt, "lazy2", "downgrade", "10k")
    clock.set(datetime(2027, 4, 1, 0, 5, tzinfo=UTC))  # three month starts later, no beat
    send_n(rt, "lazy2", 1)  # the first reservation of the new period renews lazily
    renew_due(rt)
    lazy = [(o.kind, o.plan, o.period) for o in orders(rt, "lazy2")]
    assert lazy == [
        ("upgrade", "25k", "2027-01"),
        ("renewal", "10k", "2027-02"),
        ("renewal", "10k", "2027-03"),
        ("renewal", "10k", "2027-04"),
    ]
    assert credits(rt, "lazy2").used == 1


def test_racing_renewals_charge_a_period_once(make_runtime: Any, clock: FrozenClock) -> None:
    clock.set(datetime(2026, 11, 20, tzinfo=UTC))
    rt = make_runtime(transport=MemoryTransport())
    make_user(rt, "racer")
    change(rt, "racer", "upgrade", "10k")
    clock.set(datetime(2026, 12, 1, 0, 1, tzinfo=UTC))
    errors: list[BaseException] = []

    def renew() -> None:
        try:
            ensure_current(rt, "racer")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=renew) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with rt.sessions() as s:
        kinds = s.scalars(select(Order.kind).where(Order.user_id == "racer")).all()
    assert sorted(k.value for k in kinds) == ["renewal", "upgrade"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"action": "upgrade", "plan": "free"}, 422, "plan"),
        ({"action": "upgrade", "plan": "platinum"}, 422, "plan"),
        ({"action": "upgrade"}, 422, "plan"),
        ({"action": "downgrade", "plan": "10k"}, 422, "plan"),
        ({"action": "cancel"}, 422, "action"),
        ({"action": "refund"}, 422, "action"),
        ({"action": "upgrade", "plan": "10k", "coupon": "x"}, 422, "coupon"),
    ],
)
def test_invalid_subscription_changes_are_refused_and_charge_nothing(
    runtime: Runtime, api: TestClient, body: dict[str, Any], status: int, field: str
) -> None:
    make_user(runtime)
    r = api.post("/v1/users/agent-1/subscription", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert orders(runtime, "agent-1") == []
    assert api.get("/v1/users/agent-1/credits").json()["plan"] == "free"


def test_unknown_user_subscription_is_404(api: TestClient) -> None:
    r = api.post("/v1/users/ghost/subscription", json={"action": "upgrade", "plan": "10k"})
    assert r.status_code == 404
    assert api.get("/v1/users/ghost/credits").status_code == 404


def test_credits_show_the_period_in_the_users_zone(runtime: Runtime, api: TestClient) -> None:
    make_user(runtime, "agent-h", timezone="Pacific/Honolulu")
    c = api.get("/v1/users/agent-h/credits").json()
    assert (c["period"], c["total"], c["used"], c["remaining"]) == ("2026-11", 5000, 0, 5000)
    assert c["period_start"] == "2026-11-01T00:00:00-10:00"
    assert c["period_end"] == "2026-12-01T00:00:00-10:00"


def test_subscriptions_module_exports(runtime: Runtime) -> None:
    assert subscriptions.next_period_id("2026-12") == "2027-01"
    assert subscriptions.next_period_id("2027-01") == "2027-02"
    assert subscriptions.money(123456) == "$1,234.56"
