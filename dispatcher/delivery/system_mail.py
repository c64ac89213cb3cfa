"""Our own emails to agents (usage notices, receipts): rendered from templates/system, sent on
the system queue, never charged a credit."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from dispatcher.delivery import identity, lifecycle
from dispatcher.delivery.lifecycle import finish_system_email
from dispatcher.delivery.message import Envelope, build_message, message_id_for
from dispatcher.delivery.rendering import Rendered
from dispatcher.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryUnknown,
    NotAttempted,
    NotFound,
    QueueUnavailable,
    SendBusy,
)
from dispatcher.models import Notification, SendStatus, SystemEmail, SystemEmailKind, User
from dispatcher.ports import DeferredToOutbox
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def _environment(templates_dir: str) -> Environment:
    # Our own templates: trusted, so a plain (autoescaping) environment, strict about names.
    return Environment(
        loader=FileSystemLoader(str(Path(templates_dir) / "system")),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def render(settings: Settings, name: str, context: dict[str, Any]) -> Rendered:
    """Render ``templates/system/<name>/{subject.txt,body.html,body.txt}``."""
    env = _environment(settings.templates_dir)
    subject = " ".join(env.get_template(f"{name}/subject.txt").render(context).split())
    ctx = {**context, "subject": subject}
    return Rendered(
        subject=subject,
        html=env.get_template(f"{name}/body.html").render(ctx),
        text=env.get_template(f"{name}/body.txt").render(ctx),
    )


def queue_email(
    session: Session,
    settings: Settings,
    user: User,
    kind: SystemEmailKind,
    template: str,
    context: dict[str, Any],
    now: datetime,
    *,
    notification_id: int | None = None,
    order_id: int | None = None,
) -> SystemEmail | None:
    """Store a rendered system email for ``user`` (in the caller's transaction).

    Returns None when the user has no address to write to. Enqueue the id after the commit
    (:func:`enqueue_system_emails`).
    """
    to = user.billing_address
    if to is None:
        log.warning("user %s has no address: %s email not queued", user.id, kind.value)
        return None
    rendered = render(settings, template, context)
    email_id = str(uuid.uuid4())
    email = SystemEmail(
        id=email_id,
        user_id=user.id,
        kind=kind,
        notification_id=notification_id,
        order_id=order_id,
        to_address=to,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        status=SendStatus.QUEUED,
        message_id=message_id_for(f"system|{email_id}", settings.message_id_domain),
        attempts=0,
        created_at=now,
    )
    session.add(email)
    return email


def deliver(rt: Runtime, email_id: str) -> SendStatus:
    """Send one system email; same lease and outcome rules as a user's send, without credits.

    Raises :class:`DeliveryDeferred` for a retry and :class:`SendBusy` while another worker
    holds the lease.
    """
    now = rt.clock.now()
    with rt.sessions() as session:
        email = session.get(SystemEmail, email_id)
        if email is None:
            raise NotFound("system email", email_id)
        session.expunge(email)
    if email.status.terminal:
        return email.status
    if email.status is SendStatus.SENDING:
        assert email.lease_until is not None
        if email.lease_until > now:
            raise SendBusy(email_id, (email.lease_until - now).total_seconds() + 1)
        return finish_system_email(rt, email_id, SendStatus.UNKNOWN, Reason.WORKER_LOST, None)
    if email.kind is SystemEmailKind.USAGE_NOTICE and _earlier_notice_pending(rt, email):
        raise NotAttempted(
            Reason.EARLIER_NOTICE_PENDING,
            "a lower usage notice of the same grant has not gone out yet",
            # Never longer than a countdown may be (a longer wait is parked for the sweep).
            retry_after=min(NOTICE_ORDER_WAIT_SECONDS, rt.settings.retry_backoff_max_seconds),
        )
    if not lifecycle.start_system_email(rt, email_id):
        raise SendBusy(email_id, 1.0)
    platform = identity.for_platform(rt.settings)
    message = build_message(
        Rendered(email.subject, email.html, email.text),
        from_address=platform.from_address,
        from_name=platform.from_name,
        to_address=email.to_address,
        reply_to=None,
        message_id=email.message_id,
        date=now,
    ).as_bytes()
    if platform.signer is not None:
        message = platform.signer.sign(message, now)
    envelope = Envelope(identity.system_envelope_sender(rt.settings, platform), (email.to_address,))
    try:
        delivery = rt.run(rt.transport.send(envelope, message))
    except NotAttempted:
        # Held back by the relay's guard (halted, rate-limited): not an attempt.
        lifecycle.system_email_back(rt, email_id, attempted=False)
        raise
    except DeliveryDeferred as exc:
        if email.attempts + 1 > rt.settings.send_max_retries:
            return finish_system_email(
                rt, email_id, SendStatus.FAILED, Reason.RETRIES_EXHAUSTED, exc.detail
            )
        lifecycle.system_email_back(
            rt, email_id, attempted=True, reason=exc.reason, detail=exc.detail
        )
        raise
    except DeliveryRejected as exc:
        return finish_system_email(rt, email_id, SendStatus.FAILED, exc.reason, exc.detail)
    except DeliveryUnknown as exc:
        return finish_system_email(rt, email_id, SendStatus.UNKNOWN, exc.reason, exc.detail)
    detail = f"{delivery.code} {delivery.reply}"
    return finish_system_email(rt, email_id, SendStatus.SENT, None, detail)


#: How long a usage notice waits for a lower one of the same grant before it looks again.
NOTICE_ORDER_WAIT_SECONDS = 2.0


def _earlier_notice_pending(rt: Runtime, email: SystemEmail) -> bool:
    """Whether a lower threshold's notice email of the same grant is still to be sent, so
    that this one, sent now, would reach the agent first ("limit reached" before "95% used")."""
    if email.notification_id is None:
        return False
    mine = aliased(Notification)
    lower = aliased(Notification)
    with rt.sessions() as session:
        pending = session.scalar(
            select(SystemEmail.id)
            .join(lower, SystemEmail.notification_id == lower.id)
            .join(mine, mine.id == email.notification_id)
            .where(
                SystemEmail.user_id == email.user_id,  # (user_id, ...) is indexed
                SystemEmail.kind == SystemEmailKind.USAGE_NOTICE,
                lower.grant_id == mine.grant_id,
                lower.threshold < mine.threshold,
                SystemEmail.status.in_((SendStatus.QUEUED, SendStatus.SENDING)),
            )
            .limit(1)
        )
    return pending is not None


def give_up(rt: Runtime, email_id: str, reason: str, detail: str) -> SendStatus:
    """A system email that cannot go on (a permanent error, or unforeseen errors
    ``SEND_MAX_RETRIES`` times) fails terminally; ``unknown`` when caught mid-conversation."""
    why = f"handling kept failing: {detail}" if reason == Reason.INTERNAL_ERROR else detail
    finish_system_email(rt, email_id, SendStatus.FAILED, reason, why, (SendStatus.QUEUED,))
    finish_system_email(rt, email_id, SendStatus.UNKNOWN, reason, why)
    with rt.sessions() as session:
        status = session.scalar(select(SystemEmail.status).where(SystemEmail.id == email_id))
    return status or SendStatus.FAILED


def enqueue_system_emails(rt: Runtime, email_ids: Iterable[str]) -> None:
    """Enqueue committed system emails; one the broker refuses waits for the outbox sweep."""
    for email_id in email_ids:
        try:
            rt.queue.enqueue_system_email(email_id)
        except DeferredToOutbox:
            continue
        except QueueUnavailable as exc:
            log.warning("system email %s left for the outbox sweep: %s", email_id, exc.detail)
            continue
        with rt.sessions.begin() as session:
            session.execute(
                update(SystemEmail)
                .where(SystemEmail.id == email_id)
                .values(enqueued_at=rt.clock.now())
            )
