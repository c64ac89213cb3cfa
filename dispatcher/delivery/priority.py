"""SmartPlan steps go before campaigns.

A SmartPlan step is one email an agent's plan sends to one contact now; a campaign is a bulk
run that may as well finish a little later. Both share the machine's CPU, the database and the
relay, so a campaign running flat out makes SmartPlan steps wait seconds in their queue.

The rule, in one place:

- **Behind**: a SmartPlan task that waited in its queue longer than ``SMARTPLAN_LAG_SECONDS``
  (``Settings.smartplan_lag_seconds``; 0 turns the rule off) says so in Redis: the key
  :data:`BEHIND_KEY` is set for :data:`HOLD_SECONDS` (refreshed while steps keep waiting, at
  most every :data:`MARK_EVERY` seconds per process).
- **Yield**: while that key lives, each lane (SMTP connection) of a campaign chunk rests before
  starting its next message, :data:`REST_RATIO` times as long as its last message took (never
  more than :data:`MAX_PAUSE`): a yielding campaign keeps about a fifth of its speed, so it
  slows, never stops, even when SmartPlan traffic alone keeps the SmartPlan workers behind.
  The lanes of a run share one reading of the key, refreshed every :data:`CHECK_EVERY` seconds.

Nothing here decides a send's outcome: a Redis error only turns the rule off for that moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from dispatcher.keys import PREFIX
from dispatcher.redisclient import AsyncRedisClient, RedisClient

log = logging.getLogger(__name__)

#: Set while SmartPlan steps wait longer than the lag target; campaigns yield while it lives.
BEHIND_KEY = f"{PREFIX}:priority:smartplan-behind"
#: How long one "behind" lasts after the last step that waited too long.
HOLD_SECONDS = 0.5
#: A process refreshes the key at most this often (one SET, not one per step).
MARK_EVERY = 0.1
#: How often a campaign run re-reads the key (one PTTL shared by its lanes).
CHECK_EVERY = 0.05
#: While SmartPlan is behind, a campaign lane rests this many times as long as its last
#: message took (its conversation and the rest of its share of the batch's work).
REST_RATIO = 4.0
#: The longest a campaign lane rests before one message.
MAX_PAUSE = 1.0


class Behind:
    """The SmartPlan side: told how long each step's task waited in its queue."""

    def __init__(
        self,
        redis: RedisClient,
        lag: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._lag = lag
        self._clock = clock
        self._marked_at = -MARK_EVERY

    def waited(self, seconds: float) -> bool:
        """A SmartPlan task started ``seconds`` after it was published: past the lag target,
        campaigns yield for the next :data:`HOLD_SECONDS` (a lag of 0: never). True when the
        key was set now."""
        if not self._lag or seconds <= self._lag:
            return False
        now = self._clock()
        if now - self._marked_at < MARK_EVERY:
            return False
        self._marked_at = now
        try:
            self._redis.set(BEHIND_KEY, f"{seconds:.3f}", px=int(HOLD_SECONDS * 1000))
        except RedisError as exc:
            # The step is delivered either way; only the campaigns' yielding is lost.
            log.warning("could not tell campaigns that SmartPlan steps wait: %s", exc)
            return False
        return True


class Yield:
    """The campaign side, for one chunk run on its event loop: each lane awaits :meth:`turn`
    before each message."""

    def __init__(
        self,
        redis: AsyncRedisClient,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._read_at = -CHECK_EVERY
        self._behind_until = 0.0
        self._reading = False
        #: When each lane (its asyncio task) last came back from :meth:`turn`.
        self._since: weakref.WeakKeyDictionary[asyncio.Task[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        #: Seconds this run's lanes rested, all together (for the chunk's log line).
        self.paused = 0.0

    async def turn(self) -> None:
        """Rest while SmartPlan steps are behind: :data:`REST_RATIO` times as long as this
        lane's last message took, at most :data:`MAX_PAUSE` (no rest for a lane's first)."""
        lane = asyncio.current_task()
        assert lane is not None, "called from a lane's task"
        last = self._since.get(lane)
        if await self._behind_for() > 0 and last is not None:
            pause = min(MAX_PAUSE, REST_RATIO * (self._clock() - last))
            await asyncio.sleep(pause)
            self.paused += pause
        self._since[lane] = self._clock()

    async def _behind_for(self) -> float:
        """Seconds the key has left to live, as last read (read again when stale; lanes that
        come while it is being read use the reading before)."""
        if self._clock() - self._read_at >= CHECK_EVERY and not self._reading:
            self._reading = True
            try:
                ttl = await self._ttl()
            finally:
                self._reading = False
            self._read_at = self._clock()
            self._behind_until = self._read_at + ttl
        return self._behind_until - self._clock()

    async def _ttl(self) -> float:
        try:
            ms = await self._redis.pttl(BEHIND_KEY)
        except RedisError as exc:
            log.debug("could not read whether SmartPlan steps wait: %s", exc)
            return 0.0
        return max(0, int(ms)) / 1000
