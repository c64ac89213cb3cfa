"""Worker side of a SmartPlan step: take a credit, render, send, and record exactly one outcome.

A thin driver over :mod:`dispatcher.delivery.lifecycle`, which makes every status change: the
reservation is idempotent per send key, status changes are compare-and-set, and the SMTP
conversation is guarded by a lease so that a redelivered task never talks to the server about
a message another worker may already have handed over.
"""

from __future__ import annotations

import logging
from datetime import datetime
from email.utils import format_datetime

from dispatcher import alerts
from dispatcher.credits import notices
from dispatcher.credits.grants import grant_ref
from dispatcher.credits.quota import GrantRef, Reservation
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import identity, lifecycle, returnpath, suppression
from dispatcher.delivery.footer import Footer
from dispatcher.delivery.lifecycle import Outcome
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.mime import skeleton
from dispatcher.delivery.publish import publish_outcome
from dispatcher.delivery.rendering import MessageTemplate, Rendered, context_for
from dispatcher.delivery.sandbox import RenderLimits
from dispatcher.delivery.tracking import Tracker
from dispatcher.delivery.transports.base import Delivery
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
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Where a SmartPlan send waits for a worker (no conversation under way).
OPEN = (SendStatus.QUEUED, SendStatus.RESERVED)


def deliver(rt: Runtime, send_id: str) -> SendStatus:
    """Drive one send as far as it can go now; returns its status afterwards.

    Raises :class:`~dispatcher.errors.DeliveryDeferred` when the server asked us to retry,
    :class:`~dispatcher.errors.NotAttempted` when the relay's guard held it back, and
    :class:`~dispatcher.errors.SendBusy` when another worker holds the send's lease. Every
    other outcome is terminal and recorded before returning.
    """
    now = rt.clock.now()
    send, user, suppressed = _load(rt, send_id, now)
    if send.status.terminal:
        publish_outcome(rt, send_id)  # a crash may have come between the two
        return send.status
    if send.status is SendStatus.SENDING:
        assert send.lease_until is not None
        if send.lease_until > now:
            raise SendBusy(send_id, (send.lease_until - now).total_seconds() + 1)
        # The worker holding the lease died mid-conversation: the server may have the message.
        return _finish(
            rt,
            Outcome(send_id, SendStatus.UNKNOWN, Reason.WORKER_LOST, _WORKER_LOST),
            (SendStatus.SENDING,),
        )
    if suppressed is not None:
        # Checked before any credit is taken: reported, never charged (or charged back when a
        # retry finds the address suppressed since).
        detail = f"the address is on the agent's suppression list ({suppressed}); not sent"
        outcome = Outcome(send_id, SendStatus.FAILED, Reason.SUPPRESSED, detail)
        return _finish(rt, outcome, OPEN)
    try:
        # Rendered before a credit is taken: a template that cannot render costs nothing.
        rendered, message, mail_from = build(rt, send, user, now)
    except RenderError as exc:
        outcome = Outcome(send_id, SendStatus.FAILED, exc.reason, exc.detail)
        return _finish(rt, outcome, OPEN)
    held = grant_ref(user.id, send.period, send.grant_seq, user.timezone)
    grant = held or _claim(rt, send, user)
    if grant is None:
        # A concurrent delivery claimed another grant first (a month start or an upgrade in
        # between): start over from what it recorded, never charge twice.
        return deliver(rt, send_id)
    status = _reserve(rt, send, grant)
    if status is not None:
        return status
    return _converse(rt, send, rendered, message, mail_from)


_WORKER_LOST = "the worker was lost while talking to the SMTP server; not resent"


def _load(rt: Runtime, send_id: str, now: datetime) -> tuple[Send, User, str | None]:
    """The send, its agent and why its address is suppressed (None: it is not), in one read."""
    with rt.reads() as session:
        send = session.get(Send, send_id)
        if send is None:
            raise NotFound("send", send_id)
        if send.kind is not SendKind.SMARTPLAN:
            # A campaign recipient is delivered by its campaign's chunk, never on its own.
            raise NotFound("SmartPlan send", send_id)
        user = session.get(User, send.user_id)
        if user is None:
            raise NotFound("user", send.user_id)
        suppressed = None
        if not send.status.terminal and send.status is not SendStatus.SENDING:
            suppressed = suppression.reason_for(session, user.id, send.contact_email, now)
        session.expunge_all()
    return send, user, suppressed


