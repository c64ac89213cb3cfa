"""The quota store on a Redis Cluster of three primaries (``REDIS_URL=redis+cluster://...``):
every script and pipeline stays in one slot, the counters are exact under races, refunds,
usage notices and the loss of a node's or every node's data (I1, I3, I5).

The tests imported below are the single-server suite's own, run here again: in this module
``redis_url`` and ``redis_client`` are the private cluster, so every runtime they build
(worker-like processes included) uses it. The broker is not involved: kombu cannot use a
cluster, so these drive the use cases in-process, as the single-server tests do.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from devstack.devsmtp import DevSMTPServer
from dispatcher import keys
from dispatcher.api.app import create_api
from dispatcher.campaigns import chunks
from dispatcher.credits.reconcile import reconcile
from dispatcher.credits.subscriptions import credits, ensure_current
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery.outcomes import OutcomeStream
from dispatcher.delivery.ratelimit import RateLimit, RelayRateLimiter, window_key
from dispatcher.delivery.transports.memory import MemoryTransport
from dispatcher.ports import InlineQueue
from dispatcher.redisclient import RedisClient, connect
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.credits.test_notifications import (  # noqa: F401 - collected again, on the cluster
    test_a_jump_over_several_thresholds_notifies_the_highest_once,
    test_a_redelivered_send_does_not_notify_again,
    test_each_threshold_is_notified_once_in_app_and_by_email,
    test_racing_processes_across_80_and_100_percent_notify_in_order_at_most_once,
    test_redis_flushed_mid_stream_neither_overspends_nor_notifies_twice,
    test_upgrade_re_arms_thresholds_against_the_new_total,
)
from tests.credits.test_quota import (  # noqa: F401 - collected again, on the cluster
    test_a_notice_recorded_after_a_stale_rebuild_raises_notified_again,
    test_a_pending_key_is_counted_once_whether_it_was_granted_or_not,
    test_a_pending_key_that_cannot_fit_is_denied_and_uncounted,
    test_a_refund_made_while_the_grant_is_gone_is_not_counted_by_the_rebuild,
    test_a_replayed_key_gets_its_first_answer_and_takes_nothing,
    test_a_vanished_grant_is_rebuilt_from_the_sql_ledger,
    test_bulk_reservation_is_all_or_nothing,
    test_each_threshold_is_reported_once_and_a_jump_reports_the_highest,
    test_grants_expire_after_their_period,
    test_rebuild_takes_the_notified_threshold_from_the_ledger,
    test_refund_does_not_rearm_a_reported_threshold,
    test_refund_gives_the_credit_back_once,
    test_refunds_of_a_pending_campaign_come_back_part_by_part,
    test_reservations_stop_exactly_at_the_grant,
)
from tests.credits.test_rebuild_model import (
    test_credits_stay_exact_when_redis_is_flushed_during_concurrent_work,
)
from tests.credits.test_refunds import (  # noqa: F401 - collected again, on the cluster
    test_a_cancel_whose_refund_redis_refused_is_refunded_by_the_sweep_once,
    test_a_smartplan_refund_redis_refused_is_made_by_the_sweep,
)
from tests.helpers import make_user, seed_used_credits, send_request, statuses, wait_for
from tests.test_recovery import (  # noqa: F401 - collected again, on the cluster
    test_step_outcomes_lost_with_redis_are_published_again,
)
from tests.test_smartplan_e2e import all_terminal, send_body

# Collected again, on the cluster (its marks came from its module's ``pytestmark``).
test_credits_stay_exact_when_redis_is_flushed_during_concurrent_work = pytest.mark.slow(
    test_credits_stay_exact_when_redis_is_flushed_during_concurrent_work
)

#: Users whose grants lie on the three primaries (checked by the first test).
USERS = ("agent-1", "agent-2", "agent-3", "agent-4", "agent-5", "agent-6")


@pytest.fixture
def database_url(sqlite_template: Path, tmp_path: Path) -> str:
    """SQLite only in this module: the cluster is what is under test, and the suite runs the
    same use cases on PostgreSQL against a single Redis."""
    path = tmp_path / "dispatcher.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def redis_url(redis_cluster_url: str) -> str:
    """In this module the quota store is the private cluster, every primary empty."""
    return redis_cluster_url


@pytest.fixture
def redis_client(redis_cluster_url: str) -> Iterator[RedisClient]:
    client = connect(redis_cluster_url)
    yield client
    client.close()


def primary_of(client: RedisCluster, key: str) -> str:
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)


def server_slot(client: RedisCluster, key: str) -> int:
    """The slot the cluster itself computes for ``key`` (CLUSTER KEYSLOT)."""
    return int(client.execute_command("CLUSTER KEYSLOT", key))


def test_every_script_and_pipeline_touches_one_slot_and_users_spread_over_primaries(
    redis_client: RedisCluster,
) -> None:
    assert isinstance(redis_client, RedisCluster)
    assert len(redis_client.get_primaries()) == 3
    # reserve, refund, refund_parts, rebuild, notified: the grant hash and its reservations
    grant_keys = {
        u: [keys.grant(u, "2026-11", 1), keys.reservations(u, "2026-11", 1)] for u in USERS
    }
    for user, pair in grant_keys.items():
        assert len({server_slot(redis_client, k) for k in pair}) == 1, user
    assert {primary_of(redis_client, pair[0]) for pair in grant_keys.values()} == {
        n.name for n in redis_client.get_primaries()
    }
    # ratelimit.lua: every window of one relay
    windows = [window_key("smtp.example.com:587", s) for s in (1, 3600)]
    assert len({server_slot(redis_client, k) for k in windows}) == 1
    limiter = RelayRateLimiter(redis_client, "smtp.example.com:587", RateLimit(per_second=3))
    assert [limiter._try_at(1000.0, 1) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter._try_at(1000.5, 1) > 0.0  # the fourth in that second waits
    assert limiter._try_at(1001.01, 1) == 0.0
    # A chunk's DATA marks pipeline and the relay's halt pipeline each name one key.
    assert server_slot(redis_client, keys.chunk_data("c-1", 0)) == server_slot(
        redis_client, keys.chunk_data("c-1", 7)
    )


def test_the_runtime_builds_cluster_clients_and_health_asks_every_primary(
    runtime: Runtime,
) -> None:
    assert isinstance(runtime.redis, RedisCluster)

    async def marks_client() -> None:
        client = chunks._async_redis(runtime)
        assert isinstance(client, AsyncRedisCluster)
        pipe = client.pipeline(transaction=False)
        pipe.hset(keys.chunk_data("c-9", 0), "-", "1")
        pipe.expire(keys.chunk_data("c-9", 0), 60)
        assert await pipe.execute() == [1, True]
        await client.aclose()

    asyncio.run(marks_client())
    assert runtime.redis.hget(keys.chunk_data("c-9", 0), "-") == b"1"
    api = TestClient(create_api(runtime, InlineQueue()))
    assert api.get("/healthz").json() == {"status": "ok", "redis": "ok", "database": "ok"}
    stream = OutcomeStream(runtime.redis, runtime.settings.outcome_stream)
    stream.ensure_group("engine")
    assert runtime.relay.halted() is None
    runtime.relay.halt("535 refused")
    assert runtime.relay.halted() is not None and runtime.relay.resume()


def _sent(rt: Runtime, user: str, first: int, count: int) -> list[str]:
    q = InlineQueue()
    ids = [
        submit_send(rt, q, send_request(user, n=i, run_id=f"r{i}")).send_id
        for i in range(first, first + count)
    ]
    return [delivery.deliver(rt, i).value for i in ids]


def _lose_and_rebuild(rt: Runtime, lose: Callable[[RedisCluster], None]) -> None:
    """Three users on three primaries use part of their grants; Redis loses data; the
    counters come back from the SQL ledger exactly, and the rest of each grant, no more,
    can still be sent."""
    client = rt.redis
    assert isinstance(client, RedisCluster)
    for n, user in enumerate(USERS):
        make_user(rt, user)
        assert _sent(rt, user, 0, 3 + n) == ["sent"] * (3 + n)
    before = {c.user_id: c.ledger for c in reconcile(rt)}
    assert all(c.in_step for c in reconcile(rt))

    lose(client)

    for user in USERS:
        _, grant = ensure_current(rt, user)
        rt.quota.ensure(grant)  # rebuilt from SQL where it was lost
    after = {c.user_id: c.redis for c in reconcile(rt)}
    assert after == before, "every grant rebuilt exactly from the ledger"
    for n, user in enumerate(USERS):
        outcomes = _sent(rt, user, 100, 10)  # the grant is 10: 7 - n remain
        assert outcomes == ["sent"] * (7 - n) + ["failed"] * (3 + n), user
        c = credits(rt, user)
        assert (c.used, c.remaining) == (10, 0), user
    assert all(c.in_step for c in reconcile(rt))


def test_counters_are_rebuilt_exactly_after_every_primary_lost_its_data(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime(free_plan_credits=10, transport=MemoryTransport())
    _lose_and_rebuild(rt, lambda client: client.flushall(target_nodes=RedisCluster.PRIMARIES))


def test_counters_are_rebuilt_exactly_after_one_primary_lost_its_data(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime(free_plan_credits=10, transport=MemoryTransport())

    def lose_one(client: RedisCluster) -> None:
        node = client.get_node_from_key(keys.grant(USERS[0], "2026-11", 1))
        client.flushall(target_nodes=node)
        assert not client.exists(keys.grant(USERS[0], "2026-11", 1))

    _lose_and_rebuild(rt, lose_one)


@pytest.fixture
def broker(redis_server: str) -> str:
    """The broker: a single Redis (database 1 of the private server), as BROKER_URL names it
    beside a cluster REDIS_URL."""
    return redis_server.rsplit("/", 1)[0] + "/1"


def test_smartplan_sends_through_a_real_worker_with_the_counters_on_the_cluster(
    runtime: Runtime, api_client: Any, worker: Any, smtp_server: DevSMTPServer
) -> None:
    # Given an agent with 2 credits left, their grant on the cluster
    assert isinstance(runtime.redis, RedisCluster)
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", runtime.settings.free_plan_credits - 2)
    # When a SmartPlan posts 4 sends through the API and a worker consuming the single broker
    for n in range(4):
        assert api_client.post("/v1/sends", json=send_body(n)).status_code == 202
    wait_for(lambda: all_terminal(runtime, "agent-1", 4), what="4 terminal outcomes")
    # Then 2 are sent, 2 fail for quota, and the cluster's counters agree with the ledger
    assert statuses(runtime, "agent-1") == {"sent": 2, "failed": 2}
    to_contacts = [m for m in smtp_server.messages if m.rcpt_tos[0].startswith("contact")]
    assert len(to_contacts) == 2
    assert credits(runtime, "agent-1").remaining == 0
    wait_for(lambda: runtime.redis.xlen(runtime.settings.outcome_stream) == 4, what="4 outcomes")
