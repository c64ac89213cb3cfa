"""The Lua quota ledger on a real Redis: all-or-nothing, idempotent, refundable, rebuildable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import redis

from dispatcher import keys
from dispatcher.credits.periods import period_at
from dispatcher.credits.quota import GrantRef, LedgerSnapshot, QuotaLedger

PERIOD = period_at(datetime(2026, 11, 10, tzinfo=UTC), "UTC")


def g(user: str, seq: int = 1) -> GrantRef:
    return GrantRef.of(user, PERIOD, seq)


def ledger_over(
    client: redis.Redis,
    total: int,
    charged: list[str] | None = None,
    calls: list[str] | None = None,
    notified: int = 0,
) -> QuotaLedger:
    """A ledger whose SQL side holds ``charged`` keys out of ``total``."""

    def snapshot(grant: GrantRef) -> LedgerSnapshot:
        if calls is not None:
            calls.append(grant.user_id)
        return LedgerSnapshot(total=total, charged_keys=list(charged or []), notified=notified)

    return QuotaLedger(client, snapshot)


def test_reservations_stop_exactly_at_the_grant(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=3)
    answers = [ledger.reserve(g("u1"), f"k{i}").granted for i in range(5)]
    assert answers == [True, True, True, False, False]
    assert ledger.balance(g("u1")) == (3, 3)


def test_a_replayed_key_gets_its_first_answer_and_takes_nothing(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=1)
    first = ledger.reserve(g("u1"), "a")
    again = ledger.reserve(g("u1"), "a")
    denied = ledger.reserve(g("u1"), "b")
    denied_again = ledger.reserve(g("u1"), "b")
    assert (first.granted, first.replay) == (True, False)
    assert (again.granted, again.replay) == (True, True)
    assert (denied.granted, denied_again.granted, denied_again.replay) == (False, False, True)
    assert ledger.balance(g("u1")) == (1, 1)


def test_refund_gives_the_credit_back_once(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=2)
    ledger.reserve(g("u1"), "a")
    ledger.reserve(g("u1"), "b")
    assert ledger.refund(g("u1"), "a") is True
    assert ledger.refund(g("u1"), "a") is False
    assert ledger.refund(g("u1"), "never-reserved") is False
    assert ledger.balance(g("u1")) == (1, 2)
    # A refunded key replayed stays refunded: it is not granted again.
    assert ledger.reserve(g("u1"), "a").granted is False
    assert ledger.reserve(g("u1"), "c").granted is True


def test_bulk_reservation_is_all_or_nothing(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=10)
    assert ledger.reserve(g("u1"), "campaign-1", credits=11).granted is False
    assert ledger.balance(g("u1")) == (0, 10)
    assert ledger.reserve(g("u1"), "campaign-2", credits=10).granted is True
    assert ledger.balance(g("u1")) == (10, 10)


def test_each_threshold_is_reported_once_and_a_jump_reports_the_highest(
    redis_client: redis.Redis,
) -> None:
    ledger = ledger_over(redis_client, total=100)
    reached: dict[int, int] = {}
    ledger.reserve(g("u1"), "bulk", credits=79)
    for i in range(80, 101):
        r = ledger.reserve(g("u1"), f"k{i}")
        if r.threshold:
            reached[r.used] = r.threshold
    assert reached == {80: 80, 85: 85, 90: 90, 95: 95, 100: 100}

    jump = ledger_over(redis_client, total=100)
    jump.reserve(g("u2"), "small", credits=10)
    big = jump.reserve(g("u2"), "big", credits=82)  # 10% -> 92%
    assert big.threshold == 90
    after = [jump.reserve(g("u2"), f"k{i}").threshold for i in range(8)]
    assert after == [None, None, 95, None, None, None, None, 100]


def test_refund_does_not_rearm_a_reported_threshold(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=10)
    ledger.reserve(g("u1"), "bulk", credits=7)
    assert ledger.reserve(g("u1"), "k8").threshold == 80
    ledger.refund(g("u1"), "k8")
    assert ledger.reserve(g("u1"), "k8b").threshold is None


def test_a_vanished_grant_is_rebuilt_from_the_sql_ledger(redis_client: redis.Redis) -> None:
    calls: list[str] = []
    charged = [f"old{i}" for i in range(8)]
    ledger = ledger_over(redis_client, total=10, charged=charged, calls=calls)
    assert ledger.reserve(g("u1"), "new1").used == 9
    assert calls == ["u1"]
    redis_client.flushall()
    # After the flush the SQL ledger holds the 8 old keys and new1 (it was charged meanwhile).
    charged.append("new1")
    replay = ledger.reserve(g("u1"), "new1")
    assert (replay.granted, replay.replay, replay.used) == (True, True, 9)
    assert ledger.reserve(g("u1"), "new2").granted is True
    assert ledger.reserve(g("u1"), "new3").granted is False
    assert calls == ["u1", "u1"]


def test_rebuild_takes_the_notified_threshold_from_the_ledger(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=10, charged=[f"k{i}" for i in range(8)], notified=80)
    assert ledger.reserve(g("u1"), "n1").threshold == 90
    assert ledger.state(g("u1")) == (9, 10, 90)
    other = ledger_over(redis_client, total=10, charged=[f"k{i}" for i in range(8)], notified=90)
    assert other.reserve(g("u2"), "n1").threshold is None


def test_grants_expire_after_their_period(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=5)
    ledger.reserve(g("u1"), "a")
    expire_at = redis_client.expiretime(keys.grant("u1", PERIOD.id, 1))
    res_expire_at = redis_client.expiretime(keys.reservations("u1", PERIOD.id, 1))
    assert expire_at == res_expire_at
    assert expire_at > int(PERIOD.end_utc.timestamp())


def test_periods_follow_the_users_zone() -> None:
    instant = datetime(2026, 11, 30, 11, 30, tzinfo=UTC)  # already December 1st in Auckland
    assert period_at(instant, "UTC").id == "2026-11"
    auckland = period_at(instant, "Pacific/Auckland")
    assert auckland.id == "2026-12"
    assert auckland.start_utc == datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    honolulu = period_at(datetime(2026, 12, 1, 9, 59, tzinfo=UTC), "Pacific/Honolulu")
    assert honolulu.id == "2026-11"


def test_lua_logic_on_fakeredis(fake_ledger: Callable[[int], QuotaLedger]) -> None:
    """Fast unit check of the scripts' branches (fakeredis runs the same Lua)."""
    ledger = fake_ledger(2)
    assert [ledger.reserve(g("u"), k).granted for k in "abca"] == [True, True, False, True]
    assert ledger.refund(g("u"), "b")
    assert ledger.reserve(g("u"), "d").granted
