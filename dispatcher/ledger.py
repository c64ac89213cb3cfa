"""The SQL side of the quota ledger: what Redis grants are rebuilt from."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import plans
from dispatcher.errors import NotFound
from dispatcher.models import CHARGED_STATUSES, Send, User
from dispatcher.periods import Period
from dispatcher.quota import LedgerSnapshot, SnapshotSource
from dispatcher.settings import Settings


def snapshot(session: Session, settings: Settings, user_id: str, period: Period) -> LedgerSnapshot:
    """The grant's total and every idempotency key charged in it, from SQL."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("user", user_id)
    charged = session.scalars(
        select(Send.idempotency_key).where(
            Send.user_id == user_id,
            Send.period == period.id,
            Send.status.in_(CHARGED_STATUSES),
        )
    ).all()
    return LedgerSnapshot(
        total=plans.plan(settings, user.plan).monthly_credits, charged_keys=list(charged)
    )


def snapshot_source(sessions: sessionmaker[Session], settings: Settings) -> SnapshotSource:
    def read(user_id: str, period: Period) -> LedgerSnapshot:
        with sessions() as session:
            return snapshot(session, settings, user_id, period)

    return read
