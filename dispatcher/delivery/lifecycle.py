"""The send lifecycle: every status change of a send or system email is made here, and only here
(the state diagram is in docs/architecture.md).

Every change is a compare-and-set on the status (and, where a sweeper acts, on the lease it
read: the fence), so a redelivered task, a duplicate or a sweep never moves a send twice.
:func:`settle` records terminal outcomes in batches, whichever driver calls it (a SmartPlan
step, a campaign's chunk, its MailChimp job, a cancel, a sweep): status, timeline events, the
suppression of a hard-bounced address and the alert of a policy refusal in one transaction,
then the credits of failures back and, for SmartPlan steps, the outcome on the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, case, select, update
from sqlalchemy.orm import Session

from dispatcher import metrics
from dispatcher.credits import refunds
from dispatcher.credits.quota import GrantRef
from dispatcher.delivery import effects
from dispatcher.delivery.publish import publish_settled
from dispatcher.models import (
    Campaign,
    Send,
    SendKind,
    SendStatus,
    SystemEmail,
)
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Statuses of work not finished yet.
OPEN_STATUSES = (SendStatus.QUEUED, SendStatus.RESERVED, SendStatus.SENDING)
#: The others: an outcome.
FINAL_STATUSES = tuple(s for s in SendStatus if s not in OPEN_STATUSES)

_BATCH = 500


@dataclass(frozen=True)
class Outcome:
    """The terminal outcome of one send, as a driver decided it."""

    send_id: str
    status: SendStatus
    #: A :class:`~dispatcher.reasons.Reason` (errors carry theirs as ``reason``).
    reason: str | None = None
    detail: str | None = None
    #: The rendered subject the timeline shows (None: the stored one).
    subject: str | None = None


# --------------------------------------------------------------------------- timing


def stale_after(rt: Runtime) -> timedelta:
    """How long open work may sit untouched before it is taken for lost: longer than the
    longest retry countdown plus a lease, so live work is never mistaken for lost work."""
    s = rt.settings
    return timedelta(seconds=s.retry_backoff_max_seconds + s.send_lease_seconds + 60)


def reservation_hold(rt: Runtime) -> timedelta:
    """How long a ``reserved`` send may hold its credit without a worker moving it: twice
    what the stale-work sweep waits before enqueueing it again, so the sweep gets its turn
    first and the credit comes back only when even that did not help."""
    return 2 * stale_after(rt)


def conversation_lease(rt: Runtime, now: datetime) -> datetime:
    """Until when a worker that starts an SMTP conversation holds the send."""
    return now + timedelta(seconds=rt.settings.send_lease_seconds)


# --------------------------------------------------------------------------- one send


def _update(model: Any) -> Any:
    """An UPDATE of ``model``'s rows that leaves the session's objects alone: sessions here
    hold none of the rows they move, and matching them (SQLAlchemy's default) costs a
    SmartPlan step about as much as building the statement."""
    return update(model).execution_options(synchronize_session=False)


def _cas(
    session: Session,
    model: Any,
    ids: Sequence[str],
    expect: Iterable[SendStatus],
    lease_seen: datetime | None = None,
    **values: object,
) -> int:
    """Compare-and-set on the rows' status (and, with ``lease_seen``, on the lease read by the
    caller); how many rows moved."""
    query = _cas_statement(model, ids, expect, lease_seen)
    return cast(CursorResult[Any], session.execute(query.values(**values))).rowcount


def _cas_statement(
    model: Any, ids: Sequence[str], expect: Iterable[SendStatus], lease_seen: datetime | None
) -> Any:
    """The UPDATE of a compare-and-set, before its values."""
    query = _update(model).where(model.id.in_(list(ids)), model.status.in_(tuple(expect)))
    if lease_seen is not None:
        query = query.where(model.lease_until == lease_seen)
    return query


def _move(
    rt: Runtime, model: Any, row_id: str, expect: Iterable[SendStatus], **values: object
) -> bool:
    """:func:`_cas` on one row in a transaction of its own; whether it moved."""
    with rt.sessions.begin() as session:
        return _cas(session, model, [row_id], expect, None, **values) == 1


def claim_grant(rt: Runtime, send_id: str, grant: GrantRef) -> bool:
    """Record the grant a queued send will be charged to, before Redis is asked: should Redis
    lose its data before the send is reserved, the rebuild counts it (never an overspend).
    False when a concurrent delivery recorded one first."""
    return bool(claim_grants(rt, [send_id], grant))


def claim_grants(rt: Runtime, send_ids: Sequence[str], grant: GrantRef) -> set[str]:
    """:func:`claim_grant` for many sends of one grant's user in one UPDATE; the ids claimed."""
    with rt.sessions.begin() as session:
        return set(
            session.scalars(
                _update(Send)
                .where(
                    Send.id.in_(list(send_ids)),
                    Send.status == SendStatus.QUEUED,
                    Send.period.is_(None),
                )
                .values(period=grant.period, grant_seq=grant.seq)
                .returning(Send.id)
            ).all()
        )


