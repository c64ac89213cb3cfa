"""Relay rate limits: the sliding-window script on fakeredis and Redis, then real processes
racing for one relay's rate against a real Redis: never one message too many in any window."""

from __future__ import annotations

import asyncio
import bisect
import functools
import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any, cast

import fakeredis
import pytest
import redis

from dispatcher.delivery.ratelimit import (
    STALE_TRIES,
    TRIM_SLACK,
    RateLimit,
    RateLimited,
    RelayRateLimiter,
    relay_id,
)
from dispatcher.errors import TransientError

RELAY = "smtp.example.com:587"
# Unix seconds near T0 are doubles with about 2.4e-7 s between neighbours.
approx = functools.partial(pytest.approx, abs=1e-6)
T0 = 1_700_000_000.0


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Untouchable:
    """Stands in for a Redis client that must not be used at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was touched: .{name}")


@pytest.fixture(params=["fakeredis", "redis"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """The same script tests on fakeredis and on the private redis-server."""
    if request.param == "fakeredis":
        fake = fakeredis.FakeRedis()
        yield fake
        fake.close()
        return
    real = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield real
    real.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(
    client: redis.Redis, clock: FakeClock, per_second: int | None, per_hour: int | None = None
) -> RelayRateLimiter:
    return RelayRateLimiter(client, RELAY, RateLimit(per_second, per_hour), clock=clock)


# --------------------------------------------------------------------------- the script


def test_admits_exactly_n_per_second_and_the_next_waits_until_the_oldest_leaves(
    client: redis.Redis, clock: FakeClock
) -> None:
    rl = limiter(client, clock, per_second=5)
    for _ in range(5):
        assert rl.try_acquire() == 0.0
        clock.now += 0.1
    # Given five admitted at T0 .. T0+0.4, the sixth at T0+0.5 waits until T0 leaves (T0+1).
    assert rl.try_acquire() == approx(0.5)
    clock.now = T0 + 0.999
    assert rl.try_acquire() == approx(0.001)
    # An entry admitted at t no longer counts from t+1 on: the window is (now-1, now].
    clock.now = T0 + 1.0
    assert rl.try_acquire() == 0.0
    assert rl.try_acquire() == approx(0.1)
    assert rl.admitted(T0, T0 + 2) == approx([T0 + 0.1 * i for i in range(5)] + [T0 + 1.0])


def test_a_call_that_reaches_redis_late_still_counts_its_whole_window(
    client: redis.Redis, clock: FakeClock
) -> None:
    # Given two admitted at T0+0.002 and T0+0.5 (limit 2/s),
    early = limiter(client, clock, per_second=2)
    clock.now = T0 + 0.002
    assert early.try_acquire() == 0.0
    clock.now = T0 + 0.5
    assert early.try_acquire() == 0.0
    # when a call whose clock reads T0+1.004 asks for two (refused; T0+0.002 has left its window)
    later = limiter(client, FakeClock(T0 + 1.004), per_second=2)
    assert later.try_acquire(2) == approx(0.496)
    # and then a call that read its clock at T0+1.0 reaches Redis,
    clock.now = T0 + 1.0
    # then it still counts T0+0.002: admitting it would put three in [T0+0.002, T0+1.002).
    assert early.try_acquire() == approx(0.002)
    assert most_in_any_window(early.admitted(0, T0 + 10)) == 2


def test_hourly_limit_blocks_after_its_count_even_when_the_second_window_is_free(
    client: redis.Redis, clock: FakeClock
) -> None:
    rl = limiter(client, clock, per_second=10, per_hour=20)
    for _ in range(20):
        assert rl.try_acquire() == 0.0
        clock.now += 1.0  # one a second: the per-second window is always free
    assert rl.try_acquire() == approx(3600 - 20)
    clock.now = T0 + 1800
    assert rl.try_acquire() == approx(1800)
    clock.now = T0 + 3600  # the first admission leaves the hour
    assert rl.try_acquire() == 0.0
    assert rl.try_acquire() == approx(1.0)
    assert rl.admitted(T0 + 1, T0 + 7200) == [T0 + i for i in range(1, 20)] + [T0 + 3600]


def test_a_batch_is_admitted_all_or_nothing_and_waits_for_enough_room(
    client: redis.Redis, clock: FakeClock
) -> None:
    rl = limiter(client, clock, per_second=5, per_hour=100)
    assert rl.try_acquire(1) == 0.0
    clock.now = T0 + 0.2
    assert rl.try_acquire(1) == 0.0
    clock.now = T0 + 0.4
    assert rl.try_acquire(3) == 0.0
    clock.now = T0 + 0.5
    # Two more need the two oldest (T0, T0+0.2) gone: at T0+1.2.
    assert rl.try_acquire(2) == approx(0.7)
    assert rl.try_acquire(1) == approx(0.5)
    assert len(rl.admitted(T0, T0 + 1)) == 5  # the refusals added nothing to either window
    clock.now = T0 + 1.2
    assert rl.try_acquire(2) == 0.0
    assert rl.admitted(T0 + 1, T0 + 2) == [T0 + 1.2, T0 + 1.2]


def test_a_refusal_in_one_window_admits_nothing_to_the_other(
    client: redis.Redis, clock: FakeClock
) -> None:
    rl = limiter(client, clock, per_second=3, per_hour=4)
    assert rl.try_acquire(3) == 0.0
    clock.now += 5
    assert rl.try_acquire(2) == approx(3595)  # the second is free, the hour is not
    assert rl.try_acquire(1) == 0.0
    clock.now += 5
    assert rl.try_acquire(1) > 3000
    assert len(rl.admitted(T0, T0 + 60)) == 4


def test_keys_name_no_host_or_credentials_and_expire_once_idle(
    client: redis.Redis, clock: FakeClock
) -> None:
    relay = "mailer:s3cret@smtp.example.com:587"
    rl = RelayRateLimiter(client, relay, RateLimit(2, 10), clock=clock)
    assert rl.try_acquire() == 0.0
    names = sorted(k.decode() for k in cast(list[bytes], client.keys("*")))
    assert names == [f"ced:rate:{{{relay_id(relay)}}}:1s", f"ced:rate:{{{relay_id(relay)}}}:3600s"]
    # Each key outlives its last admission by its window and the trim slack.
    assert (1 + TRIM_SLACK) * 1000 - 1000 < client.pttl(names[0]) <= (1 + TRIM_SLACK) * 1000
    assert (3600 + TRIM_SLACK) * 1000 - 1000 < client.pttl(names[1]) <= (3600 + TRIM_SLACK) * 1000
    assert rl.try_acquire() == 0.0
    with pytest.raises(RateLimited) as caught:
        asyncio.run(rl.acquire(max_wait=0.0))
    for text in (str(caught.value), repr(rl), caught.value.relay):
        assert "s3cret" not in text
        assert "example" not in text


def test_relays_are_limited_apart(client: redis.Redis, clock: FakeClock) -> None:
    first = RelayRateLimiter(client, "a.example:25", RateLimit(per_second=1), clock=clock)
    second = RelayRateLimiter(client, "b.example:25", RateLimit(per_second=1), clock=clock)
    assert first.try_acquire() == 0.0
    assert second.try_acquire() == 0.0
    assert first.try_acquire() > 0


def test_unlimited_never_touches_redis() -> None:
    rl = RelayRateLimiter(cast(redis.Redis, Untouchable()), RELAY, RateLimit(None, None))
    assert RateLimit().unlimited
    assert rl.try_acquire() == 0.0
    assert rl.try_acquire(10_000) == 0.0
    asyncio.run(rl.acquire(max_wait=0.0, n=3))
    assert rl.admitted(0, time.time()) == []


def test_a_batch_outside_one_to_the_smallest_limit_is_refused(
    client: redis.Redis, clock: FakeClock
) -> None:
    rl = limiter(client, clock, per_second=10, per_hour=6)
    with pytest.raises(ValueError, match="n=0"):
        rl.try_acquire(0)
    with pytest.raises(ValueError, match="n=7"):
        rl.try_acquire(7)
    with pytest.raises(ValueError, match="n=7"):
        asyncio.run(rl.acquire(1.0, n=7))
    assert rl.try_acquire(6) == 0.0
    with pytest.raises(ValueError, match="per_hour=0"):
        RateLimit(per_second=1, per_hour=0)


def test_acquire_raises_rate_limited_at_once_when_the_wait_exceeds_max_wait(
    client: redis.Redis, clock: FakeClock
) -> None:
    rl = limiter(client, clock, per_second=None, per_hour=2)
    asyncio.run(rl.acquire(max_wait=5.0, n=2))
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        asyncio.run(rl.acquire(max_wait=5.0))
    assert time.monotonic() - started < 4.0  # deferred at once, not after sleeping (max_wait 5)
    assert isinstance(caught.value, TransientError)
    assert caught.value.reason == "rate_limited"
    assert caught.value.wait == approx(3600) == caught.value.retry_after
    assert len(rl.admitted(T0, T0 + 1)) == 2


def test_acquire_sleeps_out_a_short_wait_then_admits(client: redis.Redis) -> None:
    rl = RelayRateLimiter(client, RELAY, RateLimit(per_second=2, per_hour=100))
    assert rl.try_acquire(2) == 0.0
    wait = rl.try_acquire()
    started = time.monotonic()
    asyncio.run(rl.acquire(max_wait=2.0))
    assert 0 < wait <= 1.0
    assert time.monotonic() - started >= wait - 0.05
    stamps = rl.admitted(0, time.time() + 1)
    assert len(stamps) == 3
    assert stamps[2] - stamps[0] >= 1.0


def test_acquire_asks_again_when_its_admission_went_stale_before_it_returned(
    client: redis.Redis,
) -> None:
    # A clock that reads 0.2 s later each time: every admission is 0.2 s old when it comes
    # back, more than half the 0.1 s margin, so each is left to count and asked again, until
    # the call gives up and the message is deferred.
    readings = iter(T0 + 0.2 * i for i in range(1000))
    rl = RelayRateLimiter(
        client, RELAY, RateLimit(per_second=10), clock=lambda: next(readings), margin=0.1
    )
    with pytest.raises(RateLimited) as caught:
        asyncio.run(rl.acquire(max_wait=5.0))
    assert caught.value.wait == 0.1
    assert len(rl.admitted(0, T0 + 10)) == STALE_TRIES


def test_acquire_returns_a_fresh_admission_at_once(client: redis.Redis, clock: FakeClock) -> None:
    rl = RelayRateLimiter(client, RELAY, RateLimit(per_second=3), clock=clock, margin=0.1)
    asyncio.run(rl.acquire(max_wait=0.0))
    assert rl.admitted(0, T0 + 10) == [T0]


# --------------------------------------------------------------------------- real processes

PROCESSES = 4
PER_SECOND = 25
RACE_SECONDS = 10.0


def _racer(
    url: str,
    limit: RateLimit,
    seconds: float,
    max_wait: float,
    ready: mp.queues.Queue[int],
    start: mp.synchronize.Event,
    out: mp.queues.Queue[tuple[list[float], list[float], float]],
) -> None:
    """Acquire for ``seconds``; put (admission times as the limiter stamped them, times the
    caller got control back, the last wait refused)."""
    stamped: list[float] = []
    returned: list[float] = []
    last = [0.0]

    def clock() -> float:
        last[0] = time.time()
        return last[0]

    async def race() -> float:
        refused = 0.0
        end = time.time() + seconds
        while time.time() < end:
            try:
                await rl.acquire(max_wait=min(max_wait, max(end - time.time(), 0.0)))
            except RateLimited as exc:
                refused = exc.wait
                await asyncio.sleep(0.05)
                continue
            returned.append(time.time())
            stamped.append(last[0])  # the clock reading of the admitting call
        return refused

    client = redis.Redis.from_url(url)
    rl = RelayRateLimiter(client, RELAY, limit, clock=clock)
    ready.put(0)
    start.wait()
    refused = asyncio.run(race())
    out.put((stamped, returned, refused))
    client.close()


def _run_racers(
    url: str, limit: RateLimit, seconds: float, max_wait: float
) -> list[tuple[list[float], list[float], float]]:
    ctx = mp.get_context("spawn")
    ready: mp.queues.Queue[int] = ctx.Queue()
    start = ctx.Event()
    out: mp.queues.Queue[tuple[list[float], list[float], float]] = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(url, limit, seconds, max_wait, ready, start, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        start.set()
        results = [out.get(timeout=seconds + 30) for _ in procs]
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


def most_in_any_window(stamps: list[float], window: float = 1.0) -> int:
    """The most admissions in any [t, t+window) that starts at an admission t."""
    ordered = sorted(stamps)
    return max(
        (bisect.bisect_left(ordered, t + window) - i for i, t in enumerate(ordered)), default=0
    )


@pytest.mark.slow
def test_racing_processes_never_exceed_the_rate_in_any_sliding_second(redis_url: str) -> None:
    limit = RateLimit(per_second=PER_SECOND, per_hour=100_000)
    results = _run_racers(redis_url, limit, RACE_SECONDS, max_wait=5.0)

    stamped = [t for s, _, _ in results for t in s]
    returned = [t for _, r, _ in results for t in r]
    client = redis.Redis.from_url(redis_url)
    logged = RelayRateLimiter(client, RELAY, limit).admitted(0, time.time() + 60)
    client.close()
    peak = most_in_any_window(stamped)
    print(
        f"\nadmitted={len(stamped)} per process={[len(s) for s, _, _ in results]} "
        f"max in any 1-s window: limiter stamps={peak}, "
        f"as callers got control back={most_in_any_window(returned)}"
    )
    # Every admission the processes saw is in the log, and nothing else is.
    assert sorted(stamped) == logged
    assert peak <= PER_SECOND
    assert len(stamped) >= 0.9 * PER_SECOND * RACE_SECONDS  # the rate is used, not starved
    assert min(len(s) for s, _, _ in results) > 0


@pytest.mark.slow
def test_racing_processes_take_exactly_the_hourly_limit_then_all_wait(redis_url: str) -> None:
    limit = RateLimit(per_second=None, per_hour=40)
    results = _run_racers(redis_url, limit, seconds=2.0, max_wait=1.0)

    assert sum(len(s) for s, _, _ in results) == 40
    assert all(refused > 1.0 for _, _, refused in results), [r for _, _, r in results]
    client = redis.Redis.from_url(redis_url)
    assert len(RelayRateLimiter(client, RELAY, limit).admitted(0, time.time() + 60)) == 40
    client.close()
