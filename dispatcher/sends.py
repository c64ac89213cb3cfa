"""Producer side of SmartPlan sends: validate, store once per idempotency key, enqueue."""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dispatcher import validation
from dispatcher.delivery.message import message_id_for
from dispatcher.delivery.rendering import MessageTemplate
from dispatcher.delivery.templates import load_template
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.models import Send, SendKind, SendStatus, User
from dispatcher.ports import DeferredToOutbox, TaskQueue
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: The longest idempotency key the ``sends`` table stores; a longer one is stored as its hash.
KEY_MAX = validation.column_length(Send.idempotency_key)


@dataclass(frozen=True)
class SendRequest:
    """One SmartPlan email to one contact, as a producer describes it."""

    user_id: str
    contact_id: str
    contact_email: str
    smartplan_id: str
    run_id: str
    step_id: str
    subject: str | None = None
    html: str | None = None
    text: str | None = None
    template: str | None = None
    merge_fields: dict[str, Any] = field(default_factory=dict)
    from_name: str | None = None
    reply_to: str | None = None

    @property
    def idempotency_key(self) -> str:
        # Length-prefixed parts: no two different tuples can produce the same key. Five ids of
        # up to 128 characters can make a key longer than its column: such a key is stored as
        # its SHA-256 (every key that fits keeps its form, so keys stored before stay valid;
        # no composed key starts with "smartplan#").
        parts = (
            "smartplan",
            self.user_id,
            self.smartplan_id,
            self.run_id,
            self.step_id,
            self.contact_id,
        )
        key = "|".join(f"{len(p)}:{p}" for p in parts)
        if len(key) <= KEY_MAX:
            return key
        return "smartplan#sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SubmitResult:
    send_id: str
    created: bool  # false when the same run+step+contact was already submitted


@dataclass(frozen=True)
class SendView:
    id: str
    user_id: str
    contact_id: str
    status: str
    reason: str | None
    detail: str | None
    message_id: str
    smartplan: dict[str, str | None]
    attempts: int
    created_at: datetime
    finished_at: datetime | None


def validate(rt: Runtime, req: SendRequest) -> tuple[MessageTemplate, dict[str, Any]]:
    """Check everything a producer sent; raise :class:`InvalidInput` naming every bad field
    (the first in ``field``)."""
    found = validation.Findings()
    found.check(validation.identifier, "user_id", req.user_id)
    found.check(validation.identifier, "contact.id", req.contact_id)
    found.check(validation.address, "contact.email", req.contact_email)
    found.check(validation.identifier, "smartplan.plan_id", req.smartplan_id)
    found.check(validation.identifier, "smartplan.run_id", req.run_id)
    found.check(validation.identifier, "smartplan.step_id", req.step_id)
    merge = found.check(validation.merge_fields, "contact.fields", req.merge_fields)
    if req.from_name is not None:
        found.check(validation.header_text, "from_name", req.from_name, max_len=validation.NAME_MAX)
    if req.reply_to is not None:
        found.check(validation.address, "reply_to", req.reply_to)
    tpl = found.check(_message, rt, req)
    found.done()
    assert tpl is not None and merge is not None  # done() raised otherwise
    return tpl, merge


def _message(rt: Runtime, req: SendRequest) -> MessageTemplate:
    """The message a request gives (its parts or a stored template), checked."""
    limit = rt.settings.max_message_bytes
    if req.template is not None:
        if any(v is not None for v in (req.subject, req.html, req.text)):
            raise InvalidInput("template", "give either a stored template or a message, not both")
        tpl = load_template(rt.settings.templates_dir, req.template)
    else:
        if req.subject is None and req.html is None:
            raise InvalidInput("message", "a message (subject and html) or a template is required")
        found = validation.Findings()
        subject = found.check(validation.header_text, "message.subject", req.subject)
        html = found.check(validation.body, "message.html", req.html, max_bytes=limit)
        text = found.check(
            validation.body, "message.text", req.text, max_bytes=limit, required=False
        )
        found.done()
        tpl = MessageTemplate(subject=subject or "", html=html or "", text=text)
    total = sum(len((p or "").encode()) for p in (tpl.subject, tpl.html, tpl.text))
    if total > limit:
        raise InvalidInput("message", f"is {total} bytes in all; the limit is {limit}")
    tpl.check("message")
    return tpl


