"""Credit periods: the calendar month in the user's own time zone (rule R2)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dispatcher.errors import InvalidInput


@dataclass(frozen=True)
class Period:
    """One month of credits for one user; ``id`` is ``YYYY-MM`` in the user's zone."""

    id: str
    start: datetime  # aware, in the user's zone
    end: datetime  # exclusive, aware, in the user's zone

    @property
    def start_utc(self) -> datetime:
        return self.start.astimezone(UTC)

    @property
    def end_utc(self) -> datetime:
        return self.end.astimezone(UTC)


def zone(name: str, field: str = "timezone") -> ZoneInfo:
    """The IANA zone called ``name``, or :class:`InvalidInput` naming ``field``."""
    if not name or name != name.strip():
        raise InvalidInput(field, f"{name!r} is not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(field, f"{name!r} is not an IANA time zone name") from None


def period_at(when: datetime, tz_name: str) -> Period:
    """The period containing the instant ``when`` for a user in zone ``tz_name``."""
    if when.tzinfo is None:
        raise ValueError("period_at needs an aware datetime")
    tz = zone(tz_name)
    local = when.astimezone(tz)
    start = datetime(local.year, local.month, 1, tzinfo=tz)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime(year, month, 1, tzinfo=tz)
    return Period(id=f"{local.year:04d}-{local.month:02d}", start=start, end=end)


def period_by_id(period_id: str, tz_name: str) -> Period:
    """The period ``YYYY-MM`` for a user in zone ``tz_name``."""
    year, _, month = period_id.partition("-")
    tz = zone(tz_name)
    return period_at(datetime(int(year), int(month), 15, 12, tzinfo=tz), tz_name)
