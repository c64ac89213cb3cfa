"""Every Redis key the dispatcher writes, in one place."""

from __future__ import annotations

PREFIX = "ced"


def grant(user_id: str, period: str) -> str:
    """Hash of one grant: total, used, highest threshold notified."""
    # The hash tag keeps a grant and its reservations in one cluster slot.
    return f"{PREFIX}:quota:{{{user_id}:{period}}}"


def reservations(user_id: str, period: str) -> str:
    """Hash of idempotency key -> G (granted) | D (denied) | R (refunded)."""
    return f"{PREFIX}:quota:{{{user_id}:{period}}}:res"
