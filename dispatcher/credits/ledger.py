"""The SQL side of the quota ledger: what Redis grants are rebuilt from."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from sqlalchemy import Result, literal, null, select, union_all
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.credits.grants import campaign_key
from dispatcher.credits.quota import GrantRef, LedgerSnapshot, SnapshotSource
from dispatcher.errors import NotFound
from dispatcher.models import (
    CHARGED_STATUSES,
    Campaign,
    CampaignStatus,
    Grant,
    Send,
    SendStatus,
)


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
    # over-grant by one (the same for a campaign leaving ``reserving``).
    # A campaign accepted compactly has no send rows yet, or some: its recipients count as
    # one number on its row, in the same statement, so the rows written in their place (the
    # transaction that writes the last clears the number) are counted either as rows or in
    # that number, never both, never neither.
    sends = (
        select(Send.idempotency_key, Send.status, Send.campaign_id, Campaign.status, literal(1))
        .outerjoin(Campaign, Campaign.id == Send.campaign_id)
        # The sends of a compact campaign written so far are in its packed count until the
        # last are written (the same transaction clears it).
        .where(Campaign.pending_recipients.is_(None))
    )
    compact = select(null(), null(), Campaign.id, Campaign.status, Campaign.recipients).where(
        Campaign.user_id == grant.user_id,
        Campaign.period == grant.period,
        Campaign.grant_seq == grant.seq,
        Campaign.status == CampaignStatus.RESERVING,
        Campaign.pending_recipients.is_not(None),
    )
    result: Result[Any] = session.execute(
        union_all(
            sends.where(*in_grant, Send.status.in_((*CHARGED_STATUSES, SendStatus.QUEUED))),
            compact,
        )
    )
    rows = [cast(tuple[Any, Any, Any, Any, int], tuple(r)) for r in result]
    # Claimed but not yet granted for sure: Redis may have granted them just before it lost
    # its data. They count as pending: used, under the key a worker reserves them with (a
    # SmartPlan send's own key, a campaign's bulk key for all its recipients), so that
    # reservation is granted without counting them twice. A campaign's recipients are stored
    # ``reserved`` while the campaign is ``reserving`` its credits: pending under its key
    # until it starts.
    charged: list[str] = []
    pending: Counter[str] = Counter()
    for key, status, campaign_id, campaign_status, n in rows:
        if campaign_status == CampaignStatus.RESERVING and campaign_id is not None:
            pending[campaign_key(campaign_id)] += n
        elif status is SendStatus.QUEUED:
            pending[key if campaign_id is None else campaign_key(campaign_id)] += 1
        else:
            charged.append(key)
    return LedgerSnapshot(
        total=row.total,
        charged_keys=charged,
        notified=row.notified,
        pending=sorted(pending.items()),
    )


def snapshot_source(sessions: sessionmaker[Session]) -> SnapshotSource:
    def read(grant: GrantRef) -> LedgerSnapshot:
        with sessions() as session:
            return snapshot(session, grant)

    return read
