"""Worker side of a Command Email campaign: one chunk of recipients per task, the template
compiled and the MIME skeleton built once, SMTP connections reused, SQL written in batches.

Every recipient keeps its own lease and compare-and-set status, exactly as a SmartPlan send:
a redelivered or duplicated chunk task, a pause or a cancel never sends anyone a second copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from email.utils import format_datetime
from itertools import groupby
from typing import Any, cast

from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, CursorResult, func, insert, select, update

from dispatcher import alerts, keys
from dispatcher.campaigns.service import OPEN_STATUSES
from dispatcher.credits import refunds
from dispatcher.delivery import suppression
from dispatcher.delivery.message import Envelope
from dispatcher.delivery.mime import BulkMessage
from dispatcher.delivery.relay import unavailable
from dispatcher.delivery.rendering import MessageTemplate, context_for
from dispatcher.delivery.transports.classify import HARD_BOUNCE, POLICY
from dispatcher.delivery.unsubscribe import bulk_headers
from dispatcher.errors import (
    DeliveryDeferred,
    DeliveryRejected,
    DeliveryUnknown,
    NotAttempted,
    NotFound,
    RenderError,
    SendBusy,
)
from dispatcher.models import (
    AlertKind,
    Campaign,
    CampaignStatus,
    Provider,
    Send,
    SendStatus,
    TimelineEvent,
    TimelineKind,
    User,
)
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Recipients claimed per round trip; a pause takes effect within one batch.
BATCH = 200

#: Member of a chunk's start-mark set written before any recipient is claimed.
OPEN_MARK = "-"
#: How long start marks outlive a lease (seconds).
STARTED_TTL = 86_400

_KIND = {
    SendStatus.SENT: TimelineKind.EMAIL_SENT,
    SendStatus.FAILED: TimelineKind.EMAIL_FAILED,
    SendStatus.UNKNOWN: TimelineKind.EMAIL_UNKNOWN,
}

#: (send id, status, reason, detail, rendered subject, give the credit back)
Outcome = tuple[str, SendStatus, str | None, str | None, str | None, bool]


def deliver_chunk(rt: Runtime, item: str) -> CampaignStatus:
    """Send the open recipients of chunk ``"<campaign id>:<chunk>"``; returns the campaign's
    status afterwards.

    Raises :class:`DeliveryDeferred` when some recipients were deferred (the task retries the
    chunk; only those are left) and :class:`SendBusy` when another worker holds some of them.
    """
    campaign_id, _, chunk_text = item.rpartition(":")
    chunk = int(chunk_text)
    with rt.sessions() as session:
        c = session.get(Campaign, campaign_id)
        if c is None:
            raise NotFound("campaign", campaign_id)
        user = session.get(User, c.user_id)
        if user is None:
            raise NotFound("user", c.user_id)
        session.expunge_all()
    if c.provider is Provider.MAILCHIMP:
        from dispatcher.campaigns.mailchimp_job import deliver_mailchimp

        return deliver_mailchimp(rt, c, user)
    if c.status is not CampaignStatus.RUNNING:
        return c.status
    _settle_lost(rt, c, chunk)
    _refund_failed(rt, c, chunk)
    sender = user.sender_address
    if sender is None:
        raise RenderError("the user has no platform or communications email to send from")
    # Command Email recipients count their own attempts (MailChimp jobs count their runs).
    deferred, held = asyncio.run(_run_chunk(rt, c, chunk, sender))
    now_status = _status(rt, campaign_id)
    if now_status is not CampaignStatus.RUNNING and now_status is not None:
        return now_status  # paused or cancelled meanwhile: a resume enqueues what is left
    busy = _live_lease(rt, campaign_id, chunk)
    if busy is not None:
        raise SendBusy(item, busy)
    if held is not None:
        raise held  # the relay is halted or its rate limit used up: come back later
    if deferred:
        raise DeliveryDeferred("smtp_deferred", f"{deferred} recipients deferred; retrying")
    return complete_if_done(rt, campaign_id)


async def _run_chunk(
    rt: Runtime, c: Campaign, chunk: int, sender: str
) -> tuple[int, NotAttempted | None]:
    """Send the chunk's reserved recipients batch by batch while the campaign runs; returns
    how many were deferred, and why the relay held messages back (if it did)."""
    compiled = MessageTemplate(c.subject, c.html, c.text).compile()
    headers = bulk_headers(rt.settings, c.id, c.user_id)
    skeleton = BulkMessage(
        from_address=sender,
        from_name=c.from_name,
        reply_to=c.reply_to,
        extra_headers=headers.constant,
    )
    envelope_from = rt.settings.mail_from_address
    lease = timedelta(seconds=rt.settings.send_lease_seconds)
    bulk = rt.transport.bulk()
    deferred = 0
    held: NotAttempted | None = None
    # Stop claiming (and starting messages) well before the task's time limit, so a throttled
    # relay never leaves claimed recipients behind a killed task; the rest goes on in a retry.
    deadline = time.monotonic() + rt.settings.task_time_limit / 2
    # Before anything is claimed: the marker that says this chunk's start marks are complete
    # (should Redis lose them, the marker goes too, and lost recipients count as started).
    started = keys.chunk_started(c.id, chunk)
    pipe = rt.redis.pipeline(transaction=False)
    pipe.sadd(started, OPEN_MARK)
    pipe.expire(started, rt.settings.send_lease_seconds + STARTED_TTL)
    pipe.execute()
    try:
        while _status(rt, c.id) is CampaignStatus.RUNNING:
            if time.monotonic() > deadline:
                held = NotAttempted("chunk_yield", "the task's time is up; the chunk goes on", 0.0)
                break
            now = rt.clock.now()
            claimed = _claim(rt, c.id, chunk, now, now + lease)
            if not claimed:
                break
            date = format_datetime(now)
            outcomes: list[Outcome] = []
            ready: list[tuple[Any, str, bytes]] = []
            with rt.sessions() as session:
                # Unsubscribed or bounced since the campaign was created: credit back, not sent.
                blocked = suppression.active(
                    session, c.user_id, (row.contact_email for row in claimed), now
                )
            for row in claimed:
                why = blocked.get(suppression.normalize(row.contact_email))
                if why is not None:
                    outcomes.append(
                        (
                            row.id,
                            SendStatus.FAILED,
                            suppression.SUPPRESSED,
                            f"the address is on the agent's suppression list ({why.value}); "
                            "not sent",
                            None,
                            True,
                        )
                    )
                    continue
                try:
                    rendered = compiled.render(
                        context_for(row.contact_id, row.contact_email, row.merge_fields)
                    )
                except RenderError as exc:
                    outcomes.append((row.id, SendStatus.FAILED, exc.reason, exc.detail, None, True))
                    continue
                raw = skeleton.render(
                    to=row.contact_email,
                    subject=rendered.subject,
                    message_id=row.message_id,
                    date=date,
                    text=rendered.text,
                    html=rendered.html,
                    extra=headers.list_unsubscribe_field(row.id),
                )
                ready.append((row, rendered.subject, raw))

            def mark(group: Sequence[int], batch: list[tuple[Any, str, bytes]] = ready) -> None:
                # Before their conversations: a worker dying after this leaves them
                # ``unknown``; one dying before it leaves them to be sent again.
                try:
                    rt.redis.sadd(started, *(batch[i][0].id for i in group))
                except RedisError as exc:
                    raise unavailable(exc) from None

            results = await bulk.send_many(
                [(Envelope(envelope_from, (row.contact_email,)), raw) for row, _, raw in ready],
                deadline,
                mark,
            )
            back_to_reserved: list[tuple[str, str, str]] = []
            not_attempted: list[str] = []
            for (row, subject, _), result in zip(ready, results, strict=True):
                if isinstance(result, NotAttempted):
                    held = result
                    not_attempted.append(row.id)
                elif isinstance(result, DeliveryDeferred):
                    # Each recipient's own SMTP attempts (this one included) are its budget.
                    if row.attempts > rt.settings.send_max_retries:
                        outcomes.append(
                            (
                                row.id,
                                SendStatus.FAILED,
                                "retries_exhausted",
                                f"gave up after retries; last error: {result.detail}",
                                subject,
                                True,
                            )
                        )
                    else:
                        back_to_reserved.append((row.id, result.reason, result.detail))
                elif isinstance(result, DeliveryRejected):
                    outcomes.append(
                        (row.id, SendStatus.FAILED, result.reason, result.detail, subject, True)
                    )
                elif isinstance(result, DeliveryUnknown):
                    outcomes.append(
                        (row.id, SendStatus.UNKNOWN, result.reason, result.detail, subject, False)
                    )
                else:
                    outcomes.append(
                        (
                            row.id,
                            SendStatus.SENT,
                            None,
                            f"{result.code} {result.reply}",
                            subject,
                            False,
                        )
                    )
            settle(rt, c, outcomes, expect=(SendStatus.SENDING,))
            if not_attempted:
                _unclaim(rt, not_attempted)
            if back_to_reserved:
                deferred += len(back_to_reserved)
                _release(rt, back_to_reserved)
            policy = next((o for o in outcomes if o[2] == POLICY), None)
            if policy is not None:
                _pause_for_policy(rt, c, policy[3] or "")
                break
            if back_to_reserved:
                break  # leave the rest of the chunk for the retry, after the backoff
            if held is not None:
                break
    finally:
        await bulk.close()
    return deferred, held


def _status(rt: Runtime, campaign_id: str) -> CampaignStatus | None:
    with rt.sessions() as session:
        return session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))


def _claim(
    rt: Runtime, campaign_id: str, chunk: int, now: datetime, lease_until: datetime
) -> Sequence[Any]:
    """Take the lease of up to BATCH reserved recipients of the chunk, atomically."""
    with rt.sessions.begin() as session:
        ids = (
            select(Send.id)
            .where(
                Send.campaign_id == campaign_id,
                Send.chunk == chunk,
                Send.status == SendStatus.RESERVED,
            )
            .limit(BATCH)
            .scalar_subquery()
        )
        return session.execute(
            update(Send)
            .where(Send.id.in_(ids), Send.status == SendStatus.RESERVED)
            .values(
                status=SendStatus.SENDING,
                lease_until=lease_until,
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


def _release(rt: Runtime, rows: list[tuple[str, str, str]]) -> None:
    """Deferred recipients go back to reserved (credit kept) for the chunk's retry."""
    with rt.sessions.begin() as session:
        for send_id, reason, detail in rows:
            session.execute(
                update(Send)
                .where(Send.id == send_id, Send.status == SendStatus.SENDING)
                .values(
                    status=SendStatus.RESERVED,
                    lease_until=None,
                    reason=reason,
                    detail=detail,
                    updated_at=rt.clock.now(),
                )
            )


