"""What every relay's webhook shares: reading its JSON body, its time check, its reports."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dispatcher.delivery.reports import MAX_DETAIL
from dispatcher.errors import InvalidInput

#: A signed request older (or newer) than this is refused: a captured one cannot be replayed.
MAX_AGE_SECONDS = 600

#: The request headers, by lower-case name.
Headers = Mapping[str, str]


def json_body(body: bytes) -> Any:
    """The body as JSON, or :class:`InvalidInput` on ``body``."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("body", f"is not JSON ({exc})") from None


def fresh(at: datetime | float, now: datetime, max_age: float = MAX_AGE_SECONDS) -> bool:
    """Whether a signed request's time (a datetime, or Unix seconds) is within ``max_age``
    of now (the application clock)."""
    seconds = at.timestamp() if isinstance(at, datetime) else at
    return abs(now.timestamp() - seconds) <= max_age


def text(value: Any) -> str | None:
    """A relay's free text as one capped line (None when empty)."""
    if value is None:
        return None
    line = " ".join(str(value).split())
    return line[:MAX_DETAIL] or None


def address(value: Any) -> str | None:
    """An address the relay names, lower-cased (None when it is none)."""
    if not isinstance(value, str) or "@" not in value:
        return None
    return value.strip().strip("<>").lower()
