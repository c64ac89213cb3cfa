"""A counting semaphore in Redis, shared by every worker process: at most N holders at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.commands.core import Script
from redis.exceptions import RedisError

from dispatcher import keys
from dispatcher.errors import TransientError
from dispatcher.reasons import Reason
from dispatcher.redisclient import RedisClient

log = logging.getLogger(__name__)


def semaphore_key(name: str) -> str:
    """Sorted set of one semaphore's leases: member = lease token, score = expiry (unix ms)."""
    return f"{keys.PREFIX}:sem:{name}"


# Expired leases are dropped before counting, so a holder that crashed gives its slot back
# once its lease runs out. The key itself expires a while after its longest lease.
_ACQUIRE = """
local key, token = KEYS[1], ARGV[1]
local now, expires, limit, grace = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
    tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, token) and redis.call('ZCARD', key) >= limit then
  return 0
end
redis.call('ZADD', key, expires, token)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', key, math.max(tonumber(last[2]) - now, 0) + grace)
return 1
"""

# A lease that has already run out is not revived: its slot may belong to someone else now.
_RENEW = """
local key, token = KEYS[1], ARGV[1]
local now, expires, grace = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local score = redis.call('ZSCORE', key, token)
if not score then return 0 end
if tonumber(score) <= now then
  redis.call('ZREM', key, token)
  return 0
end
redis.call('ZADD', key, 'XX', expires, token)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', key, math.max(tonumber(last[2]) - now, 0) + grace)
return 1
"""

#: How long an abandoned semaphore key outlives its longest lease (ms).
_KEY_GRACE_MS = 60_000


class SemaphoreTimeout(TransientError):
    """No slot came free within the wait allowed; nothing was done, so trying later is safe."""

    def __init__(self, name: str, waited: float) -> None:
        super().__init__(Reason.SEMAPHORE_TIMEOUT, f"no free slot of {name!r} after {waited:.1f}s")
        self.name = name
        self.waited = waited


class RedisSemaphore:
    """At most ``limit`` concurrent holders of ``name`` across every process using this Redis.

    Each holder owns a lease (a random token) that expires after ``lease_seconds`` unless it is
    renewed; :meth:`slot` renews it in the background while the block runs, so only a holder
    that died stops renewing and loses its slot. Waiters poll with a small jittered sleep.

    The Redis client is the synchronous redis-py one (the one :class:`~dispatcher.runtime.Runtime`
    builds); every call runs in a worker thread so a slow Redis never stalls the event loop.
    Time comes from ``now`` (unix seconds), never from Redis.
    """

    def __init__(
        self,
        redis: RedisClient,
        name: str,
        limit: int,
        *,
        lease_seconds: float = 60.0,
        poll_interval: float = 0.05,
        wait_timeout: float | None = 120.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not name or any(c.isspace() for c in name):
            raise ValueError("name must be non-empty without whitespace")
        if lease_seconds <= 0 or poll_interval <= 0:
            raise ValueError("lease_seconds and poll_interval must be positive")
        self.name = name
        self.limit = limit
        self.key = semaphore_key(name)
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.wait_timeout = wait_timeout
        self._redis = redis
        self._now = now
        self._acquire: Script = redis.register_script(_ACQUIRE)
        self._renew: Script = redis.register_script(_RENEW)

    def __repr__(self) -> str:
        return f"RedisSemaphore({self.key!r}, limit={self.limit})"

    # ------------------------------------------------------------------ synchronous primitives

    def try_acquire(self, token: str) -> bool:
        """Take a slot for ``token`` if one is free (true), without waiting."""
        now_ms = int(self._now() * 1000)
        expires = now_ms + int(self.lease_seconds * 1000)
        args = [token, now_ms, expires, self.limit, _KEY_GRACE_MS]
        return bool(self._eval(self._acquire, args))

    def renew(self, token: str) -> bool:
        """Push the lease of ``token`` out by ``lease_seconds``; false when it was already lost."""
        now_ms = int(self._now() * 1000)
        expires = now_ms + int(self.lease_seconds * 1000)
        return bool(self._eval(self._renew, [token, now_ms, expires, _KEY_GRACE_MS]))

    def release(self, token: str) -> None:
        """Give the slot of ``token`` back (a no-op when it is not held)."""
        self._redis.zrem(self.key, token)

    def in_use(self) -> int:
        """How many leases are live right now."""
        return int(self._redis.zcount(self.key, f"({int(self._now() * 1000)}", "+inf"))

    def _eval(self, script: Script, args: list[Any]) -> Any:
        return script(keys=[self.key], args=args, client=self._redis)

    # ------------------------------------------------------------------ async API

    async def acquire(self, wait_timeout: float | None = None) -> str:
        """Wait for a free slot and return its lease token.

        Raises :class:`SemaphoreTimeout` after ``wait_timeout`` (default: the semaphore's own),
        and lets :class:`redis.RedisError` through (Redis is down: the caller retries later).
        """
        limit = self.wait_timeout if wait_timeout is None else wait_timeout
        token = uuid.uuid4().hex
        started = time.monotonic()
        delay = self.poll_interval / 4
        while True:
            try:
                taken = await asyncio.to_thread(self.try_acquire, token)
            except BaseException:
                # Cancelled (or failed) while the script may have run: never leak the slot.
                with contextlib.suppress(RedisError):
                    self.release(token)
                raise
            if taken:
                return token
            waited = time.monotonic() - started
            if limit is not None and waited >= limit:
                raise SemaphoreTimeout(self.name, waited)
            # Jitter keeps waiters in many processes from polling in lock step.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.poll_interval)

    async def arelease(self, token: str) -> None:
        """Async form of :meth:`release`."""
        await asyncio.to_thread(self.release, token)

    @contextlib.asynccontextmanager
    async def slot(self, wait_timeout: float | None = None) -> AsyncIterator[str]:
        """Hold one slot for the duration of the block (renewed while it runs)."""
        token = await self.acquire(wait_timeout)
        keeper = asyncio.create_task(self._keep(token), name=f"lease:{self.key}")
        try:
            yield token
        finally:
            keeper.cancel()
            # asyncio.wait, not a suppressed await: a cancellation of this task arriving
            # right now must go on propagating, not be taken for the keeper's own.
            try:
                await asyncio.wait({keeper})
            finally:
                await asyncio.shield(self.arelease(token))

    async def _keep(self, token: str) -> None:
        """Renew the lease every third of its life until cancelled."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                kept = await asyncio.to_thread(self.renew, token)
            except RedisError as exc:
                log.warning("semaphore %s: renewing a lease failed: %s", self.key, exc)
                continue
            if not kept:
                # The lease ran out (a stalled process, or Redis lost its data): the limit may
                # be exceeded until this holder finishes; nothing better can be done here.
                log.warning("semaphore %s: a lease was lost while held", self.key)
                return
