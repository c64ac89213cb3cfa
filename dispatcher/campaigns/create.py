"""Accepting a campaign: validate every recipient, store the campaign and its recipients, and
(for Command Email) reserve the credits of all of them in one step, all or nothing (rule R11)."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dispatcher import db, validation
from dispatcher.campaigns import control, recipients, sendtime
from dispatcher.campaigns.control import CampaignStateError, CampaignView, view
from dispatcher.campaigns.recipients import Recipient as Recipient
from dispatcher.campaigns.recipients import RecipientRow, Stored
from dispatcher.credits import notices, refunds
from dispatcher.credits.grants import campaign_key
from dispatcher.credits.periods import period_at
from dispatcher.credits.quota import GrantRef, Reservation
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import identity
from dispatcher.delivery.message import message_id_for
from dispatcher.delivery.rendering import MessageTemplate
from dispatcher.errors import DispatcherError, InvalidInput, NotFound
from dispatcher.models import (
    Campaign,
    CampaignExclusion,
    CampaignStatus,
    ExclusionKind,
    Provider,
    Send,
    SendKind,
    SendStatus,
    User,
)
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

SEND_TABLE = cast(Table, Send.__table__)
EXCLUSION_TABLE = cast(Table, CampaignExclusion.__table__)


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


@dataclass(frozen=True)
class CampaignRequest:
    user_id: str
    provider: str
    subject: str
    html: str
    #: Read once, in order (see :mod:`dispatcher.campaigns.recipients`): a list, or the rows
    #: of an HTTP request's body as it is parsed.
    recipients: Iterable[RecipientRow]
    text: str | None = None
    from_name: str | None = None
    reply_to: str | None = None
    name: str | None = None
    #: The producer's key for this request: repeating the request with it (say after a
    #: timeout) answers with the campaign the first one created instead of a second campaign.
    idempotency_key: str | None = None
    #: When to start it (``scheduled`` until then): an instant with its offset, or a local
    #: time read in the agent's zone (see :mod:`dispatcher.campaigns.sendtime`). None: now.
    send_at: str | datetime | None = None


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


def recipient_key(campaign_id: str, contact_id: str) -> str:
    """The idempotency key of one recipient's send: campaign + contact."""
    return f"campaign|{len(campaign_id)}:{campaign_id}|{len(contact_id)}:{contact_id}"


@dataclass(frozen=True)
class _Checked:
    """A campaign request as validated: nothing about it is stored yet."""

    provider: Provider
    template: MessageTemplate
    #: The recipients as read: to send to (packed), invalid and suppressed ones.
    recipients: recipients.Read
    request_key: str | None
    digest: str | None
    #: The reply-to address as stored (stripped, its domain in punycode).
    reply_to: str | None = None
    #: ``send_at`` as given (naive: a local time in the agent's zone), or None.
    send_at: datetime | None = None


def create(
    rt: Runtime, req: CampaignRequest, *, _repeated: bool = False
) -> tuple[CampaignView, list[int]]:
    """Validate, store and (for Command Email) reserve credits for a campaign, all or nothing.

    Returns the campaign and the chunks to enqueue. Invalid recipients are reported, never sent
    and never charged; a Command Email campaign larger than the balance raises
    :class:`InsufficientCredits` and leaves nothing behind.
    """
    checked = _check(rt, req)
    if checked.request_key is not None and checked.digest is not None:
        earlier = _replay(rt, req.user_id, checked.request_key, checked.digest)
        if earlier is not None:
            return earlier, []
    _check_user(rt, req, checked)
    read = checked.recipients
    send_at = None if checked.send_at is None else _send_at(rt, req.user_id, checked.send_at)
    grant: GrantRef | None = None
    if checked.provider is Provider.COMMAND_EMAIL:
        user, grant = ensure_current(rt, req.user_id)
        if send_at is not None and period_at(send_at, user.timezone).id != grant.period:
            # Sent in a later month: that month's grant pays, taken when it starts.
            grant = None
        else:
            rt.quota.ensure(grant)
    campaign_id = str(uuid.uuid4())
    # A large campaign starting now keeps its recipients compactly until a worker writes their
    # sends (see dispatcher.campaigns.compact): the answer does not wait for 100,000 rows.
    compact = grant is not None and send_at is None and is_compact(rt, read.kept)
    # 1. Store the campaign and its recipients, claimed against the grant (a Redis rebuild
    #    meanwhile counts them as pending under the campaign's bulk key, which step 2 takes).
    try:
        chunks = _store(rt, req, checked, campaign_id, grant, send_at, compact)
    except IntegrityError:
        if checked.request_key is None or checked.digest is None:
            raise
        # The same key's request ran alongside this one and stored its campaign first.
        earlier = _replay(rt, req.user_id, checked.request_key, checked.digest)
        if earlier is None and not _repeated:
            # ...and has removed it since (refused for credits): this request goes ahead, once.
            return create(rt, req, _repeated=True)
        if earlier is None:
            raise
        return earlier, []
    # 2. Reserve every valid recipient's credit in one atomic step.
    if grant is not None:
        then = CampaignStatus.RUNNING if send_at is None else CampaignStatus.SCHEDULED
        _reserve_all(rt, campaign_id, grant, read.kept, then, compact)
    log.info(
        "campaign created id=%s user=%s provider=%s recipients=%d invalid=%d suppressed=%d "
        "chunks=%d send_at=%s compact=%s",
        campaign_id,
        req.user_id,
        checked.provider.value,
        read.kept,
        len(read.invalid),
        len(read.skipped),
        chunks,
        send_at.isoformat() if send_at else "now",
        compact,
    )
    if send_at:
        return view(rt, campaign_id), []
    # A compact campaign's first chunk task writes its sends, then hands out the others.
    return view(rt, campaign_id), [0] if compact else work_items(checked.provider, chunks)


