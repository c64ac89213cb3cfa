"""Redis clients from ``REDIS_URL``: one server (``redis://``) or a Redis Cluster
(``redis+cluster://``), chosen by the URL's scheme in this one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

#: Either kind of client: the dispatcher's keys are hash-tagged so that every script and
#: pipeline touches one cluster slot, and the same code runs on both.
RedisClient: TypeAlias = Redis | RedisCluster
AsyncRedisClient: TypeAlias = AsyncRedis | AsyncRedisCluster

#: Schemes that name a Redis Cluster, and the scheme of one of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@dataclass(frozen=True)
class ClusterURL:
    """A ``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`` URL: the
    first node as a plain Redis URL (credentials, TLS and options included) and every node
    given, any of which can tell the client the cluster's layout."""

    first: str
    nodes: tuple[tuple[str, int], ...]


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """Split a cluster URL; :class:`ValueError` says what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme.lower())
    if not sep or node_scheme is None:
        raise ValueError(f"a cluster URL starts with {' or '.join(CLUSTER_SCHEMES)}://")
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends, default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hosts = authority.rpartition("@")
    path = tail.partition("?")[0]
    if path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {path.lstrip('/')!r}")
    nodes: list[tuple[str, int]] = []
    for node in hosts.split(","):
        host, colon, port = node.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{node.strip()!r} is not host:port (every node needs its port)")
        nodes.append((host, int(port)))
    first = f"{node_scheme}://{userinfo}{at}{hosts.split(',')[0].strip()}{tail}"
    return ClusterURL(first, tuple(nodes))


class ClusterUnreachable(RedisConnectionError):
    """No seed node of the Redis Cluster answered: an outage like any other Redis one
    (redis-py raises a bare ``RedisClusterException``, which callers would not take for one)."""


def connect(url: str, **options: Any) -> RedisClient:
    """A client of the Redis (or Redis Cluster) at ``url``. A single server's client
    connects on first use; a cluster's asks a seed node for the slot layout at once."""
    if not is_cluster(url):
        return Redis.from_url(url, **options)
    parsed = parse_cluster_url(url)
    # redis-py leaves the synchronous ClusterNode's constructor unannotated.
    seeds = [ClusterNode(h, p) for h, p in parsed.nodes[1:]]  # type: ignore[no-untyped-call]
    try:
        return RedisCluster.from_url(parsed.first, startup_nodes=seeds, **options)
    except RedisClusterException as exc:
        raise ClusterUnreachable(str(exc)) from exc


def connect_async(url: str, **options: Any) -> AsyncRedisClient:
    """An asyncio client of the Redis (or Redis Cluster) at ``url``, for one event loop."""
    if not is_cluster(url):
        return AsyncRedis.from_url(url, **options)
    parsed = parse_cluster_url(url)
    return AsyncRedisCluster.from_url(
        parsed.first,
        startup_nodes=[AsyncClusterNode(h, p) for h, p in parsed.nodes[1:]],
        **options,
    )


def ping(client: RedisClient) -> bool:
    """Whether Redis answers; on a cluster, whether every primary answers (one that does not
    holds the counters of its slots)."""
    if isinstance(client, RedisCluster):
        return bool(client.ping(target_nodes=RedisCluster.PRIMARIES))
    return bool(client.ping())
