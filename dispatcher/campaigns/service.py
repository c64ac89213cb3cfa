"""Campaigns: one email to many contacts, through Command Email (credits reserved for all
recipients at once, fanned out in chunks) or the agent's MailChimp account (rule R11)."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Table, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dispatcher import validation
from dispatcher.credits import notices
from dispatcher.credits.periods import period_by_id
from dispatcher.credits.quota import GrantRef
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import suppression
from dispatcher.delivery.message import message_id_for
from dispatcher.delivery.rendering import MessageTemplate, check_merge_fields
from dispatcher.errors import DispatcherError, InvalidInput, NotFound, QueueUnavailable
from dispatcher.models import (
    Campaign,
    CampaignStatus,
    Provider,
    Send,
    SendKind,
    SendStatus,
    User,
)
from dispatcher.ports import DeferredToOutbox, TaskQueue
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

SEND_TABLE = cast(Table, Send.__table__)

#: Campaign send statuses that still have work to do.
OPEN_STATUSES = (SendStatus.QUEUED, SendStatus.RESERVED, SendStatus.SENDING)


class InsufficientCredits(DispatcherError):
    """A Command Email campaign needs more credits than the user has: refused whole."""

    def __init__(self, needed: int, remaining: int, total: int) -> None:
        super().__init__(
            f"the campaign needs {needed:,} credits but only {remaining:,} of {total:,} remain "
            "this month; nothing was sent or charged"
        )
        self.needed = needed
        self.remaining = remaining
        self.total = total


class CampaignStateError(DispatcherError):
    """The campaign cannot go from its status to the one asked for."""

    def __init__(self, campaign_id: str, status: str, action: str) -> None:
        super().__init__(f"campaign {campaign_id} is {status}; it cannot {action}")
        self.status = status
        self.action = action


@dataclass(frozen=True)
class Recipient:
    contact_id: str
    email: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CampaignRequest:
    user_id: str
    provider: str
    subject: str
    html: str
    recipients: Sequence[Recipient]
    text: str | None = None
    from_name: str | None = None
    reply_to: str | None = None
    name: str | None = None
    #: The producer's key for this request: repeating the request with it (say after a
    #: timeout) answers with the campaign the first one created instead of a second campaign.
    idempotency_key: str | None = None


@dataclass(frozen=True)
class CampaignView:
    id: str
    user_id: str
    provider: str
    status: str
    name: str | None
    recipients: int
    invalid: list[dict[str, Any]]
    suppressed: list[dict[str, Any]]
    counts: dict[str, int]
    failed_by_reason: dict[str, int]
    done: int
    progress: float  # share of valid recipients with a terminal outcome, 0..1
    detail: str | None
    created_at: datetime
    finished_at: datetime | None
    #: True when this answers a repeated request (same idempotency key): nothing new was made.
    replayed: bool = False


class RequestKeyReused(DispatcherError):
    """An idempotency key already created a campaign from a different request."""

    def __init__(self, key: str, campaign_id: str) -> None:
        super().__init__(
            f"idempotency_key {key!r} already created campaign {campaign_id} from a different "
            "request; use a new key for a new campaign"
        )
        self.field = "idempotency_key"
        self.campaign_id = campaign_id


class RequestInProgress(DispatcherError):
    """The request with this idempotency key is still being accepted; repeat it shortly."""

    def __init__(self, key: str, campaign_id: str) -> None:
        super().__init__(
            f"the request with idempotency_key {key!r} (campaign {campaign_id}) is still being "
            "accepted; repeat it in a few seconds"
        )
        self.campaign_id = campaign_id


def campaign_key(campaign_id: str) -> str:
    """The idempotency key of a campaign's bulk credit reservation."""
    return f"campaign|{campaign_id}"


def recipient_key(campaign_id: str, contact_id: str) -> str:
    """The idempotency key of one recipient's send: campaign + contact."""
    return f"campaign|{len(campaign_id)}:{campaign_id}|{len(contact_id)}:{contact_id}"


def _check_recipients(
    rt: Runtime, recipients: Sequence[Recipient]
) -> tuple[list[Recipient], list[dict[str, Any]]]:
    """Split recipients into valid ones and a report of the invalid ones (never charged)."""
    if not recipients:
        raise InvalidInput("recipients", "must list at least one contact")
    limit = rt.settings.max_campaign_recipients
    if len(recipients) > limit:
        raise InvalidInput("recipients", f"lists {len(recipients):,}; the limit is {limit:,}")
    valid: list[Recipient] = []
    invalid: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, r in enumerate(recipients):
        where = f"recipients[{i}]"
        try:
            contact_id = validation.identifier(f"{where}.id", r.contact_id)
            email = validation.address(f"{where}.email", r.email)
            fields = check_merge_fields(f"{where}.fields", r.fields)
            if contact_id in seen:
                raise InvalidInput(f"{where}.id", f"contact {contact_id!r} is listed twice")
        except InvalidInput as exc:
            invalid.append(
                {
                    "index": i,
                    "contact_id": str(r.contact_id)[:128],
                    "email": str(r.email)[:254],
                    "field": exc.field,
                    "reason": exc.problem,
                }
            )
            continue
        seen.add(contact_id)
        valid.append(Recipient(contact_id, email, fields))
    return valid, invalid


