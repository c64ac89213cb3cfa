"""The application clock: the one source of "now"; tests set it, Redis TIME is never used."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Something that tells the current time as an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class OffsetClock:
    """Wall-clock time moved by a fixed offset (``CLOCK_OFFSET_SECONDS``).

    Every process given the same offset reads the same "now", so a test (or a rehearsal of a
    month end) can run real worker processes and commands in another period, with leases and
    timeouts still moving as they do in production.
    """

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    @classmethod
    def reading(cls, when: datetime) -> OffsetClock:
        """A clock that reads ``when`` now and moves on from there."""
        return cls(when - datetime.now(UTC))


def clock_for(offset_seconds: float) -> Clock:
    """The process's clock: the wall clock, shifted when an offset is configured."""
    if offset_seconds == 0:
        return SystemClock()
    return OffsetClock(timedelta(seconds=offset_seconds))


class FrozenClock:
    """A clock that only moves when told to; thread-safe, for tests and simulations."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FrozenClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when.astimezone(UTC)

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta
