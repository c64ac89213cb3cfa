"""Alerts: what ops (and the agent, where it is theirs) must look at, kept in SQL and logged."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dispatcher.clock import Clock
from dispatcher.models import Alert, AlertKind
from dispatcher.pages import DEFAULT_LIMIT, Keyset, Page

log = logging.getLogger(__name__)


class AlertStore(Protocol):
    """What alerts need of a process: its sessions, those that only read, and its clock (a
    Runtime has them). Alerts do not import the Runtime, which raises them (a refused relay
    login halts and alerts)."""

    @property
    def sessions(self) -> sessionmaker[Session]: ...

    @property
    def reads(self) -> sessionmaker[Session]: ...

    @property
    def clock(self) -> Clock: ...


@dataclass(frozen=True)
class AlertView:
    id: int
    kind: str
    user_id: str | None
    campaign_id: str | None
    relay: str | None
    detail: str
    created_at: datetime


def record(
    session: Session,
    kind: AlertKind,
    detail: str,
    now: datetime,
    *,
    user_id: str | None = None,
    campaign_id: str | None = None,
    relay: str | None = None,
    quiet_for: timedelta | None = None,
) -> bool:
    """Add an alert in the caller's transaction and log it; with ``quiet_for``, skip it when
    the same kind was raised for the same user, campaign and relay that recently. Returns
    whether one was added."""
    if quiet_for is not None:
        recent = session.scalar(
            select(Alert.id)
            .where(
                Alert.kind == kind,
                Alert.user_id.is_(None) if user_id is None else Alert.user_id == user_id,
                Alert.campaign_id.is_(None)
                if campaign_id is None
                else Alert.campaign_id == campaign_id,
                Alert.relay.is_(None) if relay is None else Alert.relay == relay,
                Alert.created_at > now - quiet_for,
            )
            .limit(1)
        )
        if recent is not None:
            return False
    session.add(
        Alert(
            kind=kind,
            detail=detail,
            user_id=user_id,
            campaign_id=campaign_id,
            relay=relay,
            created_at=now,
        )
    )
    log.error(
        "ALERT %s user=%s campaign=%s relay=%s: %s",
        kind.value,
        user_id or "-",
        campaign_id or "-",
        relay or "-",
        detail,
    )
    return True


def raise_alert(
    rt: AlertStore,
    kind: AlertKind,
    detail: str,
    *,
    user_id: str | None = None,
    campaign_id: str | None = None,
    relay: str | None = None,
) -> None:
    """Record an alert in its own transaction."""
    with rt.sessions.begin() as session:
        record(
            session,
            kind,
            detail,
            rt.clock.now(),
            user_id=user_id,
            campaign_id=campaign_id,
            relay=relay,
        )


#: Alerts, newest first.
RECENT = Keyset("alerts")


def recent(
    rt: AlertStore,
    *,
    user_id: str | None = None,
    user_ids: Collection[str] | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[AlertView]:
    """A page of alerts, newest first, optionally of one user's work only, or of some users'
    only (then alerts about no user, such as a halted relay, are left out)."""
    with rt.reads() as session:
        query = select(Alert)
        if user_id is not None:
            query = query.where(Alert.user_id == user_id)
        if user_ids is not None:
            query = query.where(Alert.user_id.in_(list(user_ids)))
        rows = session.scalars(RECENT.query(query, Alert.id, cursor, limit)).all()
        return RECENT.page(rows, limit, lambda a: a.id, _view)


def _view(a: Alert) -> AlertView:
    return AlertView(
        id=a.id,
        kind=a.kind.value,
        user_id=a.user_id,
        campaign_id=a.campaign_id,
        relay=a.relay,
        detail=a.detail,
        created_at=a.created_at,
    )
