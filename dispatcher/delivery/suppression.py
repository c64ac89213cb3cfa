"""Each agent's suppression list: addresses that must not be emailed (hard bounces,
unsubscribes, manual entries with an optional expiry).

It is checked before any credit is reserved, so a suppressed recipient is reported and never
charged. Addresses are compared lower-cased.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dispatcher import validation
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.models import Suppression, SuppressionReason, SuppressionRemoval, User
from dispatcher.pages import DEFAULT_LIMIT, Keyset, Page
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuppressionView:
    email: str
    reason: str
    contact_id: str | None
    detail: str | None
    expires_at: datetime | None
    created_at: datetime


def normalize(email: str) -> str:
    """The form addresses are stored and compared in."""
    return email.strip().lower()


def _view(row: Suppression) -> SuppressionView:
    return SuppressionView(
        email=row.email,
        reason=row.reason.value,
        contact_id=row.contact_id,
        detail=row.detail,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )


def _live(now: datetime) -> ColumnElement[bool]:
    return or_(Suppression.expires_at.is_(None), Suppression.expires_at > now)


def add(
    session: Session,
    user_id: str,
    email: str,
    reason: SuppressionReason,
    now: datetime,
    *,
    contact_id: str | None = None,
    detail: str | None = None,
    expires_at: datetime | None = None,
) -> None:
    """Suppress ``email`` for ``user_id`` in the caller's transaction (insert or update).

    A later entry replaces an earlier one (reason, detail, expiry), except that an entry
    without expiry (a hard bounce, an unsubscribe) is never replaced by one with an expiry.
    """
    values = {
        "user_id": user_id,
        "email": normalize(email),
        "reason": reason,
        "contact_id": contact_id,
        "detail": detail,
        "expires_at": expires_at,
        "created_at": now,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Suppression).values(**values)
    new, old = stmt.excluded, Suppression.__table__.c
    # An entry without expiry is never replaced by one with an expiry; otherwise the newer
    # entry wins (an expiry can be extended or renewed).
    keep_old = old.expires_at.is_(None) & new.expires_at.is_not(None)

    def pick(column: str) -> Any:
        return case((keep_old, old[column]), else_=new[column])

    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["user_id", "email"],
            set_={
                "reason": pick("reason"),
                "detail": pick("detail"),
                "expires_at": pick("expires_at"),
                "created_at": pick("created_at"),
                "contact_id": func.coalesce(new.contact_id, old.contact_id),
            },
        )
    )


def hard_bounced(
    session: Session,
    user_id: str,
    email: str,
    contact_id: str | None,
    detail: str | None,
    now: datetime,
) -> None:
    """The relay said ``email`` does not exist: suppress it for the agent, in the caller's
    transaction (the one that records the outcome)."""
    add(
        session,
        user_id,
        email,
        SuppressionReason.HARD_BOUNCE,
        now,
        contact_id=contact_id,
        detail=detail,
    )


def active(
    session: Session, user_id: str, emails: Iterable[str], now: datetime
) -> dict[str, SuppressionReason]:
    """The suppressed addresses among ``emails`` (lower-cased), with their reasons."""
    wanted = sorted({normalize(e) for e in emails})
    found: dict[str, SuppressionReason] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(Suppression.email, Suppression.reason).where(
                Suppression.user_id == user_id,
                Suppression.email.in_(wanted[start : start + 500]),
                _live(now),
            )
        ).all()
        found.update({e: r for e, r in rows})
    return found


def live_entries(
    session: Session, user_id: str, now: datetime, limit: int
) -> dict[str, SuppressionReason] | None:
    """Every live entry of the agent's list (address lower-cased -> reason) when there are at
    most ``limit`` of them, else None: for a large campaign, one query instead of one per 500
    addresses, and no lower-cased copy of every recipient's address."""
    rows = session.execute(
        select(Suppression.email, Suppression.reason)
        .where(Suppression.user_id == user_id, _live(now))
        .limit(limit + 1)
    ).all()
    if len(rows) > limit:
        return None
    return {e: r for e, r in rows}


def reason_for(session: Session, user_id: str, email: str, now: datetime) -> str | None:
    """Why ``email`` is suppressed for ``user_id``, or None when it is not."""
    reason = active(session, user_id, [email], now).get(normalize(email))
    return None if reason is None else reason.value


# Use cases for the API and the CLI.


