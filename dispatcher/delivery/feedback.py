"""Bounces and complaints reported after the relay took an email: matched to the send, recorded
once, the address suppressed, the contact's timeline told and (SmartPlan) the outcome stream.

A report comes by mail to the inbound SMTP server (a DSN or ARF at the send's return path, see
:mod:`dispatcher.delivery.returnpath`) or from a relay's webhook. It does **not** change the
send's terminal outcome: the send stays ``sent`` (one terminal outcome per send, I4) and its
credit stays spent (the relay took the email; nothing is refunded). What it adds:

- a ``feedback_events`` row, at most one of each kind per send (a report delivered twice, or by
  mail and by webhook, is recorded once);
- a hard bounce or a complaint suppresses the address for the agent; a soft bounce is counted,
  and ``SOFT_BOUNCE_LIMIT`` of them (on different emails) suppress it;
- a timeline event (``email_bounced``, ``email_complained``) referring to the original send;
- for a SmartPlan send, an entry on the outcome stream with status ``bounced`` or
  ``complained`` (the terminal ``sent`` entry was published before), at least once.

Which send a report is about comes only from something we signed or a relay vouched for: the
return path it was delivered to (signed), a return path or unsubscribe token in the attached
original (both signed), or, for a webhook whose signature was verified, our Message-ID with the
recipient's address. A report by mail is never matched by its Message-ID alone: mail is
unauthenticated, and the Message-ID is in every copy its recipient holds or forwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dispatcher.delivery import publish, returnpath, suppression, timeline, unsubscribe, webhooks
from dispatcher.delivery.outcomes import StepOutcome
from dispatcher.delivery.reports import Report
from dispatcher.delivery.timeline import KIND_OF
from dispatcher.delivery.webhooks.common import Headers
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.models import (
    FeedbackEvent,
    FeedbackKind,
    Send,
    SendKind,
    SuppressionReason,
    TimelineEvent,
)
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: The suppression each kind of report leads to (a soft bounce: once counted enough).
_SUPPRESS_AS = {
    FeedbackKind.HARD_BOUNCE: SuppressionReason.HARD_BOUNCE,
    FeedbackKind.SOFT_BOUNCE: SuppressionReason.SOFT_BOUNCE,
    FeedbackKind.COMPLAINT: SuppressionReason.COMPLAINT,
}
#: What the outcome stream says of each kind.
_STREAM_STATUS = {
    FeedbackKind.HARD_BOUNCE: "bounced",
    FeedbackKind.SOFT_BOUNCE: "bounced",
    FeedbackKind.COMPLAINT: "complained",
}


@dataclass(frozen=True)
class Recorded:
    """What a report did: ``new`` is False for a report already recorded."""

    send_id: str
    kind: FeedbackKind
    new: bool
    suppressed: bool


def send_of(rt: Runtime, report: Report, *, verified: bool = False) -> str | None:
    """The send a report is about, from a signed reference in it (its return path, the
    attached original's return path or unsubscribe token), or, when ``verified`` (a webhook
    whose signature checked), our Message-ID and the recipient's address. None: no match.
    A signed reference that is forged raises :class:`InvalidInput`."""
    candidates: list[str] = []
    if report.return_path:
        candidates.append(report.return_path)
    if report.original is not None:
        candidates.append(str(report.original.get("Return-Path", "")))
    for candidate in candidates:
        path = returnpath.parse(rt.settings, candidate) if "@" in candidate else None
        if path is not None and path.send_id is not None:
            return path.send_id
    if report.original is not None:
        token = _unsubscribe_token(str(report.original.get("List-Unsubscribe", "")))
        if token is not None:
            return unsubscribe.send_id_of(rt.settings, token)
    if verified and report.message_id and report.recipient:
        return _by_message_id(rt, report.message_id, report.recipient)
    return None


def _unsubscribe_token(field: str) -> str | None:
    """The signed token of our one-click link in a ``List-Unsubscribe`` field."""
    for part in field.replace("\r\n", "").split(","):
        link = part.strip().strip("<>")
        if "/u/" in link and not link.startswith("mailto:"):
            return link.rsplit("/u/", 1)[1] or None
    return None


def _by_message_id(rt: Runtime, message_id: str, recipient: str) -> str | None:
    wanted = message_id.strip()
    if not wanted.startswith("<"):
        wanted = f"<{wanted}>"
    with rt.reads() as session:
        rows = session.execute(
            select(Send.id, Send.contact_email).where(Send.message_id == wanted)
        ).all()
    matching = [r.id for r in rows if suppression.normalize(r.contact_email) == recipient.lower()]
    return matching[0] if len(matching) == 1 else None


def record(rt: Runtime, send_id: str, report: Report) -> Recorded | None:
    """Record ``report`` against the send (idempotent); None when the send is unknown."""
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        send = session.get(Send, send_id)
        if send is None:
            log.info("report for a send no longer known id=%s kind=%s", send_id, report.kind)
            return None
        email = suppression.normalize(send.contact_email)
        new = _insert(session, send, email, report, now)
        suppressed = False
        if new:
            suppressed = _suppress(session, rt, send, email, report)
            session.add(
                timeline.about_send(
                    send,
                    report.kind.timeline_kind,
                    now,
                    reason=report.kind.value,
                    detail=_describe(report, suppressed),
                    subject=_subject(session, send),
                )
            )
        pending = session.scalar(
            select(FeedbackEvent.id).where(
                FeedbackEvent.send_id == send.id,
                FeedbackEvent.kind == report.kind,
                FeedbackEvent.outcome_published.is_(False),
            )
        )
        outcome = _outcome(send, report.kind) if pending is not None else None
    if pending is not None and outcome is not None:
        _publish(rt, pending, outcome)
    log.info(
        "report recorded send=%s kind=%s source=%s new=%s suppressed=%s",
        send_id,
        report.kind.value,
        report.source,
        new,
        suppressed,
    )
    return Recorded(send_id, report.kind, new, suppressed)


def handle(rt: Runtime, report: Report, *, verified: bool = False) -> Recorded | None:
    """Match ``report`` to its send (see :func:`send_of`) and record it; None: no send."""
    send_id = send_of(rt, report, verified=verified)
    if send_id is None:
        log.info("report matched no send source=%s kind=%s", report.source, report.kind.value)
        return None
    return record(rt, send_id, report)


@dataclass(frozen=True)
class WebhookResult:
    """What one webhook request did: its reports, how many were new, how many matched no
    email of ours (another sender's mail on the same relay account, or a send deleted)."""

    provider: str
    reports: int
    recorded: int
    unmatched: int


def from_webhook(rt: Runtime, provider: str, headers: Headers, body: bytes) -> WebhookResult:
    """A relay's webhook request: its signature checked (:class:`WebhookRefused` otherwise,
    before anything is read or recorded), then each of its reports handled on its own."""
    reader = webhooks.PROVIDERS.get(provider)
    if reader is None:
        raise NotFound("webhook provider", provider)
    found = reader(rt.settings, headers, body, rt.clock.now())
    recorded = unmatched = 0
    for report in found:
        try:
            done = handle(rt, report, verified=True)
        except InvalidInput as exc:
            # A return path of ours in it does not check: that email is not ours to act on.
            log.warning("%s webhook report refused: %s %s", provider, exc.field, exc.problem)
            done = None
        if done is None:
            unmatched += 1
        elif done.new:
            recorded += 1
    log.info(
        "%s webhook reports=%d recorded=%d unmatched=%d", provider, len(found), recorded, unmatched
    )
    return WebhookResult(provider, len(found), recorded, unmatched)


def publish_pending(rt: Runtime, before: datetime, limit: int = 2000) -> int:
    """Put on the stream the SmartPlan entries recorded before ``before`` but never published
    (the process died, or Redis was away, between the two); how many were published."""
    with rt.reads() as session:
        rows = session.execute(
            select(FeedbackEvent.id, FeedbackEvent.kind, Send)
            .join(Send, Send.id == FeedbackEvent.send_id)
            .where(FeedbackEvent.outcome_published.is_(False), FeedbackEvent.occurred_at < before)
            .order_by(FeedbackEvent.id)
            .limit(limit)
        ).all()
        pending = [(row.id, _outcome(row.Send, row.kind)) for row in rows]
    for event_id, outcome in pending:
        _publish(rt, event_id, outcome)
    return len(pending)


def mark_unpublished(session: Session, since: datetime) -> int:
    """Flag the SmartPlan entries recorded since ``since`` to be published again (the stream
    was lost with Redis), in the caller's transaction; how many were flagged."""
    smartplan = select(Send.id).where(Send.kind == SendKind.SMARTPLAN)
    done = session.execute(
        update(FeedbackEvent)
        .where(
            FeedbackEvent.outcome_published.is_(True),
            FeedbackEvent.occurred_at >= since,
            FeedbackEvent.send_id.in_(smartplan),
        )
        .values(outcome_published=False)
    )
    return int(getattr(done, "rowcount", 0) or 0)


def _insert(session: Session, send: Send, email: str, report: Report, now: datetime) -> bool:
    """The report's row, unless this send has one of this kind (then False)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    made = session.scalar(
        insert(FeedbackEvent)
        .values(
            user_id=send.user_id,
            send_id=send.id,
            email=email,
            kind=report.kind,
            source=report.source,
            status=(report.status or "")[:64] or None,
            detail=report.detail,
            outcome_published=send.kind is not SendKind.SMARTPLAN,
            occurred_at=now,
        )
        .on_conflict_do_nothing(index_elements=["send_id", "kind"])
        .returning(FeedbackEvent.id)
    )
    return made is not None


def _suppress(session: Session, rt: Runtime, send: Send, email: str, report: Report) -> bool:
    """Suppress the address when the report calls for it; whether it now is (by this report)."""
    now = rt.clock.now()
    if report.kind is FeedbackKind.SOFT_BOUNCE:
        count = session.scalar(
            select(func.count()).where(
                FeedbackEvent.user_id == send.user_id,
                FeedbackEvent.email == email,
                FeedbackEvent.kind == FeedbackKind.SOFT_BOUNCE,
            )
        )
        if (count or 0) < rt.settings.soft_bounce_limit:
            return False
    existing = suppression.active(session, send.user_id, [email], now).get(email)
    if existing is not None and existing is not SuppressionReason.MANUAL:
        return False  # already suppressed for good (a bounce, an unsubscribe): keep why
    what = {
        FeedbackKind.HARD_BOUNCE: "bounced after delivery",
        FeedbackKind.SOFT_BOUNCE: f"{rt.settings.soft_bounce_limit} temporary failures",
        FeedbackKind.COMPLAINT: "marked as spam",
    }[report.kind]
    suppression.add(
        session,
        send.user_id,
        email,
        _SUPPRESS_AS[report.kind],
        now,
        contact_id=send.contact_id,
        detail=f"{what} ({report.source} {report.status or '-'}) from {unsubscribe.origin(send)}",
    )
    return True


def _describe(report: Report, suppressed: bool) -> str:
    said = f"{report.source} {report.status or ''}".strip()
    text = f"{said}: {report.detail}" if report.detail else said
    return f"{text}; address suppressed" if suppressed else text


def _subject(session: Session, send: Send) -> str | None:
    """The subject as the send's own timeline event shows it (rendered for the contact)."""
    shown = session.scalar(
        select(TimelineEvent.subject)
        .where(
            timeline.of_send(send),
            TimelineEvent.kind.in_(list(KIND_OF.values())),
        )
        .limit(1)
    )
    return shown or send.subject


def _outcome(send: Send, kind: FeedbackKind) -> StepOutcome:
    return publish.step_outcome(send, _STREAM_STATUS[kind], kind.value)


def _publish(rt: Runtime, event_id: int, outcome: StepOutcome) -> None:
    """Write the entry, then remember it was (a crash in between writes it again when the
    report comes again: consumers dedupe on ``send_id`` and ``status``)."""
    rt.outcomes.publish(outcome)
    with rt.sessions.begin() as session:
        session.execute(
            update(FeedbackEvent).where(FeedbackEvent.id == event_id).values(outcome_published=True)
        )