def _unclaim(rt: Runtime, send_ids: list[str], *also: ColumnElement[bool]) -> None:
    """Claimed recipients whose conversation never started (held back by the relay's guard,
    or claimed by a worker that died first) go back to reserved; not an attempt."""
    with rt.sessions.begin() as session:
        session.execute(
            update(Send)
            .where(Send.id.in_(send_ids), Send.status == SendStatus.SENDING, *also)
            .values(
                status=SendStatus.RESERVED,
                lease_until=None,
                attempts=Send.attempts - 1,
                updated_at=rt.clock.now(),
            )
        )


def _pause_for_policy(rt: Runtime, c: Campaign, detail: str) -> None:
    """The relay refused a message on policy grounds (content, reputation): sending more of the
    same would hurt the agent's and our reputation, so the campaign pauses and ops and the
    agent are alerted. The refused recipient is failed (credit back), not suppressed."""
    now = rt.clock.now()
    note = f"paused: the relay refused a message on policy grounds ({detail})"
    with rt.sessions.begin() as session:
        open_left = session.scalar(
            select(func.count())
            .select_from(Send)
            .where(Send.campaign_id == c.id, Send.status.in_(OPEN_STATUSES))
        )
        paused = session.execute(
            update(Campaign)
            .where(Campaign.id == c.id, Campaign.status == CampaignStatus.RUNNING)
            # Nothing left to hold back: the campaign completes; the alert is raised anyway.
            .values(detail=note, updated_at=now)
            .values(status=CampaignStatus.PAUSED if open_left else CampaignStatus.RUNNING)
        )
        if cast(CursorResult[Any], paused).rowcount == 1:
            alerts.record(
                session,
                AlertKind.POLICY_REJECTED,
                f"campaign {c.id} paused: the relay refused a message on policy grounds: "
                f"{detail}; review the content and resume it",
                now,
                user_id=c.user_id,
                campaign_id=c.id,
            )
    log.warning("campaign paused on a policy refusal id=%s: %s", c.id, detail)