def _claim(rt: Runtime, send: Send, user: User) -> GrantRef | None:
    """Record the current grant on the send before Redis is asked; None when another delivery
    recorded one first."""
    user, grant = ensure_current(rt, user.id, known=user)
    # The grant is built first so that its own first rebuild does not count this claim.
    rt.quota.ensure(grant)
    return grant if lifecycle.claim_grant(rt, send.id, grant) else None


def _reserve(rt: Runtime, send: Send, grant: GrantRef) -> SendStatus | None:
    """Take the send's credit and start its conversation (``sending``, under its lease); the
    terminal status when there is no credit (or another delivery moved the send on), None
    when it may be sent."""
    reservation = rt.quota.reserve(grant, send.idempotency_key)
    if not reservation.granted:
        return _finish(rt, quota_exhausted(send, grant, reservation), OPEN)
    notices.after_reservation(rt, grant, reservation)
    if not lifecycle.start(rt, send.id):
        return _settled_elsewhere(rt, send.id)
    return None


def quota_exhausted(send: Send, grant: GrantRef, reservation: Reservation) -> Outcome:
    """The outcome of a send its reservation was denied to (logged)."""
    log.info(
        "send failed: quota exhausted id=%s user=%s grant=%s:%d used=%d total=%d",
        send.id,
        send.user_id,
        grant.period,
        grant.seq,
        reservation.used,
        reservation.total,
    )
    detail = f"no credits left: {reservation.used} of {reservation.total} used in {grant.period}"
    return Outcome(send.id, SendStatus.FAILED, Reason.QUOTA_EXHAUSTED, detail)


def build(rt: Runtime, send: Send, user: User, now: datetime) -> tuple[Rendered, bytes, str]:
    """Render the agent's template, add the footer, and build and sign the message's bytes;
    with the envelope sender aligned with its ``From``."""
    if user.sender_address is None:
        raise RenderError("the user has no platform or communications email to send from")
    sender = identity.for_agent(
        rt.settings, user.sender_address, from_name=send.from_name, reply_to=send.reply_to
    )
    rendered = MessageTemplate(send.subject, send.html, send.text).render(
        context_for(send.contact_id, send.contact_email, send.merge_fields),
        RenderLimits.of(rt.settings),
    )
    bulk = smartplan_headers(rt.settings, send.smartplan_id or "", send.user_id)
    link, unsubscribe_field = bulk.for_send(send.id)
    # A drip step is commercial mail too: the same footer as a campaign's.
    footer = Footer(
        rt.settings,
        postal_address=user.postal_address,
        sender_name=send.from_name or user.sender_address,
    )
    rendered = footer.add(rendered, link)
    message = skeleton(
        sender.from_address, sender.from_name, sender.reply_to, tuple(bulk.constant.items())
    ).render(
        to=send.contact_email,
        subject=rendered.subject,
        message_id=send.message_id,
        date=format_datetime(now),
        text=rendered.text,
        html=Tracker.of(rt.settings).html(rendered.html, send.id),
        extra=unsubscribe_field + returnpath.relay_fields(rt.settings, send.id),
    )
    if sender.signer is not None:
        message = sender.signer.sign(message, now)
    return rendered, message, identity.envelope_sender(rt.settings, sender, send.id)


def _converse(
    rt: Runtime, send: Send, rendered: Rendered, message: bytes, mail_from: str
) -> SendStatus:
    """The SMTP conversation, under the send's lease, and its outcome."""
    envelope = Envelope(mail_from=mail_from, recipients=(send.contact_email,))
    result: Delivery | Exception
    try:
        result = rt.run(rt.transport.send(envelope, message))
    except (NotAttempted, DeliveryDeferred, DeliveryRejected, DeliveryUnknown) as exc:
        result = exc
    after = after_conversation(rt, send, rendered.subject, result)
    if isinstance(after, Outcome):
        return _finish(rt, after, (SendStatus.SENDING,))
    raise after


