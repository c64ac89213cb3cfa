"""Usage notifications (R5): in-app and by email, each threshold at most once per grant."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatcher.credits import plans
from dispatcher.credits.periods import period_by_id
from dispatcher.credits.quota import THRESHOLDS, GrantRef, Reservation
from dispatcher.credits.subscriptions import plan_label
from dispatcher.delivery import system_mail
from dispatcher.errors import NotFound
from dispatcher.models import Grant, Notification, SystemEmailKind, User
from dispatcher.pages import DEFAULT_LIMIT, Keyset, Page
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NotificationView:
    id: int
    threshold: int
    title: str
    body: str
    created_at: datetime
    read_at: datetime | None


def reached(used: int, total: int) -> int:
    """The highest threshold that ``used`` of ``total`` has reached, else 0."""
    return max((t for t in THRESHOLDS if total > 0 and used * 100 >= t * total), default=0)


def crossing_point(threshold: int, total: int) -> int:
    """The credits used at the moment ``threshold`` percent of ``total`` was reached: the
    figure a notice states under its heading (4,750 of 5,000 for 95%), whatever a bulk
    reservation that jumped past it took usage on to."""
    return min(total, -(-threshold * total // 100))


def after_reservation(rt: Runtime, grant: GrantRef, reservation: Reservation) -> int | None:
    """Notify the threshold this reservation reached first, unless it was already notified.

    Redis says which threshold a reservation crossed (atomically, so two racing reservations
    crossing 95% and 100% each get their own); the grant's SQL row, locked, decides whether
    that notification exists already, so a redelivered task or a Redis that forgot its
    counters cannot notify twice. A replayed reservation (its task was redelivered) notifies
    the highest threshold now reached if nothing at or above it was notified. Returns the
    threshold notified, if any.
    """
    if not reservation.granted:
        return None
    threshold = reservation.threshold
    if reservation.replay:
        threshold = reached(reservation.used, reservation.total) or None
    if not threshold:
        return None
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        row = session.scalar(
            select(Grant)
            .where(
                Grant.user_id == grant.user_id, Grant.period == grant.period, Grant.seq == grant.seq
            )
            .with_for_update()
        )
        if row is None:
            raise NotFound("grant", f"{grant.user_id}:{grant.period}:{grant.seq}")
        if row.notified >= threshold:
            return None
        exists = session.scalar(
            select(Notification.id).where(
                Notification.grant_id == row.id, Notification.threshold == threshold
            )
        )
        if exists is not None:
            return None
        row.notified = max(row.notified, threshold)
        email_id = _notify(rt, session, row, threshold, reservation.used, now)
    log.info(
        "usage notification user=%s grant=%s:%d threshold=%d",
        grant.user_id,
        grant.period,
        grant.seq,
        threshold,
    )
    # Redis set it when the reservation crossed, but a rebuild (Redis lost its data) that read
    # the ledger before this commit may have set it lower again.
    rt.quota.mark_notified(grant, threshold)
    if email_id:
        system_mail.enqueue_system_emails(rt, [email_id])
    return threshold


def _notify(
    rt: Runtime, session: Session, row: Grant, threshold: int, used: int, now: datetime
) -> str | None:
    """Add the in-app notification of ``threshold`` for grant ``row`` and queue its email (in
    the caller's transaction); the email's id, if the user has an address."""
    user = session.get(User, row.user_id)
    assert user is not None
    at = crossing_point(threshold, row.total)
    if threshold >= 100:
        title = "Limit reached: sends are now failing"
        body = (
            f"You have used all {row.total:,} Command Email sends of this month. "
            "SmartPlan and campaign emails through Command Email now fail until your "
            "next period starts or you upgrade."
        )
    else:
        title = f"You have used {threshold}% of your Command Email sends"
        body = f"{at:,} of {row.total:,} sends used this month, {row.total - at:,} left."
        if used > at:
            body += f" The same send or campaign took usage on to {used:,}."
        body += " Upgrade your Command Email subscription for more."
    note = Notification(
        user_id=user.id,
        grant_id=row.id,
        threshold=threshold,
        title=title,
        body=body,
        created_at=now,
    )
    session.add(note)
    session.flush()
    period = period_by_id(row.period, user.timezone)
    context = {
        "threshold": threshold,
        "used": at,
        "used_after": used,
        "total": row.total,
        "plan_label": plan_label(plans.plan(rt.settings, row.plan)),
        # The period's last day (its end is the exclusive first of the next month).
        "period_end": (period.end - timedelta(days=1)).strftime("%B %d, %Y"),
    }
    email = system_mail.queue_email(
        session,
        rt.settings,
        user,
        SystemEmailKind.USAGE_NOTICE,
        "usage_notice",
        context,
        now,
        notification_id=note.id,
    )
    return email.id if email else None


#: A user's notifications, newest first.
NOTIFICATIONS = Keyset("notifications")


def notifications(
    rt: Runtime, user_id: str, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[NotificationView]:
    """A page of a user's in-app notifications, newest first."""
    with rt.reads() as session:
        if session.get(User, user_id) is None:
            raise NotFound("user", user_id)
        query = select(Notification).where(Notification.user_id == user_id)
        rows = session.scalars(NOTIFICATIONS.query(query, Notification.id, cursor, limit)).all()
        return NOTIFICATIONS.page(rows, limit, lambda n: n.id, _notification)


def _notification(n: Notification) -> NotificationView:
    return NotificationView(
        id=n.id,
        threshold=n.threshold,
        title=n.title,
        body=n.body,
        created_at=n.created_at,
        read_at=n.read_at,
    )