def is_compact(rt: Runtime, recipients: int) -> bool:
    """Whether a Command Email campaign of ``recipients`` valid recipients, starting now, is
    accepted compactly (``CAMPAIGN_COMPACT_FROM``)."""
    least = rt.settings.campaign_compact_from
    return 0 < least <= recipients


def work_items(provider: Provider, chunks: int) -> list[int]:
    """The work items of a campaign that starts: its chunks, or for MailChimp its one job
    (MailChimp sends it whole)."""
    return [0] if provider is Provider.MAILCHIMP else list(range(chunks))


def _send_at(rt: Runtime, user_id: str, given: datetime) -> datetime:
    """``send_at`` as an instant, a local time read in the agent's zone."""
    with rt.sessions() as session:
        tz = session.scalar(select(User.timezone).where(User.id == user_id))
    if tz is None:
        raise NotFound("user", user_id)
    return sendtime.resolve(given, tz, rt.clock.now(), rt.settings.schedule_max_days)


def _check(rt: Runtime, req: CampaignRequest) -> _Checked:
    """Validate everything a request asks for; raises :class:`InvalidInput` naming the field."""
    found = validation.Findings()
    provider = found.check(_provider, req.provider)
    subject, html, text = message_fields(rt, found, req.subject, req.html, req.text)
    request_key = None
    if req.idempotency_key is not None:
        request_key = found.check(
            validation.identifier,
            "idempotency_key",
            req.idempotency_key,
            max_len=validation.REQUEST_KEY_MAX,
        )
    if req.from_name is not None:
        found.check(validation.header_text, "from_name", req.from_name, max_len=validation.NAME_MAX)
    reply_to = None
    if req.reply_to is not None:
        reply_to = found.check(validation.address, "reply_to", req.reply_to)
    if req.name is not None:
        found.check(validation.header_text, "name", req.name, max_len=validation.NAME_MAX)
    send_at = None if req.send_at is None else found.check(sendtime.parse, req.send_at)
    found.done()
    assert provider is not None  # done() raised otherwise
    tpl = MessageTemplate(subject=subject or "", html=html or "", text=text)
    tpl.check("message")
    # Of the request as validated: a contact id sent as 5 or "5" is the same request.
    digest = None if request_key is None else _RequestDigest(req, tpl)
    read = recipients.read(
        rt,
        req.user_id,
        req.recipients,
        fields=tpl.unguarded_fields(),
        digest=None if digest is None else digest.recipients,
    )
    if not read.valid:
        raise InvalidInput("recipients", f"none of the {len(read.invalid)} recipients is valid")
    return _Checked(
        provider,
        tpl,
        read,
        request_key,
        None if digest is None else digest.done(read.invalid),
        reply_to=reply_to,
        send_at=send_at,
    )


def message_fields(
    rt: Runtime, found: validation.Findings, subject: object, html: object, text: object
) -> tuple[str | None, str | None, str | None]:
    """A campaign message's subject, HTML and text under the text policy (None where refused,
    the refusal kept in ``found``)."""
    limit = rt.settings.max_message_bytes
    return (
        found.check(validation.header_text, "message.subject", subject),
        found.check(validation.body, "message.html", html, max_bytes=limit),
        found.check(validation.body, "message.text", text, max_bytes=limit, required=False),
    )