def create(
    rt: Runtime, req: CampaignRequest, *, _repeated: bool = False
) -> tuple[CampaignView, list[int]]:
    """Validate, store and (for Command Email) reserve credits for a campaign, all or nothing.

    Returns the campaign and the chunks to enqueue. Invalid recipients are reported, never sent
    and never charged; a Command Email campaign larger than the balance raises
    :class:`InsufficientCredits` and leaves nothing behind.
    """
    try:
        provider = Provider(req.provider)
    except ValueError:
        raise InvalidInput("provider", "must be command_email or mailchimp") from None
    tpl = MessageTemplate(
        subject=validation.header_text("message.subject", req.subject),
        html=validation.body("message.html", req.html, max_bytes=rt.settings.max_message_bytes)
        or "",
        text=validation.body(
            "message.text", req.text, max_bytes=rt.settings.max_message_bytes, required=False
        ),
    )
    tpl.check("message")
    request_key = None
    if req.idempotency_key is not None:
        request_key = validation.identifier("idempotency_key", req.idempotency_key)
    if req.from_name is not None:
        validation.header_text("from_name", req.from_name, max_len=200)
    if req.reply_to is not None:
        validation.address("reply_to", req.reply_to)
    if req.name is not None:
        validation.header_text("name", req.name, max_len=200)
    valid, invalid = _check_recipients(rt, req.recipients)
    if not valid:
        raise InvalidInput("recipients", f"none of the {len(invalid)} recipients is valid")
    digest = None
    if request_key is not None:
        # Of the request as validated: a contact id sent as 5 or "5" is the same request.
        digest = request_digest(req, tpl, valid, invalid)
        earlier = _replay(rt, req.user_id, request_key, digest)
        if earlier is not None:
            return earlier, []
    now = rt.clock.now()
    with rt.sessions() as session:
        user = session.get(User, req.user_id)
        if user is None:
            raise NotFound("user", req.user_id)
        # The suppression list is checked before any credit is reserved: reported, not charged.
        blocked = suppression.active(session, req.user_id, (r.email for r in valid), now)
        if provider is Provider.MAILCHIMP and not (
            user.mailchimp_api_key and user.mailchimp_list_id
        ):
            raise InvalidInput(
                "provider",
                "the user has no connected MailChimp account "
                "(PUT /v1/users/{id} with mailchimp.api_key and list_id)",
            )
    skipped: list[dict[str, Any]] = []
    if blocked:
        kept: list[Recipient] = []
        for r in valid:
            why = blocked.get(suppression.normalize(r.email))
            if why is None:
                kept.append(r)
            else:
                skipped.append({"contact_id": r.contact_id, "email": r.email, "reason": why.value})
        valid = kept
        if not valid:
            raise InvalidInput(
                "recipients", f"all {len(skipped)} valid recipients are on the suppression list"
            )
    grant: GrantRef | None = None
    if provider is Provider.COMMAND_EMAIL:
        _, grant = ensure_current(rt, req.user_id)
        rt.quota.ensure(grant)
    campaign_id = str(uuid.uuid4())
    size = rt.settings.campaign_chunk_size
    chunks = (len(valid) + size - 1) // size
    # 1. Store the campaign and its recipients, claimed against the grant (a Redis rebuild
    #    meanwhile counts them as in flight: it can only under-grant).
    try:
        with rt.sessions.begin() as session:
            session.add(
                Campaign(
                    id=campaign_id,
                    user_id=req.user_id,
                    provider=provider,
                    status=CampaignStatus.RESERVING if grant else CampaignStatus.RUNNING,
                    name=req.name,
                    subject=tpl.subject,
                    html=tpl.html,
                    text=tpl.text,
                    from_name=req.from_name,
                    reply_to=req.reply_to,
                    recipients=len(valid),
                    invalid=invalid,
                    suppressed=skipped,
                    chunks=chunks,
                    period=grant.period if grant else None,
                    grant_seq=grant.seq if grant else None,
                    idempotency_key=request_key,
                    request_digest=digest,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            _insert_sends(session, rt, campaign_id, req.user_id, valid, grant, size, now)
    except IntegrityError:
        if request_key is None or digest is None:
            raise
        # The same key's request ran alongside this one and stored its campaign first.
        earlier = _replay(rt, req.user_id, request_key, digest)
        if earlier is None and not _repeated:
            # ...and has removed it since (refused for credits): this request goes ahead, once.
            return create(rt, req, _repeated=True)
        if earlier is None:
            raise
        return earlier, []
    # 2. Reserve every valid recipient's credit in one atomic step.
    if grant is not None:
        reservation = rt.quota.reserve(grant, campaign_key(campaign_id), len(valid))
        if not reservation.granted:
            with rt.sessions.begin() as session:
                # Leave nothing behind, unless the sweep already failed and settled it (this
                # request took far too long): then its rows are history with timeline events.
                still_ours = session.execute(
                    update(Campaign)
                    .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RESERVING)
                    .values(updated_at=now)
                )
                if cast(CursorResult[Any], still_ours).rowcount == 1:
                    session.execute(delete(Send).where(Send.campaign_id == campaign_id))
                    session.execute(delete(Campaign).where(Campaign.id == campaign_id))
            raise InsufficientCredits(len(valid), reservation.remaining, reservation.total)
        notices.after_reservation(rt, grant, reservation)
        with rt.sessions.begin() as session:
            started = session.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RESERVING)
                .values(status=CampaignStatus.RUNNING, updated_at=now)
            )
            if cast(CursorResult[Any], started).rowcount == 1:
                session.execute(
                    update(Send)
                    .where(Send.campaign_id == campaign_id, Send.status == SendStatus.QUEUED)
                    .values(status=SendStatus.RESERVED, updated_at=now)
                )
        if cast(CursorResult[Any], started).rowcount != 1:
            # The sweep gave up on this campaign (this request took far too long): it was
            # failed and its recipients settled; this reservation goes back too, part by
            # part (the sweep may have given some back already; never twice), flagged first
            # so that a Redis error here leaves the refunds to the refund sweep.
            from dispatcher.credits import refunds

            with rt.sessions.begin() as session:
                owed = session.scalars(
                    update(Send)
                    .where(Send.campaign_id == campaign_id, Send.status == SendStatus.FAILED)
                    .values(refund_due=True)
                    .returning(Send.id)
                ).all()
            refunds.give_back(rt, list(owed))
            raise CampaignStateError(campaign_id, CampaignStatus.FAILED.value, "start")
    log.info(
        "campaign created id=%s user=%s provider=%s recipients=%d invalid=%d suppressed=%d "
        "chunks=%d",
        campaign_id,
        req.user_id,
        provider.value,
        len(valid),
        len(invalid),
        len(skipped),
        chunks,
    )
    # A MailChimp campaign is one job: MailChimp sends it whole.
    work = [0] if provider is Provider.MAILCHIMP else list(range(chunks))
    return view(rt, campaign_id), work


