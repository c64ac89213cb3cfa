"""The one retry rule: capped exponential backoff with full jitter."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0): drawn between
    ``base / 2`` and ``min(cap, base * 2**attempt)``, so retries of many items spread out."""
    return random.uniform(base / 2, min(cap, base * (2 ** min(attempt, 62))))


def honouring(countdown: float, asked: float | None, cap: float) -> float:
    """The wait before a retry: ``countdown``, never sooner than ``asked`` (a server, lease or
    guard that said when), and at most ``cap``, unless ``asked`` is itself longer: such a wait
    is longer than any countdown may be, and the caller parks it in SQL for the beat's sweep."""
    if asked is None:
        return countdown
    if asked > cap:
        return asked
    return min(max(countdown, asked), cap)