def start(rt: Runtime, send_id: str) -> bool:
    """The send's credit is taken and a worker starts the SMTP conversation: ``sending`` under
    its lease, one more attempt (from ``queued`` on a first delivery, from ``reserved`` after a
    deferral). A crash before this leaves the send open with its credit idempotently reserved:
    the next delivery takes the same credit again, never a second one."""
    return bool(start_many(rt, [send_id]))


def start_many(rt: Runtime, send_ids: Sequence[str]) -> set[str]:
    """:func:`start` for many sends in one UPDATE, under one lease; the ids started."""
    now = rt.clock.now()
    lease = conversation_lease(rt, now)
    with rt.sessions.begin() as session:
        return set(
            session.scalars(
                _cas_statement(Send, send_ids, (SendStatus.QUEUED, SendStatus.RESERVED), None)
                .values(
                    status=SendStatus.SENDING,
                    lease_until=lease,
                    retry_at=None,
                    attempts=Send.attempts + 1,
                    updated_at=now,
                )
                .returning(Send.id)
            ).all()
        )


def back_to_reserved(
    rt: Runtime,
    send_id: str,
    *,
    attempted: bool,
    reason: str | None = None,
    detail: str | None = None,
) -> None:
    """A send whose conversation was deferred (``attempted``) or never happened (held back by
    the relay's guard: not an attempt) waits for its retry, its credit held anew."""
    now = rt.clock.now()
    values = _waiting(Send, attempted, reason, detail, lease_until=now + reservation_hold(rt))
    _move(
        rt,
        Send,
        send_id,
        (SendStatus.SENDING,),
        status=SendStatus.RESERVED,
        updated_at=now,
        **values,
    )


def _waiting(
    model: Any, attempted: bool, reason: str | None, detail: str | None, **values: object
) -> dict[str, object]:
    """The columns of an item going back to wait for its retry: a conversation that never
    happened gives its attempt back; a deferral records why."""
    if not attempted:
        values["attempts"] = model.attempts - 1
    if reason is not None:
        values.update(reason=reason, detail=detail)
    return values


def park(rt: Runtime, send_id: str, due: datetime) -> None:
    """A wait too long for the broker's countdown is stored on the send (the beat's sweep
    enqueues it when ``due``); a reserved send's credit stays held until then."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        _cas(
            session,
            Send,
            [send_id],
            (SendStatus.QUEUED, SendStatus.RESERVED),
            retry_at=due,
            updated_at=now,
        )
        _cas(
            session, Send, [send_id], (SendStatus.RESERVED,), lease_until=due + reservation_hold(rt)
        )


# --------------------------------------------------------------------------- many sends


def claim_batch(rt: Runtime, campaign_id: str, chunk: int, limit: int) -> Sequence[Any]:
    """Take the lease of up to ``limit`` reserved recipients of a campaign's chunk, atomically
    (``sending``, one more attempt each); their rows."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        ids = (
            select(Send.id)
            .where(
                Send.campaign_id == campaign_id,
                Send.chunk == chunk,
                Send.status == SendStatus.RESERVED,
            )
            .limit(limit)
            .scalar_subquery()
        )
        return session.execute(
            _update(Send)
            .where(Send.id.in_(ids), Send.status == SendStatus.RESERVED)
            .values(
                status=SendStatus.SENDING,
                lease_until=conversation_lease(rt, now),
                attempts=Send.attempts + 1,
                updated_at=now,
            )
            .returning(
                Send.id,
                Send.contact_id,
                Send.contact_email,
                Send.merge_fields,
                Send.message_id,
                Send.attempts,
            )
        ).all()