def request_digest(
    req: CampaignRequest,
    tpl: MessageTemplate,
    valid: Sequence[Recipient],
    invalid: Sequence[dict[str, Any]],
) -> str:
    """A digest of everything a validated campaign request asks for (recipients in order)."""
    body = [
        req.user_id,
        req.provider,
        [tpl.subject, tpl.html, tpl.text],
        [req.from_name, req.reply_to, req.name],
        [[r.contact_id, r.email, r.fields] for r in valid],
        list(invalid),
    ]
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _replay(rt: Runtime, user_id: str, key: str, digest: str) -> CampaignView | None:
    """The campaign an earlier request with this key created, if any; raises
    :class:`RequestKeyReused` when that request asked for something else."""
    with rt.sessions() as session:
        found = session.execute(
            select(Campaign.id, Campaign.request_digest, Campaign.status).where(
                Campaign.user_id == user_id, Campaign.idempotency_key == key
            )
        ).first()
    if found is None:
        return None
    if found.request_digest != digest:
        raise RequestKeyReused(key, found.id)
    if found.status is CampaignStatus.RESERVING:
        # The first request is still taking its credits (and may yet be refused).
        raise RequestInProgress(key, found.id)
    log.info("campaign request repeated id=%s user=%s", found.id, user_id)
    return replace(view(rt, found.id), replayed=True)


def _insert_sends(
    session: Session,
    rt: Runtime,
    campaign_id: str,
    user_id: str,
    valid: list[Recipient],
    grant: GrantRef | None,
    size: int,
    now: datetime,
) -> None:
    domain = rt.settings.message_id_domain
    rows = []
    for i, r in enumerate(valid):
        key = recipient_key(campaign_id, r.contact_id)
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "idempotency_key": key,
                "kind": SendKind.CAMPAIGN,
                "user_id": user_id,
                "contact_id": r.contact_id,
                "contact_email": r.email,
                "merge_fields": r.fields,
                "campaign_id": campaign_id,
                "chunk": i // size,
                # The message lives on the campaign row, not on 100,000 send rows.
                "subject": "",
                "html": "",
                "status": SendStatus.QUEUED,
                "period": grant.period if grant else None,
                "grant_seq": grant.seq if grant else None,
                "message_id": message_id_for(key, domain),
                "attempts": 0,
                "outcome_published": True,
                "created_at": now,
                "updated_at": now,
            }
        )
    for start in range(0, len(rows), 2000):
        # Core executemany: the ORM bulk path costs several times the INSERT itself.
        session.connection().execute(insert(SEND_TABLE), rows[start : start + 2000])


def enqueue(
    rt: Runtime, campaign_id: str, chunks: Sequence[int], queue: TaskQueue | None = None
) -> None:
    """Hand a campaign's chunks (or its MailChimp job) to the workers, after the commit."""
    try:
        for chunk in chunks:
            (queue or rt.queue).enqueue_campaign_chunk(campaign_id, chunk)
    except DeferredToOutbox:
        return  # the outbox sweep enqueues it
    except QueueUnavailable as exc:
        log.warning("campaign %s left for the outbox sweep: %s", campaign_id, exc.detail)
        return
    with rt.sessions.begin() as session:
        session.execute(
            update(Campaign).where(Campaign.id == campaign_id).values(enqueued_at=rt.clock.now())
        )


def view(rt: Runtime, campaign_id: str, user_id: str | None = None) -> CampaignView:
    """Status, counts by outcome and progress of a campaign."""
    with rt.sessions() as session:
        c = session.get(Campaign, campaign_id)
        if c is None or (user_id is not None and c.user_id != user_id):
            raise NotFound("campaign", campaign_id)
        rows = session.execute(
            select(Send.status, Send.reason, func.count())
            .where(Send.campaign_id == campaign_id)
            .group_by(Send.status, Send.reason)
        ).all()
    counts = {s.value: 0 for s in SendStatus}
    failed: dict[str, int] = {}
    for status, reason, n in rows:
        counts[status.value] += n
        if status is SendStatus.FAILED:
            failed[reason or "unknown"] = failed.get(reason or "unknown", 0) + n
    done = counts["sent"] + counts["failed"] + counts["unknown"]
    return CampaignView(
        id=c.id,
        user_id=c.user_id,
        provider=c.provider.value,
        status=c.status.value,
        name=c.name,
        recipients=c.recipients,
        invalid=list(c.invalid),
        suppressed=list(c.suppressed or []),
        counts=counts,
        failed_by_reason=failed,
        done=done,
        progress=round(done / c.recipients, 4) if c.recipients else 1.0,
        detail=c.detail,
        created_at=c.created_at,
        finished_at=c.finished_at,
    )