def _settle_lost(rt: Runtime, c: Campaign, chunk: int) -> None:
    """Settle recipients whose lease ran out mid-batch (their worker died). Those whose
    conversation had started (marked in Redis just before it) are ``unknown``: the server may
    have the message, so it is never resent and the credit is kept. Those never started go back
    to ``reserved`` to be sent (not an attempt). Without the chunk's marker (Redis lost its
    data) every one of them counts as started."""
    now = rt.clock.now()
    with rt.sessions() as session:
        lost = session.execute(
            select(Send.id, Send.contact_id, Send.contact_email, Send.merge_fields).where(
                Send.campaign_id == c.id,
                Send.chunk == chunk,
                Send.status == SendStatus.SENDING,
                Send.lease_until < now,
            )
        ).all()
    if not lost:
        return
    started_key = keys.chunk_started(c.id, chunk)
    flags = rt.redis.smismember(started_key, [OPEN_MARK, *(row.id for row in lost)])
    complete, marks = bool(flags[0]), flags[1:]
    never = [row.id for row, m in zip(lost, marks, strict=True) if complete and not m]
    if never:
        _unclaim(rt, never, Send.lease_until < now)
        log.warning(
            "campaign %s chunk %d: %d recipients of a lost worker were never started; "
            "they will be sent",
            c.id,
            chunk,
            len(never),
        )
    subject = _subjects(c)
    settle(
        rt,
        c,
        [
            (
                row.id,
                SendStatus.UNKNOWN,
                "worker_lost_during_smtp",
                "the worker was lost while talking to the SMTP server; not resent",
                subject(row),
                False,
            )
            for row in lost
            if row.id not in never
        ],
        expect=(SendStatus.SENDING,),
    )