def submit_send(rt: Runtime, queue: TaskQueue, req: SendRequest) -> SubmitResult:
    """Store the send once per idempotency key and enqueue it after the commit.

    The same SmartPlan run + step + contact again returns the first send's id and enqueues
    nothing (unless the broker never took the first one). Invalid input raises
    :class:`InvalidInput` with nothing stored.
    """
    tpl, merge = validate(rt, req)
    key = req.idempotency_key
    with rt.sessions() as session:
        existing = session.execute(
            select(Send.id, Send.enqueued_at).where(Send.idempotency_key == key)
        ).first()
        if existing is None:
            send_id = _insert(rt, session, req, tpl, merge)
    # Enqueue outside the transaction: the task may run before this function returns.
    if existing is not None:
        if existing.enqueued_at is None:
            # The first request stored it but the broker never took it: enqueue it now.
            enqueue(rt, queue, existing.id)
        return SubmitResult(existing.id, created=False)
    if send_id is None:
        return submit_send(rt, queue, req)  # a concurrent request inserted it first
    enqueue(rt, queue, send_id)
    log.info(
        "send queued id=%s user=%s run=%s step=%s", send_id, req.user_id, req.run_id, req.step_id
    )
    return SubmitResult(send_id, created=True)


def _insert(
    rt: Runtime, session: Session, req: SendRequest, tpl: MessageTemplate, merge: dict[str, Any]
) -> str | None:
    """Insert and commit the send row; None when a concurrent insert of the key won."""
    if session.get(User, req.user_id) is None:
        raise NotFound("user", req.user_id)
    now = rt.clock.now()
    send = Send(
        id=str(uuid.uuid4()),
        idempotency_key=req.idempotency_key,
        kind=SendKind.SMARTPLAN,
        user_id=req.user_id,
        contact_id=req.contact_id,
        contact_email=req.contact_email.strip(),
        merge_fields=merge,
        smartplan_id=req.smartplan_id,
        run_id=req.run_id,
        step_id=req.step_id,
        subject=tpl.subject,
        html=tpl.html,
        text=tpl.text,
        from_name=req.from_name,
        reply_to=req.reply_to,
        status=SendStatus.QUEUED,
        message_id=message_id_for(req.idempotency_key, rt.settings.message_id_domain),
        attempts=0,
        outcome_published=False,
        created_at=now,
        updated_at=now,
    )
    session.add(send)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return send.id


def enqueue(rt: Runtime, queue: TaskQueue, send_id: str) -> None:
    """Hand the send to the broker, then remember that it was (a repeat then enqueues nothing).

    If the broker fails, :class:`~dispatcher.errors.QueueUnavailable` propagates and the send
    stays stored with no ``enqueued_at``, so the producer's retry of the same request enqueues
    it. A task enqueued twice is harmless: delivery is idempotent.
    """
    try:
        queue.enqueue_send(send_id)
    except DeferredToOutbox:
        return  # the outbox sweep enqueues it
    with rt.sessions.begin() as session:
        session.execute(update(Send).where(Send.id == send_id).values(enqueued_at=rt.clock.now()))


def get_send(rt: Runtime, send_id: str, user_id: str | None = None) -> SendView:
    """A send's status and outcome; with ``user_id``, only that user's sends are visible."""
    with rt.sessions() as session:
        send = session.get(Send, send_id)
        if send is None or (user_id is not None and send.user_id != user_id):
            raise NotFound("send", send_id)
        return SendView(
            id=send.id,
            user_id=send.user_id,
            contact_id=send.contact_id,
            status=send.status.value,
            reason=send.reason,
            detail=send.detail,
            message_id=send.message_id,
            smartplan={
                "plan_id": send.smartplan_id,
                "run_id": send.run_id,
                "step_id": send.step_id,
            },
            attempts=send.attempts,
            created_at=send.created_at,
            finished_at=send.finished_at,
        )