def after_conversation(
    rt: Runtime, send: Send, subject: str, result: Delivery | Exception
) -> Outcome | NotAttempted | DeliveryDeferred:
    """What a conversation's result makes of a ``sending`` send: the terminal outcome to
    record, or (the send back to ``reserved`` already) the hold or deferral its retry waits
    out. An unforeseen error is raised: the send stays ``sending`` under its lease."""
    if isinstance(result, NotAttempted):
        # The relay was never asked (halted, or the rate limit said wait): not an attempt.
        lifecycle.back_to_reserved(rt, send.id, attempted=False)
        log.info("send held back id=%s reason=%s detail=%s", send.id, result.reason, result.detail)
        return result
    if isinstance(result, DeliveryDeferred):
        # The budget is the send's own SMTP attempts (this one included), not the task's
        # retries, which also count waits for a lease or for Redis/the database.
        if send.attempts + 1 > rt.settings.send_max_retries:
            detail = f"gave up after retries; last error: {result.detail}"
            return Outcome(send.id, SendStatus.FAILED, Reason.RETRIES_EXHAUSTED, detail, subject)
        lifecycle.back_to_reserved(
            rt, send.id, attempted=True, reason=result.reason, detail=result.detail
        )
        log.info("send deferred id=%s reason=%s detail=%s", send.id, result.reason, result.detail)
        return result
    if isinstance(result, DeliveryRejected):
        return Outcome(send.id, SendStatus.FAILED, result.reason, result.detail, subject)
    if isinstance(result, DeliveryUnknown):
        return Outcome(send.id, SendStatus.UNKNOWN, result.reason, result.detail, subject)
    if isinstance(result, Delivery):
        return Outcome(send.id, SendStatus.SENT, None, f"{result.code} {result.reply}", subject)
    raise result


def _finish(rt: Runtime, outcome: Outcome, expect: tuple[SendStatus, ...]) -> SendStatus:
    """Record the outcome; where another delivery moved the send on first, report that."""
    if lifecycle.finish(rt, outcome, expect):
        return outcome.status
    return _settled_elsewhere(rt, outcome.send_id)


def _settled_elsewhere(rt: Runtime, send_id: str) -> SendStatus:
    """Another delivery of the same send moved it on; report where it is now."""
    with rt.reads() as session:
        send = session.get(Send, send_id)
        assert send is not None
        status, lease_until = send.status, send.lease_until
    if status is SendStatus.SENDING and lease_until is not None:
        raise SendBusy(send_id, max((lease_until - rt.clock.now()).total_seconds(), 0) + 1)
    if status.terminal:
        publish_outcome(rt, send_id)
    return status


def give_up(rt: Runtime, send_id: str, reason: str, detail: str) -> SendStatus:
    """The send cannot go on: a permanent error escaped its handling, or its handling kept
    failing for an unforeseen cause ``SEND_MAX_RETRIES`` times (``internal_error``, alerted).
    It fails terminally with its credit back, its timeline event and its step outcome
    published, instead of looping. A send caught mid-conversation is ``unknown`` (the server
    may have it), never resent."""
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        if send is None or send.status.terminal:
            return SendStatus.FAILED if send is None else send.status
        user_id = send.user_id
    why = f"handling kept failing: {detail}" if reason == Reason.INTERNAL_ERROR else detail
    failed = Outcome(send_id, SendStatus.FAILED, reason, why)
    lifecycle.settle(rt, [failed], OPEN)
    lifecycle.settle(rt, [Outcome(send_id, SendStatus.UNKNOWN, reason, why)], (SendStatus.SENDING,))
    if reason == Reason.INTERNAL_ERROR:
        with rt.sessions.begin() as session:
            alerts.record(
                session,
                AlertKind.INTERNAL_ERROR,
                f"SmartPlan send {send_id} gave up after repeated unforeseen errors: {detail}",
                rt.clock.now(),
                user_id=user_id,
            )
    return _settled_elsewhere(rt, send_id)


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
        took_credit = send.period is not None and send.grant_seq is not None
    if not took_credit:
        return False
    detail = "no worker could send this email while its credit was held; the credit is back"
    outcome = Outcome(send_id, SendStatus.FAILED, Reason.RESERVATION_EXPIRED, detail)
    return lifecycle.finish(rt, outcome, (SendStatus.RESERVED,), lease_seen=lease_seen)
