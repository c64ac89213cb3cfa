"""The SQL side of the quota ledger: what Redis grants are rebuilt from."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.errors import NotFound
from dispatcher.models import CHARGED_STATUSES, Grant, Send
from dispatcher.quota import GrantRef, LedgerSnapshot, SnapshotSource


def snapshot(session: Session, grant: GrantRef) -> LedgerSnapshot:
    """The grant's total, its notified threshold and every idempotency key charged in it."""
    row = session.scalar(
        select(Grant).where(
            Grant.user_id == grant.user_id, Grant.period == grant.period, Grant.seq == grant.seq
        )
    )
    if row is None:
        raise NotFound("grant", f"{grant.user_id}:{grant.period}:{grant.seq}")
    charged = session.scalars(
        select(Send.idempotency_key).where(
            Send.user_id == grant.user_id,
            Send.period == grant.period,
            Send.grant_seq == grant.seq,
            Send.status.in_(CHARGED_STATUSES),
        )
    ).all()
    return LedgerSnapshot(total=row.total, charged_keys=list(charged), notified=row.notified)


def snapshot_source(sessions: sessionmaker[Session]) -> SnapshotSource:
    def read(grant: GrantRef) -> LedgerSnapshot:
        with sessions() as session:
            return snapshot(session, grant)

    return read
