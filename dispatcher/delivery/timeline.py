"""The contact timeline: what the agent sees happened with each email."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import Session

from dispatcher.models import SendKind, SendStatus, TimelineEvent, TimelineKind
from dispatcher.pages import DEFAULT_LIMIT, Keyset, Page

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


def about_send(
    send: Any,
    kind: TimelineKind,
    now: datetime,
    *,
    reason: str | None = None,
    detail: str | None = None,
    subject: str | None = None,
) -> TimelineEvent:
    """An event about an email sent earlier (an unsubscribe, an open, a click, a bounce or a
    complaint), on its contact's timeline, pointing at the send."""
    return TimelineEvent(
        user_id=send.user_id,
        contact_id=send.contact_id,
        send_id=send.id,
        kind=kind,
        status=send.status,
        reason=reason,
        detail=detail,
        subject=subject,
        source=source_of(send),
        occurred_at=now,
    )


def of_send(send: Any) -> ColumnElement[bool]:
    """The events of one send, found through the (user, contact, id) index rather than by
    ``send_id`` alone, which no index covers."""
    return and_(
        TimelineEvent.user_id == send.user_id,
        TimelineEvent.contact_id == send.contact_id,
        TimelineEvent.send_id == send.id,
    )


#: A contact's events, newest first.
EVENTS = Keyset("timeline")


def events(
    session: Session,
    user_id: str,
    contact_id: str,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[EventView]:
    """A page of a contact's events for one user, newest first."""
    query = select(TimelineEvent).where(
        TimelineEvent.user_id == user_id, TimelineEvent.contact_id == contact_id
    )
    rows = session.scalars(EVENTS.query(query, TimelineEvent.id, cursor, limit)).all()
    return EVENTS.page(rows, limit, lambda e: e.id, _view)


def _view(e: TimelineEvent) -> EventView:
    return EventView(
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
