"""The one retry rule: capped exponential backoff with full jitter."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0): drawn between
    ``base / 2`` and ``min(cap, base * 2**attempt)``, so retries of many items spread out."""
    return random.uniform(base / 2, min(cap, base * (2 ** min(attempt, 62))))
