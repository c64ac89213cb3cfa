"""Our own emails to agents (usage notices, receipts): rendered from templates/system, sent on
the system queue, never charged a credit."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from dispatcher.delivery.message import Envelope, build_message, message_id_for
from dispatcher.delivery.rendering import Rendered
from dispatcher.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryUnknown,
    NotAttempted,
    NotFound,
    SendBusy,
)
from dispatcher.models import SendStatus, SystemEmail, SystemEmailKind, User
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
    (:func:`dispatcher.outbox.enqueue_system_emails`).
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


def deliver(rt: Runtime, email_id: str, *, final_attempt: bool = False) -> SendStatus:
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
        return _finish(rt, email_id, SendStatus.UNKNOWN, "worker_lost_during_smtp", None)
    lease = now + timedelta(seconds=rt.settings.send_lease_seconds)
    if not _cas(
        rt,
        email_id,
        SendStatus.QUEUED,
        status=SendStatus.SENDING,
        lease_until=lease,
        attempts=SystemEmail.attempts + 1,
    ):
        raise SendBusy(email_id, 1.0)
    message = build_message(
        Rendered(email.subject, email.html, email.text),
        from_address=rt.settings.mail_from_address,
        from_name=rt.settings.mail_from.partition("<")[0].strip() or None,
        to_address=email.to_address,
        reply_to=None,
        message_id=email.message_id,
        date=now,
    ).as_bytes()
    envelope = Envelope(rt.settings.mail_from_address, (email.to_address,))
    try:
        delivery = asyncio.run(rt.transport.send(envelope, message))
    except NotAttempted:
        # Held back by the relay's guard (halted, rate-limited): not an attempt.
        _cas(
            rt,
            email_id,
            SendStatus.SENDING,
            status=SendStatus.QUEUED,
            lease_until=None,
            attempts=SystemEmail.attempts - 1,
        )
        raise
    except DeliveryDeferred as exc:
        if final_attempt or email.attempts + 1 > rt.settings.send_max_retries:
            return _finish(rt, email_id, SendStatus.FAILED, "retries_exhausted", exc.detail)
        _cas(
            rt,
            email_id,
            SendStatus.SENDING,
            status=SendStatus.QUEUED,
            lease_until=None,
            reason=exc.reason,
            detail=exc.detail,
        )
        raise
    except DeliveryRejected as exc:
        return _finish(rt, email_id, SendStatus.FAILED, exc.reason, exc.detail)
    except DeliveryUnknown as exc:
        return _finish(rt, email_id, SendStatus.UNKNOWN, exc.reason, exc.detail)
    return _finish(rt, email_id, SendStatus.SENT, None, f"{delivery.code} {delivery.reply}")


def _cas(rt: Runtime, email_id: str, expect: SendStatus, **values: object) -> bool:
    with rt.sessions.begin() as session:
        result = session.execute(
            update(SystemEmail)
            .where(SystemEmail.id == email_id, SystemEmail.status == expect)
            .values(**values)
        )
        return cast(CursorResult[Any], result).rowcount == 1


def _finish(
    rt: Runtime, email_id: str, status: SendStatus, reason: str | None, detail: str | None
) -> SendStatus:
    _cas(
        rt,
        email_id,
        SendStatus.SENDING,
        status=status,
        reason=reason,
        detail=detail,
        lease_until=None,
        finished_at=rt.clock.now(),
    )
    log.info("system email %s id=%s reason=%s", status.value, email_id, reason)
    return status
