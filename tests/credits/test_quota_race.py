"""Many processes and threads racing for users' credits against a real Redis, and against a
Redis Cluster of three primaries: never one too many."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.cluster import RedisCluster

from dispatcher.credits.periods import period_at
from dispatcher.credits.quota import GrantRef, LedgerSnapshot, QuotaLedger
from dispatcher.redisclient import RedisClient, connect

PERIOD = period_at(datetime(2026, 11, 10, tzinfo=UTC), "UTC")
PROCESSES = 8
ROUNDS = 12
CLUSTER_ROUNDS = 6
GRANT = 5000
OWN_KEYS = 700  # 8 x 700 own keys + shared keys = 5,800 distinct asks for 5,000 credits
SHARED_KEYS = 200  # every process asks for these too: each may be granted once at most
THREADS_PER_USER = 6
THREAD_USERS = 6  # raced at once; on the cluster, their grants lie on all three primaries
THREAD_GRANT = 2000  # 6 x 700 own keys + shared keys = 4,400 distinct asks per user


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The quota store, empty: the private Redis, then the private three-primary cluster."""
    fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
    yield request.getfixturevalue(fixture)


def _racer(
    url: str,
    user: str,
    index: int,
    start: Any,  # a multiprocessing or threading Event
    out: Any,  # a multiprocessing or plain Queue of (index, granted keys, fresh grants)
    client: RedisClient | None = None,
    grant: int = GRANT,
) -> None:
    own = client is None
    client = client if client is not None else connect(url)
    ledger = QuotaLedger(client, lambda _g: LedgerSnapshot(total=grant, charged_keys=[]))
    asks = [f"p{index}-{i}" for i in range(OWN_KEYS)]
    shared = [f"shared-{i}" for i in range(SHARED_KEYS)]
    # Interleave shared keys so racers collide on them mid-race.
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
    if own:
        client.close()


def _assert_exact(
    client: RedisClient,
    user: str,
    results: list[tuple[int, list[str], int]],
    racers: int,
    grant: int = GRANT,
) -> None:
    """Exactly the grant was given, each key at most once, and Redis counts exactly that."""
    distinct = set().union(*(set(g) for _, g, _ in results))
    fresh_total = sum(f for _, _, f in results)
    used, total = QuotaLedger(client, lambda _g: LedgerSnapshot(grant, [])).balance(
        GrantRef.of(user, PERIOD, 1)
    )
    assert (len(results), len(distinct), fresh_total, used, total) == (
        racers,
        grant,
        grant,
        grant,
        grant,
    ), user


def primaries_of(client: RedisClient, users: list[str]) -> set[str]:
    """The cluster primaries that hold these users' grants (both keys of each on one node)."""
    assert isinstance(client, RedisCluster)
    nodes = set()
    for user in users:
        grant, reservations = GrantRef.of(user, PERIOD, 1).keys
        node = client.get_node_from_key(grant)
        assert node is not None and node == client.get_node_from_key(reservations)
        nodes.add(node.name)
    return nodes


@pytest.mark.slow
def test_racing_processes_grant_exactly_the_allowance_every_time(store_url: str) -> None:
    ctx = mp.get_context("fork")
    client = connect(store_url)
    users = [f"racer-{round_}" for round_ in range(ROUNDS)]
    if isinstance(client, RedisCluster):
        # Fewer rounds on the cluster, on users whose grants lie on every primary.
        users = users[:CLUSTER_ROUNDS]
        assert len(primaries_of(client, users)) == 3, "the rounds' users span every primary"
    for user in users:
        start = ctx.Event()
        out: mp.queues.Queue[tuple[int, list[str], int]] = ctx.Queue()
        procs = [
            ctx.Process(target=_racer, args=(store_url, user, i, start, out))
            for i in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        _assert_exact(client, user, results, PROCESSES)
    client.close()


@pytest.mark.slow
def test_racing_threads_on_several_users_at_once_grant_exactly_each_allowance(
    store_url: str,
) -> None:
    # Given several users (on the cluster, on every primary) raced by threads sharing one
    # client, as a worker's threads do
    client = connect(store_url)
    users = [f"threaded-{n}" for n in range(THREAD_USERS)]
    if isinstance(client, RedisCluster):
        assert len(primaries_of(client, users)) == 3
    start = threading.Event()
    outs: dict[str, queue.Queue[tuple[int, list[str], int]]] = {u: queue.Queue() for u in users}
    threads = [
        threading.Thread(
            target=_racer, args=(store_url, user, i, start, outs[user], client, THREAD_GRANT)
        )
        for user in users
        for i in range(THREADS_PER_USER)
    ]
    for t in threads:
        t.start()
    # When they all start at once
    start.set()
    for t in threads:
        t.join(300)
        assert not t.is_alive()
    # Then each user got exactly the grant
    for user in users:
        results = [outs[user].get_nowait() for _ in range(THREADS_PER_USER)]
        _assert_exact(client, user, results, THREADS_PER_USER, THREAD_GRANT)
    client.close()
