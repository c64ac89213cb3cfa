"""The Lua quota ledger on a real Redis: all-or-nothing, idempotent, refundable, rebuildable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import redis

from dispatcher import keys
from dispatcher.periods import Period, period_at
from dispatcher.quota import LedgerSnapshot, QuotaLedger

PERIOD = period_at(datetime(2026, 11, 10, tzinfo=UTC), "UTC")


def ledger_over(
    client: redis.Redis,
    total: int,
    charged: list[str] | None = None,
    calls: list[str] | None = None,
) -> QuotaLedger:
    """A ledger whose SQL side holds ``charged`` keys out of ``total``."""

    def snapshot(user_id: str, period: Period) -> LedgerSnapshot:
        if calls is not None:
            calls.append(user_id)
        return LedgerSnapshot(total=total, charged_keys=list(charged or []))

    return QuotaLedger(client, snapshot)


def test_reservations_stop_exactly_at_the_grant(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=3)
    answers = [ledger.reserve("u1", PERIOD, f"k{i}").granted for i in range(5)]
    assert answers == [True, True, True, False, False]
    assert ledger.balance("u1", PERIOD) == (3, 3)


def test_a_replayed_key_gets_its_first_answer_and_takes_nothing(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=1)
    first = ledger.reserve("u1", PERIOD, "a")
    again = ledger.reserve("u1", PERIOD, "a")
    denied = ledger.reserve("u1", PERIOD, "b")
    denied_again = ledger.reserve("u1", PERIOD, "b")
    assert (first.granted, first.replay) == (True, False)
    assert (again.granted, again.replay) == (True, True)
    assert (denied.granted, denied_again.granted, denied_again.replay) == (False, False, True)
    assert ledger.balance("u1", PERIOD) == (1, 1)


def test_refund_gives_the_credit_back_once(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=2)
    ledger.reserve("u1", PERIOD, "a")
    ledger.reserve("u1", PERIOD, "b")
    assert ledger.refund("u1", PERIOD.id, "a") is True
    assert ledger.refund("u1", PERIOD.id, "a") is False
    assert ledger.refund("u1", PERIOD.id, "never-reserved") is False
    assert ledger.balance("u1", PERIOD) == (1, 2)
    # A refunded key replayed stays refunded: it is not granted again.
    assert ledger.reserve("u1", PERIOD, "a").granted is False
    assert ledger.reserve("u1", PERIOD, "c").granted is True


def test_bulk_reservation_is_all_or_nothing(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=10)
    assert ledger.reserve("u1", PERIOD, "campaign-1", credits=11).granted is False
    assert ledger.balance("u1", PERIOD) == (0, 10)
    assert ledger.reserve("u1", PERIOD, "campaign-2", credits=10).granted is True
    assert ledger.balance("u1", PERIOD) == (10, 10)


def test_each_threshold_is_reported_once_and_a_jump_reports_the_highest(
    redis_client: redis.Redis,
) -> None:
    ledger = ledger_over(redis_client, total=100)
    reached: dict[int, int] = {}
    ledger.reserve("u1", PERIOD, "bulk", credits=79)
    for i in range(80, 101):
        r = ledger.reserve("u1", PERIOD, f"k{i}")
        if r.threshold:
            reached[r.used] = r.threshold
    assert reached == {80: 80, 85: 85, 90: 90, 95: 95, 100: 100}

    jump = ledger_over(redis_client, total=100)
    jump.reserve("u2", PERIOD, "small", credits=10)
    big = jump.reserve("u2", PERIOD, "big", credits=82)  # 10% -> 92%
    assert big.threshold == 90
    after = [jump.reserve("u2", PERIOD, f"k{i}").threshold for i in range(8)]
    assert after == [None, None, 95, None, None, None, None, 100]


def test_refund_does_not_rearm_a_reported_threshold(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=10)
    ledger.reserve("u1", PERIOD, "bulk", credits=7)
    assert ledger.reserve("u1", PERIOD, "k8").threshold == 80
    ledger.refund("u1", PERIOD.id, "k8")
    assert ledger.reserve("u1", PERIOD, "k8b").threshold is None


def test_a_vanished_grant_is_rebuilt_from_the_sql_ledger(redis_client: redis.Redis) -> None:
    calls: list[str] = []
    charged = [f"old{i}" for i in range(8)]
    ledger = ledger_over(redis_client, total=10, charged=charged, calls=calls)
    assert ledger.reserve("u1", PERIOD, "new1").used == 9
    assert calls == ["u1"]
    redis_client.flushall()
    # After the flush the SQL ledger holds the 8 old keys and new1 (it was charged meanwhile).
    charged.append("new1")
    replay = ledger.reserve("u1", PERIOD, "new1")
    assert (replay.granted, replay.replay, replay.used) == (True, True, 9)
    assert ledger.reserve("u1", PERIOD, "new2").granted is True
    assert ledger.reserve("u1", PERIOD, "new3").granted is False
    assert calls == ["u1", "u1"]


def test_rebuild_marks_thresholds_the_ledger_already_passed(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=10, charged=[f"k{i}" for i in range(8)])
    assert ledger.reserve("u1", PERIOD, "n1").threshold == 90


def test_grants_expire_after_their_period(redis_client: redis.Redis) -> None:
    ledger = ledger_over(redis_client, total=5)
    ledger.reserve("u1", PERIOD, "a")
    expire_at = redis_client.expiretime(keys.grant("u1", PERIOD.id))
    res_expire_at = redis_client.expiretime(keys.reservations("u1", PERIOD.id))
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
    assert [ledger.reserve("u", PERIOD, k).granted for k in "abca"] == [True, True, False, True]
    assert ledger.refund("u", PERIOD.id, "b")
    assert ledger.reserve("u", PERIOD, "d").granted