def _transition(
    rt: Runtime,
    campaign_id: str,
    allowed: tuple[CampaignStatus, ...],
    to: CampaignStatus,
    action: str,
    user_id: str | None,
) -> Campaign:
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        c = session.get(Campaign, campaign_id)
        if c is None or (user_id is not None and c.user_id != user_id):
            raise NotFound("campaign", campaign_id)
        result = session.execute(
            update(Campaign)
            .where(
                Campaign.id == campaign_id,
                Campaign.status.in_(allowed),
                # Not while a MailChimp job talks to MailChimp: it may be sending right now;
                # nor once MailChimp was asked to send: it may have gone out.
                or_(Campaign.lease_until.is_(None), Campaign.lease_until <= now),
                Campaign.send_attempted_at.is_(None),
            )
            .values(status=to, updated_at=now, finished_at=now if to.terminal else None)
        )
        if cast(CursorResult[Any], result).rowcount != 1:
            session.refresh(c)
            if c.status in allowed and c.send_attempted_at is not None:
                action += " (MailChimp may have sent it)"
            elif c.status in allowed and c.lease_until is not None:
                action += " while its MailChimp job runs (try again once it has finished)"
            raise CampaignStateError(campaign_id, c.status.value, action)
        session.refresh(c)
        session.expunge(c)
        return c


def pause(rt: Runtime, campaign_id: str, user_id: str | None = None) -> CampaignView:
    """Stop handing out recipients; those in flight finish. Nothing is sent twice on resume."""
    current = view(rt, campaign_id, user_id)
    if current.provider == Provider.MAILCHIMP.value:
        raise CampaignStateError(campaign_id, current.status, "pause (MailChimp sends it whole)")
    _transition(rt, campaign_id, (CampaignStatus.RUNNING,), CampaignStatus.PAUSED, "pause", user_id)
    log.info("campaign paused id=%s", campaign_id)
    return view(rt, campaign_id)


def resume(
    rt: Runtime, campaign_id: str, user_id: str | None = None, queue: TaskQueue | None = None
) -> CampaignView:
    """Hand out the recipients not yet sent again."""
    _transition(
        rt, campaign_id, (CampaignStatus.PAUSED,), CampaignStatus.RUNNING, "resume", user_id
    )
    chunks = open_chunks(rt, campaign_id)
    with rt.sessions.begin() as session:  # until the broker takes them, the sweep will
        session.execute(update(Campaign).where(Campaign.id == campaign_id).values(enqueued_at=None))
    enqueue(rt, campaign_id, chunks, queue)
    log.info("campaign resumed id=%s chunks=%d", campaign_id, len(chunks))
    if not chunks:
        # Nothing was left open (paused after its last batch): it is done.
        from dispatcher.campaigns.chunks import complete_if_done

        complete_if_done(rt, campaign_id)
    return view(rt, campaign_id)


def cancel(rt: Runtime, campaign_id: str, user_id: str | None = None) -> CampaignView:
    """Stop for good: recipients not yet handed out fail as cancelled and their credits come
    back; those in flight finish. A MailChimp campaign MailChimp was already asked to send
    cannot be cancelled (it may have gone out; its job records what happened)."""
    c = _transition(
        rt,
        campaign_id,
        (CampaignStatus.RUNNING, CampaignStatus.PAUSED),
        CampaignStatus.CANCELLED,
        "cancel",
        user_id,
    )
    from dispatcher.campaigns.chunks import settle

    with rt.sessions.begin() as session:
        ids = list(
            session.scalars(
                select(Send.id).where(
                    Send.campaign_id == campaign_id,
                    Send.status.in_((SendStatus.QUEUED, SendStatus.RESERVED)),
                )
            ).all()
        )
    settle(
        rt,
        c,
        [
            (
                i,
                SendStatus.FAILED,
                "campaign_cancelled",
                "the campaign was cancelled before this email was sent",
                None,
                True,
            )
            for i in ids
        ],
        expect=(SendStatus.QUEUED, SendStatus.RESERVED),
    )
    log.info("campaign cancelled id=%s unsent=%d", campaign_id, len(ids))
    return view(rt, campaign_id)


