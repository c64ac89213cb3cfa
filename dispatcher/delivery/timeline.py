"""The contact timeline: what the agent sees happened with each email."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.models import SendKind, SendStatus, TimelineEvent, TimelineKind

#: The timeline event of each terminal status.
KIND_OF = {
    SendStatus.SENT: TimelineKind.EMAIL_SENT,
    SendStatus.FAILED: TimelineKind.EMAIL_FAILED,
    SendStatus.UNKNOWN: TimelineKind.EMAIL_UNKNOWN,
}


@dataclass(frozen=True)
class EventView:
    id: int
    kind: str
    status: str
    reason: str | None
    detail: str | None
    subject: str | None
    send_id: str | None
    source: dict[str, Any]
    occurred_at: datetime


def source_of(send: Any) -> dict[str, Any]:
    """Which SmartPlan step or campaign an email (a :class:`Send` or a row of its columns)
    belongs to."""
    if send.kind is SendKind.SMARTPLAN:
        return {
            "type": "smartplan",
            "smartplan_id": send.smartplan_id,
            "run_id": send.run_id,
            "step_id": send.step_id,
        }
    return {"type": "campaign", "campaign_id": send.campaign_id}


def events(session: Session, user_id: str, contact_id: str, limit: int = 100) -> list[EventView]:
    """A contact's events for one user, newest first."""
    rows = session.scalars(
        select(TimelineEvent)
        .where(TimelineEvent.user_id == user_id, TimelineEvent.contact_id == contact_id)
        .order_by(TimelineEvent.id.desc())
        .limit(limit)
    ).all()
    return [
        EventView(
            id=e.id,
            kind=e.kind.value,
            status=e.status.value,
            reason=e.reason,
            detail=e.detail,
            subject=e.subject,
            send_id=e.send_id,
            source=e.source,
            occurred_at=e.occurred_at,
        )
        for e in rows
    ]
