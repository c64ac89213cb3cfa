"""SmartPlan steps go before campaigns.

A SmartPlan step is one email an agent's plan sends to one contact now; a campaign is a bulk
run that may as well finish a little later. Both share the machine's CPU, the database and the
relay, so a campaign running flat out makes SmartPlan steps wait seconds in their queue.

The rule, in one place:

- **Behind**: a SmartPlan task that waited in its queue longer than ``SMARTPLAN_LAG_SECONDS``
  (``Settings.smartplan_lag_seconds``; 0 turns the rule off) says so in Redis: the key
  :data:`BEHIND_KEY` is set for :data:`HOLD_SECONDS` (refreshed while steps keep waiting, at
  most every :data:`MARK_EVERY` seconds per process).
- **Yield**: while that key lives, each lane of a campaign chunk waits before starting its next
  message, re-reading the key every :data:`CHECK_EVERY` seconds, but never more than
  :data:`MAX_PAUSE` seconds per message: a campaign slows to a trickle, never to a stop, even
  when SmartPlan traffic alone keeps the workers behind.

Nothing here decides a send's outcome: a Redis error only turns the rule off for that moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

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
#: The longest a campaign lane waits before one message: a yielding campaign still starts a
#: message per lane this often.
MAX_PAUSE = 1.0


class Behind:
    """The SmartPlan side: told how long each step's task waited in its queue."""

    def __init__(
        self,
        redis: RedisClient,
        lag: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._lag = lag
        self._clock = clock
        self._marked_at = -MARK_EVERY

    def waited(self, seconds: float) -> bool:
        """A SmartPlan task started ``seconds`` after it was published: past the lag target,
        campaigns yield for the next :data:`HOLD_SECONDS`. True when the key was set now."""
        if self._lag is None or seconds <= self._lag:
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
    """The campaign side, for one chunk run on its event loop: :meth:`turn` before each message.

    The lanes of the run share one reading of the key, refreshed every :data:`CHECK_EVERY`
    seconds by whichever lane needs it first."""

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
        #: Seconds this run's lanes spent yielding, all together (for the chunk's log line).
        self.paused = 0.0

    async def turn(self) -> None:
        """Wait while SmartPlan steps are behind, at most :data:`MAX_PAUSE` seconds."""
        waited = 0.0
        while waited < MAX_PAUSE:
            left = await self._behind_for()
            if left <= 0:
                break
            pause = min(left, CHECK_EVERY, MAX_PAUSE - waited)
            await asyncio.sleep(pause)
            waited += pause
        self.paused += waited

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
