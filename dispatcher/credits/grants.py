"""Which grant a row's credits were taken from: the one place that finds it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.credits.periods import period_by_id
from dispatcher.credits.quota import GrantRef
from dispatcher.models import User


def campaign_key(campaign_id: str) -> str:
    """The idempotency key of a campaign's bulk credit reservation."""
    return f"campaign|{campaign_id}"


def grant_ref(user_id: str, period: str | None, seq: int | None, timezone: str) -> GrantRef | None:
    """The grant ``(period, seq)`` of ``user_id`` (in their zone), or None when the row never
    took a credit (no grant recorded)."""
    if period is None or seq is None:
        return None
    return GrantRef.of(user_id, period_by_id(period, timezone), seq)


def grant_of(
    sessions: sessionmaker[Session], user_id: str, period: str | None, seq: int | None
) -> GrantRef | None:
    """Like :func:`grant_ref`, reading the user's zone from SQL (it only reads: callers give it
    their read sessions)."""
    if period is None or seq is None:
        return None
    with sessions() as session:
        tz = session.scalar(select(User.timezone).where(User.id == user_id)) or "UTC"
    return grant_ref(user_id, period, seq, tz)