def _provider(value: str) -> Provider:
    """The provider a request names."""
    try:
        return Provider(value)
    except ValueError:
        raise InvalidInput("provider", "must be command_email or mailchimp") from None


def _check_user(rt: Runtime, req: CampaignRequest, checked: _Checked) -> None:
    """What the campaign needs of its agent; and that not every valid recipient is on the
    agent's suppression list (checked before any credit is reserved)."""
    with rt.sessions() as session:
        user = session.get(User, req.user_id)
    if user is None:
        raise NotFound("user", req.user_id)
    if checked.provider is Provider.MAILCHIMP and not (
        user.mailchimp_api_key and user.mailchimp_list_id
    ):
        raise InvalidInput(
            "provider",
            "the user has no connected MailChimp account "
            "(PUT /v1/users/{id} with mailchimp.api_key and list_id)",
        )
    if checked.provider is Provider.COMMAND_EMAIL and not user.postal_address:
        # The law of most markets (CAN-SPAM, CASL) asks for it in every campaign's footer.
        raise InvalidInput(
            "postal_address",
            "the user has no postal address, which every campaign's footer shows "
            "(PUT /v1/users/{id} with postal_address); nothing was stored or charged",
        )
    read = checked.recipients
    if not read.kept:
        raise InvalidInput(
            "recipients", f"all {len(read.skipped)} valid recipients are on the suppression list"
        )