def _subjects(c: Campaign) -> Callable[[Any], str | None]:
    """Each recipient's rendered subject, as its timeline shows it (None: the campaign's)."""
    try:
        compiled = MessageTemplate(c.subject, c.html, c.text).compile()
    except RenderError:
        return lambda _row: None

    def subject(row: Any) -> str | None:
        try:
            fields = context_for(row.contact_id, row.contact_email, row.merge_fields)
            return compiled.render(fields).subject
        except RenderError:
            return None

    return subject


def _refund_failed(rt: Runtime, c: Campaign, chunk: int) -> None:
    """Give back the credits of the chunk's failed recipients still due: a refund lost to a
    Redis error after its outcome was committed is made here by the chunk's next run, or by
    the refund sweep, whichever comes first."""
    with rt.sessions() as session:
        due = session.scalars(
            select(Send.id).where(
                Send.campaign_id == c.id, Send.chunk == chunk, Send.refund_due.is_(True)
            )
        ).all()
    if due:
        refunds.give_back(rt, list(due))


def _live_lease(rt: Runtime, campaign_id: str, chunk: int) -> float | None:
    """Seconds until the last live lease in the chunk runs out, if any (another worker)."""
    with rt.sessions() as session:
        until = session.scalar(
            select(func.max(Send.lease_until)).where(
                Send.campaign_id == campaign_id,
                Send.chunk == chunk,
                Send.status == SendStatus.SENDING,
            )
        )
    if until is None:
        return None
    return max((until - rt.clock.now()).total_seconds(), 0.0) + 1


def settle(
    rt: Runtime, c: Campaign, outcomes: Iterable[Outcome], expect: tuple[SendStatus, ...]
) -> int:
    """Record terminal outcomes in batches: status (compare-and-set), timeline events, then
    credits back for failures. Returns how many were recorded."""
    now = rt.clock.now()
    ordered = sorted(outcomes, key=lambda o: (o[1].value, o[2] or "", o[3] or "", o[5]))
    refund_ids: list[str] = []
    recorded = 0
    with rt.sessions.begin() as session:
        for (status, reason, detail, refund), group in groupby(
            ordered, key=lambda o: (o[1], o[2], o[3], o[5])
        ):
            items = list(group)
            subjects = {o[0]: o[4] for o in items}
            for start in range(0, len(items), 500):
                ids = [o[0] for o in items[start : start + 500]]
                rows = session.execute(
                    update(Send)
                    .where(Send.id.in_(ids), Send.status.in_(expect))
                    .values(
                        status=status,
                        reason=reason,
                        detail=detail,
                        lease_until=None,
                        finished_at=now,
                        updated_at=now,
                        refund_due=refund,
                    )
                    .returning(Send.id, Send.contact_id, Send.idempotency_key, Send.contact_email)
                ).all()
                if not rows:
                    continue
                if reason == HARD_BOUNCE:
                    for r in rows:
                        suppression.hard_bounced(
                            session, c.user_id, r.contact_email, r.contact_id, detail, now
                        )
                recorded += len(rows)
                session.execute(
                    insert(TimelineEvent),
                    [
                        {
                            "user_id": c.user_id,
                            "contact_id": r.contact_id,
                            "send_id": r.id,
                            "kind": _KIND[status],
                            "status": status,
                            "reason": reason,
                            "detail": detail,
                            "subject": subjects.get(r.id) or c.subject,
                            "source": {
                                "type": "campaign",
                                "campaign_id": c.id,
                                "provider": c.provider.value,
                            },
                            "occurred_at": now,
                        }
                        for r in rows
                    ],
                )
                if refund:
                    refund_ids += [r.id for r in rows]
    if refund_ids:
        # After the commit: the ledger no longer counts them, so a rebuild agrees. Should
        # Redis fail here, the flags set with the outcomes have the sweep make them.
        refunds.give_back(rt, refund_ids)
    return recorded


def complete_if_done(rt: Runtime, campaign_id: str) -> CampaignStatus:
    """Mark a running campaign completed once no recipient is left open."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        open_left = session.scalar(
            select(func.count())
            .select_from(Send)
            .where(Send.campaign_id == campaign_id, Send.status.in_(OPEN_STATUSES))
        )
        if not open_left:
            result = session.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RUNNING)
                .values(status=CampaignStatus.COMPLETED, finished_at=now, updated_at=now)
            )
            if cast(CursorResult[Any], result).rowcount == 1:
                log.info("campaign completed id=%s", campaign_id)
        status = session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))
    assert status is not None
    return status