def release(rt: Runtime, deferred: Sequence[tuple[str, str, str]]) -> None:
    """Deferred recipients ``(send id, reason, detail)`` go back to reserved (credit kept)
    for their chunk's retry."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        for send_id, reason, detail in deferred:
            _cas(
                session,
                Send,
                [send_id],
                (SendStatus.SENDING,),
                status=SendStatus.RESERVED,
                lease_until=None,
                reason=reason,
                detail=detail,
                updated_at=now,
            )


def unclaim(rt: Runtime, send_ids: Sequence[str], *also: ColumnElement[bool]) -> None:
    """Claimed recipients whose conversation never started (held back by the relay's guard,
    or claimed by a worker that died first) go back to reserved; not an attempt."""
    with rt.sessions.begin() as session:
        session.execute(
            _update(Send)
            .where(Send.id.in_(list(send_ids)), Send.status == SendStatus.SENDING, *also)
            .values(
                status=SendStatus.RESERVED,
                lease_until=None,
                attempts=Send.attempts - 1,
                updated_at=rt.clock.now(),
            )
        )


def start_all_reserved(session: Session, campaign_id: str, now: datetime) -> None:
    """A campaign's bulk reservation succeeded: its queued recipients are ``reserved``."""
    session.execute(
        _update(Send)
        .where(Send.campaign_id == campaign_id, Send.status == SendStatus.QUEUED)
        .values(status=SendStatus.RESERVED, updated_at=now)
    )


def claim_campaign(
    session: Session, campaign_id: str, grant: GrantRef | None, now: datetime
) -> int:
    """A scheduled campaign's recipients not yet handed out are claimed against ``grant`` (the
    grant of the month it starts in) and ``queued``, in the caller's transaction, before its
    bulk reservation is asked for: a Redis rebuild meanwhile counts them as pending under the
    campaign's key. ``reserved`` ones held another month's credits (a start after that month
    ended), which the caller gives back. ``grant`` None unclaims them (the reservation could
    not be asked for). Returns how many recipients."""
    moved = session.execute(
        _update(Send)
        .where(
            Send.campaign_id == campaign_id,
            Send.status.in_((SendStatus.QUEUED, SendStatus.RESERVED)),
        )
        .values(
            status=SendStatus.QUEUED,
            period=grant.period if grant else None,
            grant_seq=grant.seq if grant else None,
            updated_at=now,
        )
    )
    return cast(CursorResult[Any], moved).rowcount


# --------------------------------------------------------------------------- finishing


def settle(
    rt: Runtime,
    outcomes: Iterable[Outcome],
    expect: tuple[SendStatus, ...],
    *,
    campaign: Campaign | None = None,
    lease_seen: datetime | None = None,
) -> list[str]:
    """Record terminal outcomes (compare-and-set from ``expect``) with their timeline events,
    in batches and one transaction; then the credits of failures back and, for SmartPlan
    steps, their outcomes on the stream. Returns the ids this call settled (those another
    delivery settled first are left as they are).

    A failed send never keeps a credit (R3, R4): whatever was reserved, or may have been for a
    send claimed when Redis lost its data, is given back; a send that took none costs nothing.
    """
    now = rt.clock.now()
    ordered = sorted(outcomes, key=lambda o: (o.status.value, o.reason or "", o.detail or ""))
    settled: list[str] = []
    settled_rows: list[Any] = []
    refund_rows: list[Any] = []
    smartplan_rows: list[Any] = []
    with rt.sessions.begin() as session:
        # One UPDATE per outcome class (status and reason) and batch, whatever the details:
        # an SMTP server's reply often names its queue id, so each message's differs.
        for (status, reason), group in groupby(ordered, key=lambda o: (o.status, o.reason)):
            refund = status is SendStatus.FAILED
            items = list(group)
            subjects = {o.send_id: o.subject for o in items}
            for start_at in range(0, len(items), _BATCH):
                part = items[start_at : start_at + _BATCH]
                ids = [o.send_id for o in part]
                rows = _settle_rows(
                    session,
                    ids,
                    expect,
                    lease_seen,
                    status=status,
                    reason=None if reason is None else str(reason),
                    detail=_details(part),
                    lease_until=None,
                    finished_at=now,
                    updated_at=now,
                    # Due for every failed send that was claimed against a grant.
                    refund_due=Send.period.is_not(None) if refund else False,
                )
                if not rows:
                    continue
                effects.record(session, rows, subjects, campaign, now)
                settled += [r.id for r in rows]
                settled_rows += rows
                if refund:
                    refund_rows += [r for r in rows if r.period is not None]
                smartplan_rows += [r for r in rows if r.kind is SendKind.SMARTPLAN]
    if refund_rows:
        # After the commit: the ledger no longer counts them, so a rebuild agrees. Should
        # Redis fail here, the flags set with the outcomes have the sweep make them.
        refunds.give_back_rows(rt, refund_rows)
    for r in smartplan_rows:
        log.info("send %s id=%s reason=%s", r.status.value, r.id, r.reason)
    publish_settled(rt, smartplan_rows)
    _observe(settled_rows, now)
    return settled


