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
    pending: list[tuple[str, int]] | None = None,
) -> QuotaLedger:
    """A ledger whose SQL side holds ``charged`` keys out of ``total`` (and ``pending`` ones:
    claimed, not yet known to be granted)."""

    def snapshot(grant: GrantRef) -> LedgerSnapshot:
        if calls is not None:
            calls.append(grant.user_id)
        return LedgerSnapshot(
            total=total,
            charged_keys=list(charged or []),
            notified=notified,
            pending=list(pending or []),
        )

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


def test_a_pending_key_is_counted_once_whether_it_was_granted_or_not(
    redis_client: redis.Redis,
) -> None:
    """Sends claimed but still queued when Redis lost its data count as pending: the rebuild
    counts them, and their own reservation is then granted without counting them again."""
    ledger = ledger_over(
        redis_client, total=5, charged=["a", "b"], pending=[("c", 1), ("campaign|x", 2)]
    )
    assert ledger.rebuild(g("u1"))
    assert ledger.state(g("u1")) == (5, 5, 0)
    mine = ledger.reserve(g("u1"), "c")
    bulk = ledger.reserve(g("u1"), "campaign|x", credits=2)
    assert (mine.granted, mine.used, bulk.granted, bulk.used) == (True, 5, True, 5)
    assert ledger.reserve(g("u1"), "d").granted is False  # the grant is really full
    assert ledger.reserve(g("u1"), "c").replay is True  # and c is an ordinary grant now
    assert ledger.refund(g("u1"), "c")
    assert ledger.state(g("u1")) == (4, 5, 100)  # c reached 100 % when it was granted


def test_a_pending_key_that_cannot_fit_is_denied_and_uncounted(redis_client: redis.Redis) -> None:
    """Old Redis denied some of the pending keys before it lost its data (their senders are
    about to record quota_exhausted): the grant cannot hold them all, so reserving one denies
    it and takes its count off; the failure's refund uncounts one never reserved again."""
    pending = [("p1", 1), ("p2", 1), ("p3", 1)]
    ledger = ledger_over(redis_client, total=3, charged=["a", "b"], pending=pending)
    assert ledger.balance(g("u1")) == (5, 3)
    denied = ledger.reserve(g("u1"), "p1")
    assert (denied.granted, denied.used) == (False, 4)
    assert ledger.refund(g("u1"), "p2")  # p2 failed without asking Redis again
    assert ledger.balance(g("u1")) == (3, 3)
    assert ledger.reserve(g("u1"), "p3").granted is True  # p3 was the one granted: still is
    assert ledger.reserve(g("u1"), "p1").granted is False  # a replay of its denial
    assert ledger.balance(g("u1")) == (3, 3)


def test_a_refund_made_while_the_grant_is_gone_is_not_counted_by_the_rebuild(
    redis_client: redis.Redis,
) -> None:
    """The rebuild may read the ledger before a failure is recorded and run after its refund
    found the grant gone: the refund's mark keeps the rebuild from counting the key."""
    ledger = ledger_over(redis_client, total=5, charged=["a", "b"], pending=[("campaign|x", 2)])
    assert ledger.refund(g("u1"), "b") is False  # the grant is gone: marked, not counted
    assert ledger.refund_parts(g("u1"), "campaign|x", ["x1", "x2"]) == 0
    assert ledger.rebuild(g("u1"))  # from a ledger read that still counts b and campaign x
    assert ledger.state(g("u1")) == (1, 5, 0)
    assert ledger.reserve(g("u1"), "campaign|x", credits=2).granted is False


def test_a_ledger_read_older_than_a_later_loss_of_redis_is_read_again(
    redis_client: redis.Redis,
) -> None:
    """While one rebuild reads the ledger, Redis loses its data, another worker rebuilds the
    grant, claims and reserves ``new``, and Redis loses its data again: the first read does
    not hold ``new`` (granted, about to be sent), so it must not become the grant."""
    charged, pending = ["a"], []
    reads: list[LedgerSnapshot] = []
    other = ledger_over(redis_client, total=5, charged=charged, pending=pending)

    def snapshot(grant: GrantRef) -> LedgerSnapshot:
        snap = LedgerSnapshot(total=5, charged_keys=list(charged), pending=list(pending))
        reads.append(snap)
        if len(reads) == 1:  # the other worker's turn, while this read is on its way
            redis_client.flushall()
            pending.append(("new", 1))  # claimed in SQL before Redis is asked
            assert other.reserve(grant, "new").granted
            redis_client.flushall()
        return snap

    ledger = QuotaLedger(redis_client, snapshot)
    assert ledger.rebuild(g("u1"))
    assert len(reads) == 2
    assert ledger.state(g("u1")) == (2, 5, 0)  # a and new, as the ledger says
    assert ledger.reserve(g("u1"), "new").replay is False  # granted once, not counted again
    assert ledger.state(g("u1")) == (2, 5, 0)


def test_refunds_of_a_pending_campaign_come_back_part_by_part(redis_client: redis.Redis) -> None:
    """A campaign stored but not yet reserving when Redis lost its data is pending under its
    bulk key; failing its recipients gives each credit back once, and a late reservation of
    the bulk key takes nothing."""
    ledger = ledger_over(redis_client, total=10, pending=[("campaign|x", 3)])
    assert ledger.balance(g("u1")) == (3, 10)
    assert ledger.refund_parts(g("u1"), "campaign|x", ["x1", "x2", "x3", "x1"]) == 3
    assert ledger.balance(g("u1")) == (0, 10)
    late = ledger.reserve(g("u1"), "campaign|x", credits=3)
    assert (late.granted, late.replay, late.used) == (True, True, 0)
    assert ledger.refund_parts(g("u1"), "campaign|x", ["x1", "x2", "x3"]) == 0


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


def test_a_notice_recorded_after_a_stale_rebuild_raises_notified_again(
    redis_client: redis.Redis,
) -> None:
    # A rebuild that read the ledger before the 100% notice was committed set notified to 95.
    ledger = ledger_over(redis_client, 20, charged=[f"k{i}" for i in range(20)], notified=95)
    grant = g("u-notified")
    ledger.ensure(grant)
    assert ledger.state(grant) == (20, 20, 95)
    assert ledger.mark_notified(grant, 100)
    assert ledger.state(grant) == (20, 20, 100)
    assert not ledger.mark_notified(grant, 90)  # never lowered
    assert ledger.state(grant) == (20, 20, 100)
    ledger.drop(grant)
    assert not ledger.mark_notified(grant, 100)  # a missing grant is not half-created
    assert ledger.state(grant) is None


def test_a_notice_recorded_while_a_rebuild_reads_the_ledger_is_not_lost(
    redis_client: redis.Redis,
) -> None:
    """The rebuild reads the ledger (95), the 100% notice is committed and marked while the
    grant is still missing, then the rebuild writes: it must not write the 95 it read."""
    grant = g("u-notice-race")
    ledger_notified = [95]
    reads: list[int] = []

    def snapshot(_: GrantRef) -> LedgerSnapshot:
        reads.append(ledger_notified[0])
        read = LedgerSnapshot(
            total=20, charged_keys=[f"k{i}" for i in range(20)], notified=ledger_notified[0]
        )
        if len(reads) == 1:  # the notice lands between this read and the rebuild's write
            ledger_notified[0] = 100
            assert not ledger.mark_notified(grant, 100)
        return read

    ledger = QuotaLedger(redis_client, snapshot)
    assert ledger.rebuild(grant)
    assert reads == [95, 100]  # the first read was refused and the ledger read again
    assert ledger.state(grant) == (20, 20, 100)
