"""Reading MailChimp's HTTP answers: problem documents and Retry-After; quoting path values."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx


def quote_segment(segment: str) -> str:
    """A value put in a URL path, every reserved character escaped."""
    return quote(segment, safe="")


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """MailChimp's problem+json document, or a stand-in built from the raw answer."""
    try:
        data = response.json()
    except ValueError:
        return {"detail": response.text[:200]}
    return data if isinstance(data, dict) else {}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), if present."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None