def _store(
    rt: Runtime,
    req: CampaignRequest,
    checked: _Checked,
    campaign_id: str,
    grant: GrantRef | None,
    send_at: datetime | None,
    compact: bool,
) -> int:
    """Store the campaign and its recipients in one transaction, as sends or (``compact``)
    packed on the campaign row; how many chunks it has."""
    now = rt.clock.now()
    size = rt.settings.campaign_chunk_size
    read = checked.recipients
    chunks = (read.kept + size - 1) // size
    tpl = checked.template
    with rt.sessions.begin() as session:
        session.add(
            Campaign(
                id=campaign_id,
                user_id=req.user_id,
                provider=checked.provider,
                status=(
                    CampaignStatus.RESERVING
                    if grant
                    else CampaignStatus.SCHEDULED
                    if send_at
                    else CampaignStatus.RUNNING
                ),
                send_at=send_at,
                name=req.name,
                subject=tpl.subject,
                html=tpl.html,
                text=tpl.text,
                from_name=req.from_name,
                reply_to=checked.reply_to,
                recipients=read.kept,
                invalid_count=len(read.invalid),
                suppressed_count=len(read.skipped),
                missing_fields=read.missing or None,
                chunks=chunks,
                period=grant.period if grant else None,
                grant_seq=grant.seq if grant else None,
                idempotency_key=checked.request_key,
                request_digest=checked.digest,
                pending_recipients=read.packed if compact else None,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        with db.bulk_writes(session.connection()):
            _insert_exclusions(session, campaign_id, ExclusionKind.INVALID, read.invalid)
            _insert_exclusions(session, campaign_id, ExclusionKind.SUPPRESSED, read.skipped)
            if not compact:
                status = SendStatus.RESERVED if grant else SendStatus.QUEUED
                parts = recipients.chunks(read.packed)
                insert_sends(session, rt, campaign_id, req.user_id, parts, grant, status, now)
    return chunks


def _insert_exclusions(
    session: Session, campaign_id: str, kind: ExclusionKind, entries: Sequence[dict[str, Any]]
) -> None:
    """Store a campaign's invalid or suppressed recipients, one row each, in request order."""
    rows = [
        {
            "campaign_id": campaign_id,
            "kind": kind,
            "seq": seq,
            "row": e["index"],
            "contact_id": e["contact_id"],
            "email": e["email"],
            "field": e.get("field"),
            "reason": e["reason"],
        }
        for seq, e in enumerate(entries)
    ]
    for start in range(0, len(rows), 2000):
        session.connection().execute(insert(EXCLUSION_TABLE), rows[start : start + 2000])


def _reserve_all(
    rt: Runtime,
    campaign_id: str,
    grant: GrantRef,
    size: int,
    then: CampaignStatus,
    compact: bool,
) -> None:
    """Reserve the credits of every recipient in one step and start the campaign (``then``
    running, or scheduled to wait for its time holding them; a ``compact`` one stays
    ``reserving``, marked reserved, for its first chunk task to write its sends and start
    it), or leave nothing behind and raise :class:`InsufficientCredits`."""
    now = rt.clock.now()
    reservation = rt.quota.reserve(grant, campaign_key(campaign_id), size)
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
                session.execute(
                    delete(CampaignExclusion).where(CampaignExclusion.campaign_id == campaign_id)
                )
                session.execute(delete(Campaign).where(Campaign.id == campaign_id))
        # Should Redis have lost its data meanwhile, a rebuild that read the recipients before
        # they were removed counts them as pending: uncount them (nothing to do otherwise).
        rt.quota.refund(grant, campaign_key(campaign_id), size)
        raise InsufficientCredits(size, reservation.remaining, reservation.total)
    if not compact:
        reserved(rt, campaign_id, grant, reservation, then)
        return
    notices.after_reservation(rt, grant, reservation)
    with rt.sessions.begin() as session:
        marked = session.execute(
            update(Campaign)
            .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RESERVING)
            .values(reserved_at=rt.clock.now())
        )
    if cast(CursorResult[Any], marked).rowcount != 1:
        # The reserving sweep failed it meanwhile (this request took far too long) and gave
        # back what was reserved then; this reservation goes back too.
        rt.quota.refund(grant, campaign_key(campaign_id), size)
        raise CampaignStateError(campaign_id, CampaignStatus.FAILED.value, "start")


def reserved(
    rt: Runtime,
    campaign_id: str,
    grant: GrantRef,
    reservation: Reservation,
    then: CampaignStatus = CampaignStatus.RUNNING,
) -> None:
    """A ``reserving`` campaign's bulk reservation was granted: usage notices, then the
    campaign goes on to ``then`` with its recipients ``reserved``. Should the reserving sweep
    have failed it meanwhile, the reservation goes back and :class:`CampaignStateError` is
    raised."""
    notices.after_reservation(rt, grant, reservation)
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        if control.start(session, campaign_id, now, then):
            return
    # The sweep gave up on this campaign (this request took far too long): it was failed and
    # its recipients settled; this reservation goes back too, part by part (the sweep may
    # have given some back already; never twice), flagged first so that a Redis error here
    # leaves the refunds to the refund sweep.
    with rt.sessions.begin() as session:
        owed = session.scalars(
            update(Send)
            .where(Send.campaign_id == campaign_id, Send.status == SendStatus.FAILED)
            .values(refund_due=True)
            .returning(Send.id)
        ).all()
    refunds.give_back(rt, list(owed))
    raise CampaignStateError(campaign_id, CampaignStatus.FAILED.value, "start")


class _RequestDigest:
    """A digest of everything a validated campaign request asks for (recipients in order).

    It is the SHA-256 of one JSON document (``[user, provider, [subject, html, text],
    [from_name, reply_to, name], [[contact id, email, fields], ...], [invalid, ...]]``, keys
    sorted, no spaces; ``send_at`` after the names when given), written as the recipients are
    read, so that no copy of the whole list is made."""

    def __init__(self, req: CampaignRequest, tpl: MessageTemplate) -> None:
        head: list[object] = [
            req.user_id,
            req.provider,
            [tpl.subject, tpl.html, tpl.text],
            [req.from_name, req.reply_to, req.name],
        ]
        if req.send_at is not None:  # only then: digests of earlier requests stay as they were
            head.append(req.send_at)
        self._hash = hashlib.sha256()
        self._hash.update(recipients.digest_dumps(head)[:-1].encode() + b",[")

    def recipients(self, text: bytes) -> None:
        """The valid recipients' text (see :func:`recipients.read`)."""
        self._hash.update(text)

    def done(self, invalid: Sequence[dict[str, Any]]) -> str:
        self._hash.update(b"]," + recipients.digest_dumps(list(invalid)).encode() + b"]")
        return self._hash.hexdigest()


def _replay(rt: Runtime, user_id: str, key: str, digest: str) -> CampaignView | None:
    """The campaign an earlier request with this key created, if any; raises
    :class:`RequestKeyReused` when that request asked for something else."""
    with rt.sessions() as session:
        found = session.execute(
            select(
                Campaign.id, Campaign.request_digest, Campaign.status, Campaign.reserved_at
            ).where(Campaign.user_id == user_id, Campaign.idempotency_key == key)
        ).first()
    if found is None:
        return None
    if found.request_digest != digest:
        raise RequestKeyReused(key, found.id)
    if found.status is CampaignStatus.RESERVING and found.reserved_at is None:
        # The first request is still taking its credits (and may yet be refused).
        raise RequestInProgress(key, found.id)
    log.info("campaign request repeated id=%s user=%s", found.id, user_id)
    return replace(view(rt, found.id), replayed=True)


def insert_sends(
    session: Session,
    rt: Runtime,
    campaign_id: str,
    user_id: str,
    parts: Iterable[list[Stored]],
    grant: GrantRef | None,
    status: SendStatus,
    now: datetime,
    first_chunk: int = 0,
) -> None:
    """One send per recipient of ``parts`` (chunk ``first_chunk``, the next, ...) in
    ``status``: ``reserved`` when claimed against ``grant``
    (the ledger counts it pending under the campaign's bulk key until the campaign leaves
    ``reserving``), ``queued`` when not charged (MailChimp; a start in a later month; a
    compact campaign whose credits were refused), written a chunk at a time: only one
    chunk's rows exist as Python objects at once. The values every row shares are converted
    for the driver once; per row only its own are."""
    user = session.get(User, user_id)
    assert user is not None  # checked by _drop_suppressed
    domain = identity.envelope_domain(rt.settings, user.sender_address)
    shared = {
        "kind": SendKind.CAMPAIGN,
        "user_id": user_id,
        "campaign_id": campaign_id,
        # The message lives on the campaign row, not on 100,000 send rows.
        "subject": "",
        "html": "",
        "status": status,
        "period": grant.period if grant else None,
        "grant_seq": grant.seq if grant else None,
        "attempts": 0,
        "outcome_published": True,
        "refund_due": False,
        "created_at": now,
        "updated_at": now,
    }
    own = [
        "id",
        "idempotency_key",
        "contact_id",
        "contact_email",
        "merge_fields",
        "chunk",
        "message_id",
    ]
    writer = bulk_writer(session, SEND_TABLE, shared, own)
    for chunk, part in enumerate(parts, start=first_chunk):
        ids = new_ids(len(part))
        rows = []
        for send_id, (contact_id, email, fields) in zip(ids, part, strict=True):
            key = recipient_key(campaign_id, contact_id)
            rows.append(
                (send_id, key, contact_id, email, fields, chunk, message_id_for(key, domain))
            )
        writer(rows)


def new_ids(n: int) -> list[str]:
    """``n`` random (version 4) UUIDs as text: what ``str(uuid.uuid4())`` gives, from one
    call for random bytes instead of one per id."""
    hexed = os.urandom(16 * n).hex()
    ids = []
    for at in range(0, 32 * n, 32):
        h = hexed[at : at + 32]
        variant = "89ab"[int(h[16], 16) & 3]
        ids.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}")
    return ids


