"""Producer side of SmartPlan sends: validate, store once per idempotency key, enqueue."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Table,
    and_,
    any_,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from dispatcher import metrics, validation
from dispatcher.delivery import identity
from dispatcher.delivery.message import message_id_for
from dispatcher.delivery.rendering import MessageTemplate
from dispatcher.delivery.templates import load_template
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.groupcommit import GroupCommit
from dispatcher.models import Send, SendKind, SendStatus, User
from dispatcher.ports import DeferredToOutbox, TaskQueue
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

SEND_TABLE = cast(Table, Send.__table__)
USER_TABLE = cast(Table, User.__table__)

#: The most sends one batch may carry.
BATCH_MAX = 1000

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
    #: The send's status when it was submitted (a repeat's may have moved on since).
    status: str = SendStatus.QUEUED.value


#: One request's answer in a batch: accepted (new or a repeat), or refused with nothing stored.
Outcome = SubmitResult | InvalidInput | NotFound

#: Each distinct message (subject, html, text, template name) already checked: its template,
#: or the refusal it got.
MessageCache = dict[tuple[str | None, ...], MessageTemplate | InvalidInput]


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


def validate(
    rt: Runtime, req: SendRequest, messages: MessageCache | None = None
) -> tuple[SendRequest, MessageTemplate, dict[str, Any]]:
    """Check everything a producer sent; raise :class:`InvalidInput` naming every bad field
    (the first in ``field``). ``messages`` keeps each distinct message's check for the next
    request that carries the same one (a batch's steps mostly do). Returns the request with
    its addresses as stored (stripped, an internationalised domain in punycode)."""
    found = validation.Findings()
    found.check(validation.identifier, "user_id", req.user_id)
    found.check(validation.identifier, "contact.id", req.contact_id)
    email = found.check(validation.address, "contact.email", req.contact_email, utf8_local=True)
    found.check(validation.identifier, "smartplan.plan_id", req.smartplan_id)
    found.check(validation.identifier, "smartplan.run_id", req.run_id)
    found.check(validation.identifier, "smartplan.step_id", req.step_id)
    merge = found.check(validation.merge_fields, "contact.fields", req.merge_fields)
    if req.from_name is not None:
        found.check(validation.header_text, "from_name", req.from_name, max_len=validation.NAME_MAX)
    reply_to = None
    if req.reply_to is not None:
        reply_to = found.check(validation.address, "reply_to", req.reply_to)
    tpl = found.check(_checked_message, rt, req, messages)
    found.done()
    assert tpl is not None and merge is not None and email is not None  # done() raised otherwise
    if email != req.contact_email or reply_to != req.reply_to:
        req = replace(req, contact_email=email, reply_to=reply_to)
    return req, tpl, merge


def _checked_message(rt: Runtime, req: SendRequest, cache: MessageCache | None) -> MessageTemplate:
    """:func:`_message`, compiled once per distinct message when a cache is given."""
    if cache is None:
        return _message(rt, req)
    parts = (req.subject, req.html, req.text, req.template)
    known = cache.get(parts)
    if known is None:
        try:
            known = _message(rt, req)
        except InvalidInput as exc:
            known = exc
        cache[parts] = known
    if isinstance(known, InvalidInput):
        # A fresh refusal each time: raising one instance again would grow its traceback.
        raise InvalidInput(known.field, known.problem, others=known.others)
    return known


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


@dataclass(frozen=True)
class _Checked:
    """A request that passed validation, with what storing it takes."""

    req: SendRequest
    key: str
    tpl: MessageTemplate
    merge: dict[str, Any]


def submit_send(
    rt: Runtime, queue: TaskQueue, req: SendRequest, together: Submissions | None = None
) -> SubmitResult:
    """Store the send once per idempotency key and enqueue it after the commit.

    The same SmartPlan run + step + contact again returns the first send's id and enqueues
    nothing (unless the broker never took the first one). Invalid input raises
    :class:`InvalidInput`, an unknown user :class:`NotFound`, with nothing stored. With
    ``together``, the send is stored and enqueued with the sends other threads submit through
    it at the same moment (see :class:`Submissions`); alone otherwise.
    """
    req, tpl, merge = validate(rt, req)
    item = _Checked(req, req.idempotency_key, tpl, merge)
    if together is None:
        (result,) = _submit(rt, queue, [item])
    else:
        result = together.submit(item)
    if isinstance(result, NotFound):
        raise result
    if result.created:
        log.info(
            "send queued id=%s user=%s run=%s step=%s",
            result.send_id,
            req.user_id,
            req.run_id,
            req.step_id,
        )
    return result


class Submissions(GroupCommit[_Checked, SubmitResult | NotFound]):
    """Single sends that a process's threads (the API's request threads) submit at the same
    moment, stored in one transaction and handed to the broker in one publish, as a batch
    submit does: a :class:`~dispatcher.groupcommit.GroupCommit` of up to
    ``SMARTPLAN_BATCH_SIZE`` sends. A lone send goes at once, by itself.

    Each send keeps its own answer: its id (the same for two sends of one key, created once),
    or its user unknown; an outage raises in every thread of the group, each send then stored
    or not as a lone one would be (repeating the request settles it). Sends stored together
    are enqueued together: one task delivers them side by side (see
    :mod:`dispatcher.delivery.smartplan_batch`)."""

    def __init__(self, rt: Runtime, queue: TaskQueue) -> None:
        super().__init__(rt.settings.smartplan_batch_size, partial(_submit_group, rt, queue))


def _submit_group(
    rt: Runtime, queue: TaskQueue, items: Sequence[_Checked]
) -> list[SubmitResult | NotFound]:
    metrics.SUBMIT_GROUP_SENDS.observe(len(items))
    return _submit(rt, queue, items)


def submit_batch(rt: Runtime, queue: TaskQueue, requests: Sequence[SendRequest]) -> list[Outcome]:
    """Submit every request as :func:`submit_send` would, in one go: one answer per request,
    in order: its :class:`SubmitResult`, or the :class:`InvalidInput` or :class:`NotFound`
    that refused it (nothing stored or enqueued for it).

    A request whose key came earlier in the batch is a duplicate of that one. The accepted
    sends are stored in one transaction and enqueued after it; should the broker fail,
    :class:`~dispatcher.errors.QueueUnavailable` propagates with them all stored, and the
    same batch again enqueues them and answers with the same ids.
    """
    messages: MessageCache = {}
    answers: list[Outcome | None] = []
    checked: list[_Checked] = []
    slots: list[int] = []
    for req in requests:
        try:
            req, tpl, merge = validate(rt, req, messages)
        except InvalidInput as exc:
            answers.append(exc)
            continue
        slots.append(len(answers))
        answers.append(None)
        checked.append(_Checked(req, req.idempotency_key, tpl, merge))
    for slot, result in zip(slots, _submit(rt, queue, checked), strict=True):
        answers[slot] = result
    done = [a for a in answers if a is not None]
    created = sum(1 for a in done if isinstance(a, SubmitResult) and a.created)
    log.info(
        "batch of %d sends: %d queued, %d repeated, %d refused",
        len(done),
        created,
        sum(1 for a in done if isinstance(a, SubmitResult)) - created,
        sum(1 for a in done if not isinstance(a, SubmitResult)),
    )
    return done


#: How many keys or user ids one ``IN (...)`` carries at most.
_IN_MAX = 1000

#: How often one send's insert is tried again after losing the race for its key.
_RACE_RETRIES = 3


def _submit(
    rt: Runtime, queue: TaskQueue, items: Sequence[_Checked]
) -> list[SubmitResult | NotFound]:
    """Store what is new, then enqueue it (and whatever was stored before but never taken by
    the broker) outside the transaction: a task may run before this function returns."""
    results, to_enqueue = _store(rt, items)
    enqueue_all(rt, queue, to_enqueue)
    return results


def _store(
    rt: Runtime, items: Sequence[_Checked], retries: int = _RACE_RETRIES
) -> tuple[list[SubmitResult | NotFound], list[str]]:
    """Each item's answer, and the ids to enqueue, with the new sends committed."""
    try:
        # Core on a connection: the ORM's session and unit of work would cost more than the
        # statements themselves, and no object is needed.
        with rt.engine.begin() as conn:
            return _store_in(conn, rt, items)
    except IntegrityError:
        # A concurrent request stored one of these keys after they were looked up. Take the
        # items one at a time: each then finds the send that request stored.
        if len(items) == 1 and retries == 0:
            raise
        results: list[SubmitResult | NotFound] = []
        to_enqueue: list[str] = []
        for item in items:
            done, ids = _store(rt, [item], retries - 1 if len(items) == 1 else retries)
            results += done
            to_enqueue += ids
        return results, list(dict.fromkeys(to_enqueue))


