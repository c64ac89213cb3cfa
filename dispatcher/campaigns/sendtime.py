"""When a scheduled campaign starts: ``send_at`` as producers give it (an ISO 8601 instant with
its offset, or a local time read in the agent's zone), checked against now and the horizon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dispatcher.credits.periods import zone
from dispatcher.errors import InvalidInput
from dispatcher.validation import shown

FIELD = "send_at"


def parse(value: object) -> datetime:
    """``value`` as a datetime: aware when it names its offset (``Z``, ``+02:00``), naive when it
    is a local time (read later in the agent's zone by :func:`resolve`)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise InvalidInput(FIELD, "must be an ISO 8601 date and time, e.g. 2026-12-01T09:00:00")
    text = value.strip()
    if not text:
        raise InvalidInput(FIELD, "must not be empty (leave send_at out to send now)")
    if "T" not in text and " " not in text:
        # A date alone would mean midnight, which nobody means by a send time.
        raise InvalidInput(FIELD, f"{shown(value)} has no time of day (e.g. {text}T09:00:00)")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            FIELD,
            f"{shown(value)} is not an ISO 8601 date and time "
            "(e.g. 2026-12-01T09:00:00-07:00, or 2026-12-01T09:00:00 in the agent's zone)",
        ) from None


def resolve(given: datetime, tz_name: str, now: datetime, max_days: int) -> datetime:
    """The instant (UTC) ``given`` names for an agent in zone ``tz_name``: as it is when it has
    an offset, else a wall-clock time in that zone (a time the clocks skip when summer time
    starts does not exist and is refused; one they pass twice is the first). Refused when not
    after ``now`` (to send now, leave ``send_at`` out) or more than ``max_days`` ahead."""
    if given.tzinfo is None:
        tz = zone(tz_name)
        instant = given.replace(tzinfo=tz)
        if instant.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != given:
            raise InvalidInput(
                FIELD, f"{given.isoformat()} does not exist in {tz_name} (the clocks skip it)"
            )
    else:
        instant = given
    when = instant.astimezone(UTC)
    if when <= now:
        raise InvalidInput(
            FIELD,
            f"{when.isoformat()} is not in the future (now is "
            f"{now.astimezone(UTC).isoformat(timespec='seconds')}); leave send_at out to send now",
        )
    if when > now + timedelta(days=max_days):
        raise InvalidInput(FIELD, f"is more than {max_days} days ahead")
    return when