def bulk_writer(
    session: Session, table: Table, shared: dict[str, Any], own: Sequence[str]
) -> Callable[[list[tuple[Any, ...]]], None]:
    """A function that inserts rows of ``table`` in the session's transaction, each row the
    values of the columns ``own`` (in order) plus the ``shared`` values every row has: by
    COPY on PostgreSQL, by the driver's executemany elsewhere. Values are converted as the
    columns' types convert them (enums to their values, datetimes, JSON), the shared ones
    once. Bypasses SQLAlchemy's per-row statement processing, which costs more than the
    insert itself."""
    conn = session.connection()
    dialect = conn.dialect
    names = [*own, *shared]
    converted = tuple(_to_driver(table.c[name], value, dialect) for name, value in shared.items())
    converters = [
        (at, proc)
        for at, name in enumerate(own)
        if (proc := _processor(table.c[name], dialect)) is not None
    ]

    def each(rows: list[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for row in rows:
            if converters:
                values = list(row)
                for at, proc in converters:
                    values[at] = proc(values[at])
                row = tuple(values)
            yield row + converted

    columns = ", ".join(names)
    if dialect.name == "postgresql":
        driver = conn.connection.driver_connection
        assert driver is not None  # a live connection in the session's transaction
        copy_sql = f"COPY {table.name} ({columns}) FROM STDIN"

        def write_copy(rows: list[tuple[Any, ...]]) -> None:
            with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:
                for row in each(rows):
                    copy.write_row(row)

        return write_copy
    marks = ", ".join("?" * len(names))
    insert_sql = f"INSERT INTO {table.name} ({columns}) VALUES ({marks})"

    def write_many(rows: list[tuple[Any, ...]]) -> None:
        conn.exec_driver_sql(insert_sql, list(each(rows)))

    return write_many


def _processor(column: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """How the column's type converts a value for this dialect's driver (None: as it is)."""
    proc: Callable[[Any], Any] | None = column.type.dialect_impl(dialect).bind_processor(dialect)
    return proc


def _to_driver(column: Any, value: Any, dialect: Any) -> Any:
    """``value`` as the column's type hands it to the driver."""
    proc = _processor(column, dialect)
    return value if proc is None else proc(value)
