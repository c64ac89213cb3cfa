"""Worker side of a send: take a credit, render, send, and record exactly one terminal outcome.

Every step is safe to repeat: the reservation is idempotent per send key, status changes are
compare-and-set, and the SMTP conversation is guarded by a lease so that a redelivered task never
talks to the server about a message another worker may already have handed over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, cast

from redis.exceptions import RedisError
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from dispatcher import alerts
from dispatcher.credits import notices, refunds
from dispatcher.credits.periods import period_by_id
from dispatcher.credits.quota import GrantRef
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import suppression
from dispatcher.delivery.message import Envelope, build_message
from dispatcher.delivery.outcomes import StepOutcome
from dispatcher.delivery.rendering import MessageTemplate, context_for
from dispatcher.delivery.timeline import record_outcome
from dispatcher.delivery.transports.classify import HARD_BOUNCE, POLICY
from dispatcher.delivery.unsubscribe import smartplan_headers
from dispatcher.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryUnknown,
    NotAttempted,
    NotFound,
    RenderError,
    SendBusy,
)
from dispatcher.models import AlertKind, Send, SendKind, SendStatus, User
from dispatcher.recovery import stale_after
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

QUOTA_EXHAUSTED = "quota_exhausted"
RETRIES_EXHAUSTED = "retries_exhausted"
WORKER_LOST = "worker_lost_during_smtp"
RESERVATION_EXPIRED = "reservation_expired"


def reservation_hold(rt: Runtime) -> timedelta:
    """How long a ``reserved`` send may hold its credit without a worker moving it: twice
    what the stale-work sweep waits before enqueueing it again, so the sweep gets its turn
    first and the credit comes back only when even that did not help."""
    return 2 * stale_after(rt)


def deliver(rt: Runtime, send_id: str, *, final_attempt: bool = False) -> SendStatus:
    """Drive one send as far as it can go now; returns its status afterwards.

    Raises :class:`~dispatcher.errors.DeliveryDeferred` when the server asked us to retry and
    this is not the final attempt, and :class:`~dispatcher.errors.SendBusy` when another worker
    holds the send's lease. Every other outcome is terminal and recorded before returning.
    """
    now = rt.clock.now()
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        if send is None:
            raise NotFound("send", send_id)
        if send.kind is not SendKind.SMARTPLAN:
            # A campaign recipient is delivered by its campaign's chunk, never on its own.
            raise NotFound("SmartPlan send", send_id)
        user = session.get(User, send.user_id)
        if user is None:
            raise NotFound("user", send.user_id)
        session.expunge_all()

    if send.status.terminal:
        publish_outcome(rt, send_id)  # a crash may have come between recording and publishing
        return send.status
    if send.status is SendStatus.SENDING:
        assert send.lease_until is not None
        if send.lease_until > now:
            raise SendBusy(send_id, (send.lease_until - now).total_seconds() + 1)
        # The worker holding the lease died mid-conversation: the server may have the message.
        return _finish(
            rt,
            send,
            SendStatus.UNKNOWN,
            WORKER_LOST,
            "the worker was lost while talking to the SMTP server; not resent",
            expect=(SendStatus.SENDING,),
        )

    with rt.sessions() as session:
        suppressed = suppression.reason_for(session, user.id, send.contact_email, now)
    if suppressed is not None:
        # Checked before any credit is taken: reported, never charged (or charged back when a
        # retry finds the address suppressed since).
        grant_held = (
            GrantRef.of(user.id, period_by_id(send.period, user.timezone), send.grant_seq)
            if send.period is not None and send.grant_seq is not None
            else None
        )
        return _finish(
            rt,
            send,
            SendStatus.FAILED,
            suppression.SUPPRESSED,
            f"the address is on the agent's suppression list ({suppressed}); not sent",
            refund=grant_held,
            expect=(SendStatus.QUEUED, SendStatus.RESERVED),
        )

    if send.period is not None and send.grant_seq is not None:
        # Reserved before (a retry or a redelivery): the same grant answers the same key.
        grant = GrantRef.of(user.id, period_by_id(send.period, user.timezone), send.grant_seq)
    else:
        user, grant = ensure_current(rt, user.id)
        # Claim the grant in SQL before asking Redis: should Redis lose its data before this
        # send is marked reserved, the rebuild counts it as in flight (never an overspend).
        # The grant is built first so that its own first rebuild does not count this claim.
        rt.quota.ensure(grant)
        with rt.sessions.begin() as session:
            claimed = (
                cast(
                    CursorResult[Any],
                    session.execute(
                        update(Send)
                        .where(
                            Send.id == send_id,
                            Send.status == SendStatus.QUEUED,
                            Send.period.is_(None),
                        )
                        .values(period=grant.period, grant_seq=grant.seq)
                    ),
                ).rowcount
                == 1
            )
        if not claimed:
            # A concurrent delivery claimed another grant first (a month start or an
            # upgrade in between): start over from what it recorded, never charge twice.
            return deliver(rt, send_id, final_attempt=final_attempt)
    reservation = rt.quota.reserve(grant, send.idempotency_key)
    send.period, send.grant_seq = grant.period, grant.seq
    if not reservation.granted:
        log.info(
            "send failed: quota exhausted id=%s user=%s grant=%s:%d used=%d total=%d",
            send.id,
            user.id,
            grant.period,
            grant.seq,
            reservation.used,
            reservation.total,
        )
        return _finish(
            rt,
            send,
            SendStatus.FAILED,
            QUOTA_EXHAUSTED,
            f"no credits left: {reservation.used} of {reservation.total} used in {grant.period}",
            expect=(SendStatus.QUEUED, SendStatus.RESERVED),
        )
    notices.after_reservation(rt, grant, reservation)
    if not _move(
        rt,
        send_id,
        (SendStatus.QUEUED, SendStatus.RESERVED),
        SendStatus.RESERVED,
        period=grant.period,
        grant_seq=grant.seq,
        lease_until=now + reservation_hold(rt),
        retry_at=None,
        updated_at=now,
    ):
        return _settled_elsewhere(rt, send_id)

    from_address = user.sender_address
    try:
        if from_address is None:
            raise RenderError("the user has no platform or communications email to send from")
        rendered = MessageTemplate(send.subject, send.html, send.text).render(
            context_for(send.contact_id, send.contact_email, send.merge_fields)
        )
        bulk = smartplan_headers(rt.settings, send.smartplan_id or "", send.user_id)
        message = (
            bulk.list_unsubscribe_field(send.id)
            + build_message(
                rendered,
                from_address=from_address,
                from_name=send.from_name,
                to_address=send.contact_email,
                reply_to=send.reply_to,
                message_id=send.message_id,
                date=now,
                extra_headers=bulk.constant,
            ).as_bytes()
        )
    except RenderError as exc:
        return _finish(
            rt,
            send,
            SendStatus.FAILED,
            exc.reason,
            exc.detail,
            refund=grant,
            expect=(SendStatus.RESERVED,),
        )

    lease = now + timedelta(seconds=rt.settings.send_lease_seconds)
    if not _move(
        rt,
        send_id,
        (SendStatus.RESERVED,),
        SendStatus.SENDING,
        lease_until=lease,
        attempts=Send.attempts + 1,
        updated_at=now,
    ):
        return _settled_elsewhere(rt, send_id)

    envelope = Envelope(mail_from=rt.settings.mail_from_address, recipients=(send.contact_email,))
    try:
        delivery = asyncio.run(rt.transport.send(envelope, message))
    except NotAttempted as exc:
        # The relay was never asked (halted, or the rate limit said wait): not an attempt.
        _back_to_reserved(rt, send_id, attempts=Send.attempts - 1)
        log.info("send held back id=%s reason=%s detail=%s", send_id, exc.reason, exc.detail)
        raise
    except DeliveryDeferred as exc:
        # The budget is the send's own SMTP attempts (this one included), not the task's
        # retries, which also count waits for a lease or for Redis/the database.
        if final_attempt or send.attempts + 1 > rt.settings.send_max_retries:
            return _finish(
                rt,
                send,
                SendStatus.FAILED,
                RETRIES_EXHAUSTED,
                f"gave up after retries; last error: {exc.detail}",
                refund=grant,
                expect=(SendStatus.SENDING,),
                subject=rendered.subject,
            )
        _back_to_reserved(rt, send_id, reason=exc.reason, detail=exc.detail)
        log.info("send deferred id=%s reason=%s detail=%s", send_id, exc.reason, exc.detail)
        raise
    except DeliveryRejected as exc:
        return _finish(
            rt,
            send,
            SendStatus.FAILED,
            exc.reason,
            exc.detail,
            refund=grant,
            expect=(SendStatus.SENDING,),
            subject=rendered.subject,
        )
    except DeliveryUnknown as exc:
        return _finish(
            rt,
            send,
            SendStatus.UNKNOWN,
            exc.reason,
            exc.detail,
            expect=(SendStatus.SENDING,),
            subject=rendered.subject,
        )
    return _finish(
        rt,
        send,
        SendStatus.SENT,
        None,
        f"{delivery.code} {delivery.reply}",
        expect=(SendStatus.SENDING,),
        subject=rendered.subject,
    )


def _back_to_reserved(rt: Runtime, send_id: str, **values: object) -> None:
    """A send whose conversation did not happen or was deferred waits for its retry, its
    credit held (for a new hold)."""
    now = rt.clock.now()
    _move(
        rt,
        send_id,
        (SendStatus.SENDING,),
        SendStatus.RESERVED,
        lease_until=now + reservation_hold(rt),
        updated_at=now,
        **values,
    )


def _cas(
    session: Session,
    send_id: str,
    expect: Iterable[SendStatus],
    lease_seen: datetime | None = None,
    **values: object,
) -> bool:
    """Compare-and-set on the send's status (and, with ``lease_seen``, on the lease it had
    when read: the fence); false when it was no longer in ``expect``."""
    query = update(Send).where(Send.id == send_id, Send.status.in_(tuple(expect)))
    if lease_seen is not None:
        query = query.where(Send.lease_until == lease_seen)
    result = session.execute(query.values(**values))
    return cast(CursorResult[Any], result).rowcount == 1


def expire_reservation(rt: Runtime, send_id: str, lease_seen: datetime) -> bool:
    """Give back the credit of a send stuck in ``reserved`` past its hold; true when it did.

    Fenced: the send fails only if it is still ``reserved`` with the very lease read by the
    sweeper. A worker that picked it up meanwhile renewed that lease (or moved it to
    ``sending``), so the sweeper's compare-and-set loses and nothing is taken from a send in
    progress; a worker that comes later finds it terminal and stops.
    """
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        if send is None:
            return False
        tz = session.scalar(select(User.timezone).where(User.id == send.user_id)) or "UTC"
        session.expunge_all()
    if send.period is None or send.grant_seq is None:
        return False
    grant = GrantRef.of(send.user_id, period_by_id(send.period, tz), send.grant_seq)
    status = _finish(
        rt,
        send,
        SendStatus.FAILED,
        RESERVATION_EXPIRED,
        "no worker could send this email while its credit was held; the credit is back",
        expect=(SendStatus.RESERVED,),
        refund=grant,
        lease_seen=lease_seen,
        quiet=True,
    )
    if status is not SendStatus.FAILED:
        return False
    with rt.sessions() as session:  # failed by this sweep, not for another reason
        return session.scalar(select(Send.reason).where(Send.id == send_id)) == RESERVATION_EXPIRED


def _move(
    rt: Runtime, send_id: str, expect: Iterable[SendStatus], to: SendStatus, **values: object
) -> bool:
    """Move the send to ``to`` if it is still in ``expect``, in its own transaction."""
    with rt.sessions.begin() as session:
        return _cas(session, send_id, expect, None, status=to, **values)


def _finish(
    rt: Runtime,
    send: Send,
    status: SendStatus,
    reason: str | None,
    detail: str | None,
    *,
    expect: tuple[SendStatus, ...],
    refund: GrantRef | None = None,
    subject: str | None = None,
    lease_seen: datetime | None = None,
    quiet: bool = False,
) -> SendStatus:
    """Record the terminal outcome and its timeline event in one transaction, then refund
    (when the credit is to come back) and publish the step outcome. ``quiet``: losing the
    compare-and-set is expected (a sweeper), so report the status without waiting."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        won = _cas(
            session,
            send.id,
            expect,
            lease_seen,
            status=status,
            reason=reason,
            detail=detail,
            period=send.period,
            grant_seq=send.grant_seq,
            lease_until=None,
            finished_at=now,
            updated_at=now,
            refund_due=refund is not None,
        )
        if won:
            row = session.get(Send, send.id)
            assert row is not None
            record_outcome(session, row, now, subject)
            if reason == HARD_BOUNCE:
                # The address does not exist: never again for this agent.
                suppression.hard_bounced(
                    session, send.user_id, send.contact_email, send.contact_id, detail, now
                )
            elif reason == POLICY:
                # Content or reputation: not the address's fault, so not suppressed; ops and
                # the agent must look (one alert an hour per agent, not one per send).
                alerts.record(
                    session,
                    AlertKind.POLICY_REJECTED,
                    f"the relay refused a SmartPlan email on policy grounds: {detail}",
                    now,
                    user_id=send.user_id,
                    quiet_for=timedelta(hours=1),
                )
    if not won:
        if quiet:
            with rt.sessions() as session:
                current = session.scalar(select(Send.status).where(Send.id == send.id))
            return current or status
        return _settled_elsewhere(rt, send.id)
    log.info("send %s id=%s user=%s reason=%s", status.value, send.id, send.user_id, reason)
    if refund is not None:
        # After the commit: SQL no longer counts this key, so a rebuild agrees with the refund.
        # Should Redis fail here, the flag set with the outcome has the sweep make it.
        try:
            rt.quota.refund(refund, send.idempotency_key)
        except RedisError as exc:
            log.warning("refund of send %s left to the refund sweep: %s", send.id, exc)
        else:
            refunds.made(rt, [send.id])
    publish_outcome(rt, send.id)
    return status


def _settled_elsewhere(rt: Runtime, send_id: str) -> SendStatus:
    """Another delivery of the same send moved it on; report where it is now."""
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        assert send is not None
        status, lease_until = send.status, send.lease_until
    if status is SendStatus.SENDING and lease_until is not None:
        raise SendBusy(send_id, max((lease_until - rt.clock.now()).total_seconds(), 0) + 1)
    if status.terminal:
        publish_outcome(rt, send_id)
    return status


def publish_outcome(rt: Runtime, send_id: str) -> None:
    """Publish a SmartPlan send's terminal outcome once it is recorded (at least once)."""
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        if send is None or send.kind is not SendKind.SMARTPLAN or send.outcome_published:
            return
        if not send.status.terminal:
            return
        outcome = StepOutcome(
            send_id=send.id,
            user_id=send.user_id,
            smartplan_id=send.smartplan_id or "",
            run_id=send.run_id or "",
            step_id=send.step_id or "",
            contact_id=send.contact_id,
            status=send.status.value,
            reason=send.reason,
        )
    rt.outcomes.publish(outcome)
    with rt.sessions.begin() as session:
        session.execute(update(Send).where(Send.id == send_id).values(outcome_published=True))