def _observe(rows: Sequence[Any], now: datetime) -> None:
    """Count settled sends by kind, outcome and reason, and how long each took from its
    acceptance."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in rows:
        labels = (r.kind.value, r.status.value, r.reason or "")
        counts[labels] = counts.get(labels, 0) + 1
        metrics.SEND_LATENCY.labels(r.kind.value).observe(
            max(0.0, (now - r.created_at).total_seconds())
        )
    for labels, n in counts.items():
        metrics.SENDS.labels(*labels).inc(n)


def _details(outcomes: Sequence[Outcome]) -> Any:
    """The ``detail`` of a batch's UPDATE: the one value they share, or each send's own."""
    first = outcomes[0].detail
    if all(o.detail == first for o in outcomes):
        return first
    return case({o.send_id: o.detail for o in outcomes}, value=Send.id)


def _settle_rows(
    session: Session,
    ids: list[str],
    expect: tuple[SendStatus, ...],
    lease_seen: datetime | None,
    **values: object,
) -> list[Any]:
    """The compare-and-set of :func:`settle`; the rows it moved."""
    query = _cas_statement(Send, ids, expect, lease_seen).values(**values)
    return list(session.execute(query.returning(*_SETTLED)).all())


#: What the consequences of a settled send (effects, refund, log) need to know of it.
_SETTLED = (
    Send.id,
    Send.idempotency_key,
    Send.period,
    Send.grant_seq,
    Send.kind,
    Send.user_id,
    Send.contact_id,
    Send.contact_email,
    Send.subject,
    Send.status,
    Send.reason,
    Send.detail,
    Send.smartplan_id,
    Send.run_id,
    Send.step_id,
    Send.campaign_id,
    Send.created_at,
)


def finish(
    rt: Runtime,
    outcome: Outcome,
    expect: tuple[SendStatus, ...],
    *,
    lease_seen: datetime | None = None,
) -> bool:
    """Settle one send (see :func:`settle`); whether this call settled it."""
    return bool(settle(rt, [outcome], expect, lease_seen=lease_seen))


# --------------------------------------------------------------------------- system emails


def start_system_email(rt: Runtime, email_id: str) -> bool:
    """A worker starts a system email's conversation: ``sending`` under its lease."""
    lease = conversation_lease(rt, rt.clock.now())
    return _move(
        rt,
        SystemEmail,
        email_id,
        (SendStatus.QUEUED,),
        status=SendStatus.SENDING,
        lease_until=lease,
        attempts=SystemEmail.attempts + 1,
    )


def system_email_back(
    rt: Runtime,
    email_id: str,
    *,
    attempted: bool,
    reason: str | None = None,
    detail: str | None = None,
) -> None:
    """A system email deferred (``attempted``) or held back waits for its retry, queued."""
    values = _waiting(SystemEmail, attempted, reason, detail, lease_until=None)
    _move(rt, SystemEmail, email_id, (SendStatus.SENDING,), status=SendStatus.QUEUED, **values)


def finish_system_email(
    rt: Runtime,
    email_id: str,
    status: SendStatus,
    reason: str | None,
    detail: str | None,
    expect: tuple[SendStatus, ...] = (SendStatus.SENDING,),
) -> SendStatus:
    """Record a system email's terminal outcome (no credit, no timeline: it is ours)."""
    moved = _move(
        rt,
        SystemEmail,
        email_id,
        expect,
        status=status,
        reason=None if reason is None else str(reason),
        detail=detail,
        lease_until=None,
        finished_at=rt.clock.now(),
    )
    if moved:
        metrics.SYSTEM_EMAILS.labels(status.value).inc()
    log.info("system email %s id=%s reason=%s", status.value, email_id, reason)
    return status
