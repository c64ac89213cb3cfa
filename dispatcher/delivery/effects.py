"""What settled sends cause in the transaction that settles them: their timeline events, the
suppression of a hard-bounced address, and the alert of a SmartPlan policy refusal."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from dispatcher import alerts
from dispatcher.delivery import suppression
from dispatcher.delivery.timeline import KIND_OF, source_of
from dispatcher.models import AlertKind, Campaign, SendKind, TimelineEvent
from dispatcher.reasons import Reason


def record(
    session: Session,
    rows: list[Any],
    subjects: dict[str, str | None],
    campaign: Campaign | None,
    now: datetime,
) -> None:
    """The consequences of settled rows in their transaction: timeline events, a hard-bounced
    address suppressed, a SmartPlan policy refusal alerted."""
    source = None
    if campaign is not None:
        source = {
            "type": "campaign",
            "campaign_id": campaign.id,
            "provider": campaign.provider.value,
        }
    session.execute(
        insert(TimelineEvent),
        [
            {
                "user_id": r.user_id,
                "contact_id": r.contact_id,
                "send_id": r.id,
                "kind": KIND_OF[r.status],
                "status": r.status,
                "reason": r.reason,
                "detail": r.detail,
                "subject": subjects.get(r.id) or (campaign.subject if campaign else r.subject),
                "source": source or source_of(r),
                "occurred_at": now,
            }
            for r in rows
        ],
    )
    for r in rows:
        if r.reason == Reason.HARD_BOUNCE:
            # The address does not exist: never again for this agent.
            suppression.hard_bounced(
                session, r.user_id, r.contact_email, r.contact_id, r.detail, now
            )
        elif r.reason == Reason.POLICY_REJECTED and r.kind is SendKind.SMARTPLAN:
            # Content or reputation: not the address's fault, so not suppressed; ops and the
            # agent must look (one alert an hour per agent, not one per send). A campaign
            # pauses instead, with an alert of its own.
            alerts.record(
                session,
                AlertKind.POLICY_REJECTED,
                f"the relay refused a SmartPlan email on policy grounds: {r.detail}",
                now,
                user_id=r.user_id,
                quiet_for=timedelta(hours=1),
            )
