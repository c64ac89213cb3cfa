"""What every worker asks before talking to the SMTP relay: is sending halted (the relay
refused our credentials), and may one more message go now (the rate limit all workers share)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from dispatcher.delivery import ratelimit
from dispatcher.delivery.ratelimit import LAG_MARGIN, RateLimit, RateLimited, RelayRateLimiter
from dispatcher.errors import NotAttempted
from dispatcher.keys import PREFIX
from dispatcher.reasons import Reason
from dispatcher.redisclient import RedisClient

log = logging.getLogger(__name__)

#: The longest a campaign lane waits in-process for the rate limit before deferring instead.
MAX_IN_PROCESS_WAIT = 10.0

#: Seconds before a message held back because Redis could not be asked is tried again.
UNAVAILABLE_RETRY = 5.0

#: How long :meth:`RelayGuard.check` trusts a "not halted" answer in this process: a halt
#: another process sets is seen within it. A halt answer is never reused, and a halt this
#: guard sets is seen at once.
CLEAR_SECONDS = 1.0


def relay_id(host: str, port: int) -> str:
    """A short, credential-free name for a relay, shared by every worker that uses it."""
    return ratelimit.relay_id(f"{host.lower()}:{port}")


def unavailable(exc: RedisError) -> NotAttempted:
    """A message held back because what decides whether it may go (Redis) could not be asked:
    not an attempt, tried again shortly. Never a reason to leave it half-sent."""
    return NotAttempted(
        Reason.GUARD_UNAVAILABLE,
        f"the relay guard could not be asked: {type(exc).__name__}: {exc}",
        UNAVAILABLE_RETRY,
    )


class RelayGuard:
    """The halt switch and the shared rate limit of one relay, both in Redis.

    ``on_halt`` is called once per halt (by the worker whose halt took effect) to raise the
    alert; the halt lifts after ``halt_seconds`` or when ops call :meth:`resume`.
    """

    def __init__(
        self,
        redis: RedisClient,
        relay: str,
        *,
        limit: RateLimit,
        halt_seconds: int,
        on_halt: Callable[[str], None],
    ) -> None:
        self.relay = relay
        self._redis = redis
        self._halt_key = f"{PREFIX}:relay:{relay}:halted"
        self._halt_seconds = halt_seconds
        self._on_halt = on_halt
        self._limiter = (
            None if limit.unlimited else RelayRateLimiter(redis, relay, limit, margin=LAG_MARGIN)
        )
        self._clear_until = 0.0  # time.monotonic() until which "not halted" is reused

    @property
    def limited(self) -> bool:
        return self._limiter is not None

    def check(self) -> None:
        """Raise :class:`NotAttempted` while sending through this relay is halted, or when
        Redis cannot say. Asked before every message: a "not halted" answer is reused for
        ``CLEAR_SECONDS`` by every thread of the process, so a busy worker asks Redis about
        once a second instead of once a message (the SmartPlan worker asked it on its event
        loop, holding up every conversation for a round trip per message)."""
        if time.monotonic() < self._clear_until:
            return
        try:
            halted = self.halted()
        except RedisError as exc:
            raise unavailable(exc) from None
        if halted is not None:
            detail, ttl = halted
            raise NotAttempted(Reason.RELAY_HALTED, f"sending is halted: {detail}", max(ttl, 1))
        self._clear_until = time.monotonic() + CLEAR_SECONDS

    def halted(self) -> tuple[str, int] | None:
        """Why sending is halted and for how many more seconds, or None."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._halt_key)
        pipe.ttl(self._halt_key)
        value, ttl = pipe.execute()
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text, int(ttl)

    def halt(self, detail: str) -> NotAttempted:
        """Stop every worker sending through this relay; the first caller raises the alert.
        Returns the error the caller raises for its own message (not attempted)."""
        self._clear_until = 0.0
        try:
            first = self._redis.set(self._halt_key, detail, nx=True, ex=self._halt_seconds)
        except RedisError as exc:
            return unavailable(exc)
        if first:
            log.error(
                "sending halted on relay %s for %ds: %s", self.relay, self._halt_seconds, detail
            )
            try:
                self._on_halt(detail)
            except Exception:
                # The halt is in force either way; only the alert could not be written.
                log.exception("the alert for the halt of relay %s was not recorded", self.relay)
        return NotAttempted(Reason.RELAY_HALTED, f"sending is halted: {detail}", self._halt_seconds)

    def resume(self) -> bool:
        """Lift a halt (ops fixed the credentials); true when one was in force."""
        return bool(self._redis.delete(self._halt_key))

    async def admit(self, max_wait: float = MAX_IN_PROCESS_WAIT) -> None:
        """Wait for the rate limit's permission for one message, up to ``max_wait`` seconds;
        raise :class:`NotAttempted` when the wait would be longer or Redis cannot say."""
        if self._limiter is None:
            return
        try:
            await self._limiter.acquire(max_wait)
        except RedisError as exc:
            raise unavailable(exc) from None
        except RateLimited as exc:
            raise NotAttempted(
                Reason.RATE_LIMITED, f"the relay's rate limit is used up: {exc}", exc.wait
            ) from None
