"""Many processes racing for one user's credits against a real Redis: never one too many."""

from __future__ import annotations

import multiprocessing as mp
from datetime import UTC, datetime

import pytest
import redis

from dispatcher.credits.periods import period_at
from dispatcher.credits.quota import GrantRef, LedgerSnapshot, QuotaLedger

PERIOD = period_at(datetime(2026, 11, 10, tzinfo=UTC), "UTC")
PROCESSES = 8
ROUNDS = 20
GRANT = 5000
OWN_KEYS = 700  # 8 x 700 own keys + shared keys = 5,800 distinct asks for 5,000 credits
SHARED_KEYS = 200  # every process asks for these too: each may be granted once at most


def _racer(
    url: str,
    user: str,
    index: int,
    start: mp.synchronize.Event,
    out: mp.queues.Queue[tuple[int, list[str], int]],
) -> None:
    client = redis.Redis.from_url(url)
    ledger = QuotaLedger(client, lambda _g: LedgerSnapshot(total=GRANT, charged_keys=[]))
    asks = [f"p{index}-{i}" for i in range(OWN_KEYS)]
    shared = [f"shared-{i}" for i in range(SHARED_KEYS)]
    # Interleave shared keys so processes collide on them mid-race.
    order = asks[: OWN_KEYS // 2] + shared + asks[OWN_KEYS // 2 :]
    if index % 2:
        order.reverse()
    start.wait()
    granted: list[str] = []
    fresh = 0
    for key in order:
        r = ledger.reserve(GrantRef.of(user, PERIOD, 1), key)
        if r.granted:
            granted.append(key)
            fresh += not r.replay
    out.put((index, granted, fresh))
    client.close()


@pytest.mark.slow
def test_racing_processes_grant_exactly_the_allowance_every_time(redis_url: str) -> None:
    ctx = mp.get_context("fork")
    client = redis.Redis.from_url(redis_url)
    for round_ in range(ROUNDS):
        user = f"racer-{round_}"
        start = ctx.Event()
        out: mp.queues.Queue[tuple[int, list[str], int]] = ctx.Queue()
        procs = [
            ctx.Process(target=_racer, args=(redis_url, user, i, start, out))
            for i in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        distinct = set().union(*(set(g) for _, g, _ in results))
        fresh_total = sum(f for _, _, f in results)
        used, total = QuotaLedger(client, lambda _g: LedgerSnapshot(GRANT, [])).balance(
            GrantRef.of(user, PERIOD, 1)
        )
        assert (len(distinct), fresh_total, used, total) == (GRANT, GRANT, GRANT, GRANT), (
            f"round {round_}"
        )
    client.close()