def suppress(
    rt: Runtime,
    user_id: str,
    email: str,
    *,
    reason: str = SuppressionReason.MANUAL.value,
    expires_at: datetime | None = None,
    detail: str | None = None,
) -> SuppressionView:
    """Add (or renew) an entry by hand; ``expires_at`` must lie in the future."""
    address = validation.address("email", email, utf8_local=True)
    try:
        why = SuppressionReason(reason)
    except ValueError:
        allowed = ", ".join(r.value for r in SuppressionReason)
        raise InvalidInput("reason", f"must be one of {allowed}") from None
    now = rt.clock.now()
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidInput("expires_at", "must carry a time zone (e.g. 2027-01-01T00:00:00Z)")
        if expires_at <= now:
            raise InvalidInput("expires_at", "must lie in the future")
    if detail is not None:
        detail = validation.header_text("detail", detail, max_len=500)
    with rt.sessions.begin() as session:
        if session.get(User, user_id) is None:
            raise NotFound("user", user_id)
        add(session, user_id, address, why, now, detail=detail, expires_at=expires_at)
    log.info("address suppressed user=%s reason=%s", user_id, why.value)
    return get(rt, user_id, address)


def get(rt: Runtime, user_id: str, email: str) -> SuppressionView:
    with rt.reads() as session:
        row = session.scalar(
            select(Suppression).where(
                Suppression.user_id == user_id, Suppression.email == normalize(email)
            )
        )
        if row is None:
            raise NotFound("suppression", email)
        return _view(row)


#: The longest reason a removal may give.
MAX_WHY = 2000


@dataclass(frozen=True)
class RemovalView:
    email: str
    reason: str  # the removed entry's reason
    suppressed_at: datetime
    removed_by: str
    why: str
    removed_at: datetime


def remove(rt: Runtime, user_id: str, email: str, *, by: str, why: str) -> RemovalView:
    """Take an address off the list (the agent re-confirmed consent), recording who did it,
    when and why in the same transaction: an unsubscribe undone is always accountable."""
    why = why.strip()
    if not why:
        raise InvalidInput("why", "say why the address may be emailed again")
    if len(why) > MAX_WHY:
        raise InvalidInput("why", f"must be at most {MAX_WHY} characters")
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        row = session.scalar(
            select(Suppression)
            .where(Suppression.user_id == user_id, Suppression.email == normalize(email))
            .with_for_update()
        )
        if row is None:
            raise NotFound("suppression", email)
        record = SuppressionRemoval(
            user_id=user_id,
            email=row.email,
            reason=row.reason.value,
            suppressed_at=row.created_at,
            removed_by=by,
            why=why,
            removed_at=now,
        )
        session.add(record)
        session.execute(delete(Suppression).where(Suppression.id == row.id))
        view = _removal(record)
    log.info("suppression removed user=%s by=%s", user_id, by)
    return view


#: A user's removals, newest first (in the order they were recorded).
REMOVALS = Keyset("suppression-removals")


def removals(
    rt: Runtime, user_id: str, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[RemovalView]:
    """A page of the addresses taken off ``user_id``'s list, newest first."""
    with rt.reads() as session:
        if session.get(User, user_id) is None:
            raise NotFound("user", user_id)
        query = select(SuppressionRemoval).where(SuppressionRemoval.user_id == user_id)
        rows = session.scalars(REMOVALS.query(query, SuppressionRemoval.id, cursor, limit)).all()
        return REMOVALS.page(rows, limit, lambda r: r.id, _removal)


def _removal(row: SuppressionRemoval) -> RemovalView:
    return RemovalView(
        email=row.email,
        reason=row.reason,
        suppressed_at=row.suppressed_at,
        removed_by=row.removed_by,
        why=row.why,
        removed_at=row.removed_at,
    )


#: A user's entries, newest first by when they were first added: a renewed entry (a second
#: bounce, a longer expiry) keeps its place, so a walk through the pages never misses it.
LISTING = Keyset("suppressions")


def listing(
    rt: Runtime,
    user_id: str,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
    containing: str | None = None,
) -> Page[SuppressionView]:
    """A page of the entries in force for ``user_id``, newest first; with ``containing``,
    only the addresses that contain it (case-insensitive)."""
    now = rt.clock.now()
    with rt.reads() as session:
        if session.get(User, user_id) is None:
            raise NotFound("user", user_id)
        query = select(Suppression).where(Suppression.user_id == user_id, _live(now))
        if containing:
            query = query.where(Suppression.email.contains(normalize(containing), autoescape=True))
        rows = session.scalars(LISTING.query(query, Suppression.id, cursor, limit)).all()
        return LISTING.page(rows, limit, lambda r: r.id, _view)
