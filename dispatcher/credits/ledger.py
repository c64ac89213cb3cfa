"""The SQL side of the quota ledger: what Redis grants are rebuilt from."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.credits.quota import GrantRef, LedgerSnapshot, SnapshotSource
from dispatcher.errors import NotFound
from dispatcher.models import CHARGED_STATUSES, Grant, Send, SendStatus


def snapshot(session: Session, grant: GrantRef) -> LedgerSnapshot:
    """The grant's total, its notified threshold and every idempotency key charged in it."""
    row = session.scalar(
        select(Grant).where(
            Grant.user_id == grant.user_id, Grant.period == grant.period, Grant.seq == grant.seq
        )
    )
    if row is None:
        raise NotFound("grant", f"{grant.user_id}:{grant.period}:{grant.seq}")
    in_grant = (
        Send.user_id == grant.user_id,
        Send.period == grant.period,
        Send.grant_seq == grant.seq,
    )
    # One statement, so one consistent view even under READ COMMITTED: read as two, a send
    # moving from queued to reserved in between would be in neither and the rebuild would
    # over-grant by one.
    rows = session.execute(
        select(Send.idempotency_key, Send.status).where(
            *in_grant, Send.status.in_((*CHARGED_STATUSES, SendStatus.QUEUED))
        )
    ).all()
    charged = [key for key, status in rows if status is not SendStatus.QUEUED]
    # Claimed but not yet marked reserved: Redis may have granted them just before it lost its
    # data. They count as used (without their keys), so the rebuild can only under-grant;
    # `dispatcher reconcile` gives such credits back once the sends have settled.
    in_flight = len(rows) - len(charged)
    return LedgerSnapshot(
        total=row.total,
        charged_keys=list(charged),
        notified=row.notified,
        in_flight=int(in_flight or 0),
    )


def snapshot_source(sessions: sessionmaker[Session]) -> SnapshotSource:
    def read(grant: GrantRef) -> LedgerSnapshot:
        with sessions() as session:
            return snapshot(session, grant)

    return read