def _store_in(
    conn: Connection, rt: Runtime, items: Sequence[_Checked]
) -> tuple[list[SubmitResult | NotFound], list[str]]:
    """Look every key and every user up in one query, insert the new sends in one statement
    (nothing committed yet)."""
    sends, users_c = SEND_TABLE.c, USER_TABLE.c
    found = {}
    users: dict[str, str] = {}  # user id -> the domain of their Message-IDs
    for start in range(0, len(items), _IN_MAX):
        part = items[start : start + _IN_MAX]
        keys = list(dict.fromkeys(item.key for item in part))
        user_ids = list(dict.fromkeys(item.req.user_id for item in part))
        # Each user that exists, with its sends of these keys (a key names its user): one
        # row per send found, or one row without a send.
        rows = conn.execute(
            select(
                users_c.id.label("user_id"),
                users_c.platform_email,
                users_c.communications_email,
                sends.idempotency_key,
                sends.id,
                sends.status,
                sends.enqueued_at,
            )
            .select_from(
                USER_TABLE.outerjoin(
                    SEND_TABLE,
                    and_(sends.user_id == users_c.id, _among(conn, sends.idempotency_key, keys)),
                )
            )
            .where(_among(conn, users_c.id, user_ids))
        )
        for row in rows:
            # Aligned with the From of the user's mail (the platform's domain, or their own).
            users[row.user_id] = identity.envelope_domain(
                rt.settings, row.platform_email or row.communications_email
            )
            if row.id is not None:
                found[row.idempotency_key] = row
    now = rt.clock.now()
    made: dict[str, str] = {}  # key -> id of the send this call makes
    rows_new: list[dict[str, Any]] = []
    results: list[SubmitResult | NotFound] = []
    to_enqueue: list[str] = []
    for item in items:
        prior = found.get(item.key)
        if prior is not None:
            if prior.enqueued_at is None:
                # Stored by an earlier request but never taken by the broker: enqueue it now.
                to_enqueue.append(prior.id)
            results.append(SubmitResult(prior.id, created=False, status=prior.status.value))
        elif item.key in made:
            results.append(SubmitResult(made[item.key], created=False))
        elif item.req.user_id not in users:
            results.append(NotFound("user", item.req.user_id))
        else:
            send_id = str(uuid.uuid4())
            made[item.key] = send_id
            rows_new.append(_row(item, send_id, now, users[item.req.user_id]))
            to_enqueue.append(send_id)
            results.append(SubmitResult(send_id, created=True))
    if rows_new:
        conn.execute(insert(SEND_TABLE), rows_new)
    return results, list(dict.fromkeys(to_enqueue))