#: A campaign still ``reserving`` after this long lost the request that created it.
RESERVING_GRACE = timedelta(minutes=10)


NOT_STARTED = "campaign_not_started"


def expire_reserving(rt: Runtime, limit: int = 100) -> int:
    """Fail campaigns whose creating request died between storing the recipients and starting
    (still ``reserving`` after :data:`RESERVING_GRACE`): their recipients fail as
    ``campaign_not_started`` and any credits reserved for them come back. Fenced: the request
    starts the campaign only with a compare-and-set from ``reserving``, so exactly one wins.
    Failed campaigns that still have open recipients (this sweep died between the two steps)
    are settled too. Returns how many campaigns were failed."""
    now = rt.clock.now()
    cutoff = now - RESERVING_GRACE
    with rt.sessions() as session:
        stuck = session.scalars(
            select(Campaign.id)
            .where(Campaign.status == CampaignStatus.RESERVING, Campaign.updated_at < cutoff)
            .limit(limit)
        ).all()
    failed = 0
    for campaign_id in stuck:
        with rt.sessions.begin() as session:
            won = session.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RESERVING)
                .values(
                    status=CampaignStatus.FAILED,
                    detail="the request that created this campaign did not finish; "
                    "nothing was sent and no credit is kept",
                    finished_at=now,
                    updated_at=now,
                )
            )
        if cast(CursorResult[Any], won).rowcount == 1:
            failed += 1
    with rt.sessions() as session:
        unsettled = session.scalars(
            select(Campaign)
            .where(
                Campaign.status == CampaignStatus.FAILED,
                Campaign.provider == Provider.COMMAND_EMAIL,
                select(Send.id)
                .where(Send.campaign_id == Campaign.id, Send.status.in_(OPEN_STATUSES))
                .exists(),
            )
            .limit(limit)
        ).all()
        session.expunge_all()
    for c in unsettled:
        _settle_not_started(rt, c)
    return failed


def _settle_not_started(rt: Runtime, c: Campaign) -> None:
    from dispatcher.campaigns.chunks import settle

    with rt.sessions() as session:
        ids = list(
            session.scalars(
                select(Send.id).where(Send.campaign_id == c.id, Send.status.in_(OPEN_STATUSES))
            ).all()
        )
    detail = "the campaign could not be started; nothing was sent"
    settle(
        rt,
        c,
        [(i, SendStatus.FAILED, NOT_STARTED, detail, None, True) for i in ids],
        expect=OPEN_STATUSES,
    )
    log.warning("campaign %s never started: failed, %d recipients settled", c.id, len(ids))


def open_chunks(rt: Runtime, campaign_id: str) -> list[int]:
    """The work items of a campaign still to do: its chunks with recipients left to send, or
    for a MailChimp campaign its one job (MailChimp sends it whole; enqueueing it once per
    chunk would run the whole campaign that many times)."""
    with rt.sessions() as session:
        provider = session.scalar(select(Campaign.provider).where(Campaign.id == campaign_id))
        if provider is Provider.MAILCHIMP:
            has_open = session.scalar(
                select(Send.id)
                .where(Send.campaign_id == campaign_id, Send.status.in_(OPEN_STATUSES))
                .limit(1)
            )
            return [0] if has_open is not None else []
        found = session.scalars(
            select(Send.chunk)
            .where(Send.campaign_id == campaign_id, Send.status.in_(OPEN_STATUSES))
            .distinct()
        ).all()
    return sorted(c for c in found if c is not None)


def grant_of(rt: Runtime, c: Campaign) -> GrantRef | None:
    """The grant a Command Email campaign's credits were reserved from."""
    if c.period is None or c.grant_seq is None:
        return None
    with rt.sessions() as session:
        tz = session.scalar(select(User.timezone).where(User.id == c.user_id)) or "UTC"
    return GrantRef.of(c.user_id, period_by_id(c.period, tz), c.grant_seq)
