"""Send rate limits per SMTP relay, shared by every worker and process: a sliding-window log.

Why it is hand-written rather than a rate-limit library: the relay counts what reaches it per
second and per hour across all our workers and processes, so the limit must be one exact sliding
window in Redis, checked and taken in one Lua call, with a margin for the lag between admission
and arrival and an admission handed back only while it is fresh. The libraries at hand count per
process, in fixed windows, or approximately, and each of those lets the relay see more than its
limit in some second. ``tests/delivery/test_relay_rate.py`` proves the limit at a real SMTP
server in its own process, with four worker processes that are frozen now and then.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.commands.core import Script

from dispatcher import keys, metrics
from dispatcher.errors import TransientError
from dispatcher.reasons import Reason
from dispatcher.redisclient import RedisClient
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

#: Window lengths in seconds.
SECOND = 1
HOUR = 3600

#: How long an entry stays in its sorted set after it left its window (seconds): a call whose
#: clock reading is up to this much older than another's, yet runs after it, still counts
#: every entry of its window.
TRIM_SLACK = 10

#: Each window is counted over its length plus this margin (seconds): the relay sees each
#: message a little after its admission (the SMTP round trips, the scheduler), so counting a
#: slightly longer window keeps every window of the nominal length at the relay within the
#: limit as long as that lag stays under the margin. It costs under 10% of a per-second rate.
LAG_MARGIN = 0.1

#: The share of the margin an admission may age before :meth:`RelayRateLimiter.acquire` returns
#: it: the caller writes MAIL in the same step of its event loop, so the rest of the margin is
#: left for the network and the relay's own processing.
FENCE_SHARE = 0.5

#: Stale admissions in a row after which :meth:`RelayRateLimiter.acquire` gives up (the host is
#: too busy to send on time; the caller defers the message).
STALE_TRIES = 3

#: The shortest wait reported for a refusal; a wait that rounds to 0 at a window's very edge
#: must still read as "not admitted".
MIN_WAIT = 1e-6


# --------------------------------------------------------------------------- Redis keys


def relay_id(relay: str) -> str:
    """A stable, non-reversible name for a relay (``host:port``): keys, logs and errors never
    hold the host or anything a caller put before it, such as credentials."""
    return hashlib.sha256(relay.encode()).hexdigest()[:16]


def window_key(relay: str, seconds: int) -> str:
    """Sorted set of the messages admitted to relay ``relay`` (its :func:`relay_id`) in the
    last ``seconds``: member = unique token, score = admission time (unix seconds)."""
    # The hash tag keeps all windows of a relay in one cluster slot (one script touches them).
    return f"{keys.PREFIX}:rate:{{{relay}}}:{seconds}s"


# --------------------------------------------------------------------------- Limits and errors


@dataclass(frozen=True)
class RateLimit:
    """Messages a relay takes from all workers together, per second and per hour; None is
    no limit on that window."""

    per_second: int | None = None
    per_hour: int | None = None

    def __post_init__(self) -> None:
        for name, rate in (("per_second", self.per_second), ("per_hour", self.per_hour)):
            if rate is not None and rate < 1:
                raise ValueError(f"{name}={rate}: a rate limit must be at least 1 (or None)")

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimit:
        """``SMTP_RATE_PER_SECOND`` and ``SMTP_RATE_PER_HOUR``."""
        return cls(settings.smtp_rate_per_second, settings.smtp_rate_per_hour)

    @property
    def unlimited(self) -> bool:
        """True when neither window has a limit."""
        return self.per_second is None and self.per_hour is None

    @property
    def windows(self) -> tuple[tuple[int, int], ...]:
        """(window seconds, limit) of every limited window, shortest first."""
        pairs = ((SECOND, self.per_second), (HOUR, self.per_hour))
        return tuple((seconds, limit) for seconds, limit in pairs if limit is not None)

    @property
    def smallest(self) -> int | None:
        """The smallest limit (the largest batch ever admissible), None when unlimited."""
        return min((limit for _, limit in self.windows), default=None)


class RateLimited(TransientError):
    """The relay's rate is used up for longer than the caller may wait. Nothing was admitted,
    so deferring the message by ``wait`` seconds is safe."""

    def __init__(self, relay: str, wait: float) -> None:
        super().__init__(
            Reason.RATE_LIMITED, f"relay {relay} admits more in {wait:.3f}s", retry_after=wait
        )
        self.relay = relay  # the relay's id (a hash), never its host
        self.wait = wait


def _load(name: str) -> str:
    return resources.files("dispatcher").joinpath("lua", name).read_text()


# --------------------------------------------------------------------------- The limiter


class RelayRateLimiter:
    """At most ``limit`` messages to one relay in every sliding second and hour, counted over
    every process that uses this Redis.

    Each window is a log of admission times in a sorted set; one Lua script counts the entries
    still in each window, admits ``n`` more only when every window stays within its limit,
    and otherwise admits nothing and answers how long until enough entries leave. So no window
    of the given length ever holds more than its limit, however the windows are placed (unlike
    a fixed-window counter there is no double burst across a boundary), and even when calls
    reach Redis out of the order of their clock readings (entries are kept :data:`TRIM_SLACK`
    seconds past their window for that).

    Admission times come from ``clock`` (unix seconds), never from Redis, so the guarantee holds
    on the callers' clocks: hosts whose clocks disagree by e seconds can overshoot by what e
    seconds admit. The relay sees each message a little after its admission (the SMTP
    conversation); windows are counted over their length plus ``margin`` (the relay guard
    uses :data:`LAG_MARGIN`) so that the relay's
    own count of any window stays within the limit while that lag is under the margin. If
    Redis loses its data the log starts empty.

    The Redis client is the synchronous redis-py one; :meth:`acquire` calls it from a worker
    thread so a slow Redis never stalls the event loop.
    """

    def __init__(
        self,
        redis: RedisClient,
        relay: str,
        limit: RateLimit,
        clock: Callable[[], float] = time.time,
        margin: float = 0.0,
    ) -> None:
        self.relay = relay_id(relay)
        self.margin = margin
        self.limit = limit
        self._redis = redis
        self._clock = clock
        self._windows = limit.windows
        self._keys = [window_key(self.relay, seconds) for seconds, _ in self._windows]
        # Registering only computes the script's digest; an unlimited limiter never calls Redis.
        self._script: Script | None = (
            None if limit.unlimited else redis.register_script(_load("ratelimit.lua"))
        )

    def __repr__(self) -> str:
        return f"RelayRateLimiter({self.relay!r}, {self.limit!r})"

    def try_acquire(self, n: int = 1) -> float:
        """Admit ``n`` messages now, all or nothing: 0.0 when admitted, else the seconds until
        they would fit (nothing was admitted)."""
        return self._try_at(self._clock(), n)

    def _try_at(self, now: float, n: int) -> float:
        """:meth:`try_acquire` with the admission time ``now`` read by the caller."""
        self._check(n)
        if self._script is None:
            return 0.0
        args: list[Any] = [now, n, uuid.uuid4().hex, TRIM_SLACK]
        for seconds, limit in self._windows:
            args += [seconds + self.margin, limit]
        result = self._script(keys=self._keys, args=args)
        if int(result[0]) == 1:
            return 0.0
        return max(float(result[1]), MIN_WAIT)

    async def acquire(self, max_wait: float, n: int = 1) -> None:
        """Wait until ``n`` messages are admitted, sleeping out each wait the limiter names.

        Raises :class:`RateLimited` at once, without sleeping, when the wait asked for would
        end more than ``max_wait`` seconds after the call (say the hourly limit is used up),
        so the caller can defer the message instead of holding a worker. Redis errors pass
        through; trying later is safe (an admission whose reply was lost only wastes a slot).

        With a ``margin`` it returns only an admission at most ``margin * FENCE_SHARE`` seconds
        old (an older one is left to count and the call asks again), so a caller that sends
        at once, awaiting nothing else first, reaches the relay within the margin.
        """
        if max_wait < 0:
            raise ValueError(f"max_wait={max_wait}: must not be negative")
        self._check(n)
        if self._script is None:
            return
        deadline = time.monotonic() + max_wait
        stale = 0
        while True:
            admitted_at = self._clock()
            wait = await asyncio.to_thread(self._try_at, admitted_at, n)
            if wait == 0.0:
                if self.margin <= 0:
                    return
                late = self._clock() - admitted_at
                if late <= self.margin * FENCE_SHARE:
                    return
                # The process stalled between its admission and now (the scheduler, a slow
                # Redis): sent now, the message would reach the relay later than the margin
                # allows. The admission is left to count (it errs on the side of fewer) and
                # the message asks again, a few times before it is deferred.
                stale += 1
                log.debug("relay %s admission %.3fs old on return", self.relay, late)
                if stale >= STALE_TRIES:
                    raise RateLimited(self.relay, self.margin)
                continue
            if time.monotonic() + wait > deadline:
                log.debug("relay %s rate limited for %.3fs", self.relay, wait)
                raise RateLimited(self.relay, wait)
            # Sleeping exactly until the entry leaves its window: no polling in between.
            metrics.RATE_LIMIT_WAITS.inc()
            metrics.RATE_LIMIT_WAIT_SECONDS.inc(wait)
            await asyncio.sleep(wait)
            stale = 0  # stale admissions count only in a row

    def admitted(self, since: float, until: float) -> list[float]:
        """Admission times in ``[since, until)``, oldest first (the log reaches back the longest
        window plus :data:`TRIM_SLACK`; empty when unlimited)."""
        if not self._keys:
            return []
        rows = self._redis.zrangebyscore(self._keys[-1], since, f"({until!r}", withscores=True)
        return [float(score) for _, score in cast("list[tuple[bytes, float]]", rows)]

    def _check(self, n: int) -> None:
        smallest = self.limit.smallest
        if n < 1 or (smallest is not None and n > smallest):
            top = "" if smallest is None else f" and at most the smallest limit {smallest}"
            raise ValueError(f"n={n}: must be at least 1{top}")