def _among(conn: Connection, column: ColumnElement[str], values: list[str]) -> ColumnElement[bool]:
    """``column`` is one of ``values``."""
    if len(values) == 1:
        return column == values[0]  # every single send: cheaper to build than a list
    if conn.dialect.name == "postgresql":
        # One array parameter: the driver parses a thousand placeholders for longer than the
        # server takes to run the statement.
        return column == any_(bindparam(None, values, type_=ARRAY(String)))
    return column.in_(values)


def _parts(values: list[str]) -> list[list[str]]:
    return [values[i : i + _IN_MAX] for i in range(0, len(values), _IN_MAX)]


def _row(item: _Checked, send_id: str, now: datetime, domain: str) -> dict[str, Any]:
    req, tpl = item.req, item.tpl
    return {
        "id": send_id,
        "idempotency_key": item.key,
        "kind": SendKind.SMARTPLAN,
        "user_id": req.user_id,
        "contact_id": req.contact_id,
        "contact_email": req.contact_email,
        "merge_fields": item.merge,
        "smartplan_id": req.smartplan_id,
        "run_id": req.run_id,
        "step_id": req.step_id,
        "subject": tpl.subject,
        "html": tpl.html,
        "text": tpl.text,
        "from_name": req.from_name,
        "reply_to": req.reply_to,
        "status": SendStatus.QUEUED,
        "message_id": message_id_for(item.key, domain),
        "attempts": 0,
        "outcome_published": False,
        "created_at": now,
        "updated_at": now,
    }


def enqueue(rt: Runtime, queue: TaskQueue, send_id: str) -> None:
    """Hand one send to the broker (see :func:`enqueue_all`)."""
    enqueue_all(rt, queue, [send_id])


def enqueue_all(rt: Runtime, queue: TaskQueue, send_ids: Sequence[str]) -> None:
    """Hand the sends to the broker, then remember that it took them (a repeat then enqueues
    nothing), in one UPDATE.

    If the broker fails, :class:`~dispatcher.errors.QueueUnavailable` propagates and the sends
    stay stored with no ``enqueued_at``, so the producer's retry of the same request enqueues
    them. A task enqueued twice is harmless: delivery is idempotent.
    """
    if not send_ids:
        return
    try:
        if len(send_ids) == 1:
            queue.enqueue_send(send_ids[0])
        else:
            queue.enqueue_sends(send_ids)
    except DeferredToOutbox:
        return  # the outbox sweep enqueues them
    now = rt.clock.now()
    with rt.engine.begin() as conn:
        for part in _parts(list(send_ids)):
            conn.execute(
                update(SEND_TABLE)
                .where(_among(conn, SEND_TABLE.c.id, part))
                .values(enqueued_at=now)
            )


def get_send(rt: Runtime, send_id: str, user_id: str | None = None) -> SendView:
    """A send's status and outcome; with ``user_id``, only that user's sends are visible."""
    with rt.reads() as session:
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
