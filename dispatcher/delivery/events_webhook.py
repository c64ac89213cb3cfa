"""The events webhook: every timeline event (sent, failed, unknown, unsubscribed, and the
bounces and complaints heard later) POSTed to ``EVENTS_WEBHOOK_URL``, signed, at least once,
in order, so a CRM need not poll.

How it holds:

- **Source**: the ``timeline_events`` table, written in the transaction that settles each
  send, so nothing is delivered that did not happen and nothing that happened is missed. A
  cursor row (``event_cursors``) says how far delivery has got; it moves only after the
  receiver answered 2xx, so an event is delivered at least once (again after a crash between
  the POST and the cursor's move: receivers dedupe on the event's ``id``).
- **Gaps**: ids are handed out when a row is inserted, and on PostgreSQL a transaction may
  commit after one with a later id. Delivery stops before a missing id and waits for it; one
  missing for :data:`GAP_WAIT` belonged to a transaction that rolled back, and is passed.
- **One pusher at a time** (a Redis lock; the cursor moves by compare-and-set besides), every
  ``EVENTS_PUSH_SECONDS`` from beat; each push delivers batches for up to :data:`PUSH_BUDGET`.
- **Failures** (no answer, a non-2xx answer) wait with capped exponential backoff and jitter
  (:func:`dispatcher.backoff.backoff`, 5 s doubling to 10 minutes), never dropping an event;
  after :data:`ALERT_AFTER` failures in a row ops get an alert.

A POST carries ``{"events": [...]}`` and two headers, ``Command-Email-Timestamp`` (Unix
seconds) and ``Command-Email-Signature`` (``v1=`` and the hex HMAC-SHA256 of
``"<timestamp>.<body>"`` under ``EVENTS_WEBHOOK_SECRET``); :func:`verify` is the receiver's
check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, select, update

from dispatcher import alerts
from dispatcher.backoff import backoff
from dispatcher.models import AlertKind, EventCursor, TimelineEvent, TimelineKind
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: The cursor row of the events webhook.
CURSOR = "events_webhook"
#: How long a missing id is waited for before it is taken as rolled back.
GAP_WAIT = timedelta(seconds=60)
#: How long one push delivers batches before it leaves the rest to the next.
PUSH_BUDGET = 20.0
#: Failures in a row after which ops get an alert (then one an hour while it lasts).
ALERT_AFTER = 5
RETRY_BASE_SECONDS = 5.0
RETRY_CAP_SECONDS = 600.0
TIMESTAMP_HEADER = "Command-Email-Timestamp"
SIGNATURE_HEADER = "Command-Email-Signature"
#: How old a signed timestamp :func:`verify` accepts by default.
TOLERANCE_SECONDS = 300

#: The ``type`` of each timeline kind in the webhook's events.
TYPE_OF = {
    TimelineKind.EMAIL_SENT: "sent",
    TimelineKind.EMAIL_FAILED: "failed",
    TimelineKind.EMAIL_UNKNOWN: "unknown",
    TimelineKind.UNSUBSCRIBED: "unsubscribed",
    TimelineKind.OPENED: "opened",
    TimelineKind.CLICKED: "clicked",
    TimelineKind.EMAIL_BOUNCED: "bounced",
    TimelineKind.EMAIL_COMPLAINED: "complained",
}


@dataclass(frozen=True)
class Pushed:
    """What one push did: events delivered, POSTs made, and why it stopped."""

    delivered: int
    posts: int
    stopped: str  # "caught_up", "waiting_for_gap", "failed", "retry_later", "budget", "busy", "off"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE_SECONDS,
) -> bool:
    """A receiver's check: the signature is ours and the timestamp recent (replays of an old
    POST are refused). ``headers`` is looked up as given (use the framework's
    case-insensitive mapping)."""
    try:
        timestamp = int(headers[TIMESTAMP_HEADER])
        given = headers[SIGNATURE_HEADER]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(given, sign(secret, timestamp, body))


def event_json(e: TimelineEvent) -> dict[str, Any]:
    """One event as the webhook sends it; ``id`` is stable across redeliveries."""
    return {
        "id": f"evt_{e.id}",
        "type": TYPE_OF.get(e.kind, e.kind.value),
        "occurred_at": e.occurred_at.isoformat(),
        "user_id": e.user_id,
        "contact_id": e.contact_id,
        "send_id": e.send_id,
        "status": e.status.value,
        "reason": e.reason,
        "subject": e.subject,
        "source": e.source,
    }


def push(rt: Runtime, client: httpx.Client | None = None) -> Pushed:
    """Deliver the events not yet delivered, in order, for up to :data:`PUSH_BUDGET`."""
    s = rt.settings
    if s.events_webhook_url is None or s.events_webhook_secret is None:
        return Pushed(0, 0, "off")
    lock_key, token = "ced:events:push", secrets.token_hex(8)
    if not rt.redis.set(lock_key, token, nx=True, px=int((PUSH_BUDGET + 30) * 1000)):
        return Pushed(0, 0, "busy")
    own = client is None
    http = client or httpx.Client(timeout=10.0)
    try:
        return _push(rt, http, s.events_webhook_url, s.events_webhook_secret)
    finally:
        if own:
            http.close()
        if rt.redis.get(lock_key) == token.encode():
            rt.redis.delete(lock_key)


def _push(rt: Runtime, http: httpx.Client, url: str, secret: str) -> Pushed:
    delivered = posts = 0
    started = time.monotonic()
    while True:
        if time.monotonic() - started > PUSH_BUDGET:
            return Pushed(delivered, posts, "budget")
        now = rt.clock.now()
        cursor = _cursor(rt, now)
        if cursor.retry_at is not None and cursor.retry_at > now:
            return Pushed(delivered, posts, "retry_later")
        batch, gap = _next_batch(rt, cursor, now)
        if not batch:
            return Pushed(delivered, posts, "waiting_for_gap" if gap else "caught_up")
        body = json.dumps({"events": [event_json(e) for e in batch]}).encode()
        posts += 1
        problem = _post(http, url, secret, body, int(now.timestamp()))
        if problem is not None:
            _failed(rt, cursor, problem, now)
            return Pushed(delivered, posts, "failed")
        if not _advance(rt, cursor.last_id, batch[-1].id, now):
            return Pushed(delivered, posts, "busy")  # another pusher moved it
        delivered += len(batch)


def _cursor(rt: Runtime, now: datetime) -> EventCursor:
    with rt.sessions.begin() as session:
        row = session.get(EventCursor, CURSOR)
        if row is None:
            row = EventCursor(name=CURSOR, last_id=0, failures=0, updated_at=now)
            session.add(row)
            session.flush()
        session.expunge(row)
    return row


def _next_batch(
    rt: Runtime, cursor: EventCursor, now: datetime
) -> tuple[Sequence[TimelineEvent], bool]:
    """The next events in id order without a gap before them; and whether a gap stopped it
    (a gap older than :data:`GAP_WAIT` is passed)."""
    with rt.sessions() as session:
        rows = session.scalars(
            select(TimelineEvent)
            .where(TimelineEvent.id > cursor.last_id)
            .order_by(TimelineEvent.id)
            .limit(rt.settings.events_batch_size)
        ).all()
        session.expunge_all()
    if not rows:
        return [], False
    expected = cursor.last_id + 1
    if rows[0].id != expected:
        since = cursor.gap_since
        if since is None:
            _mark_gap(rt, now)
            return [], True
        if now - since < GAP_WAIT:
            return [], True
        log.warning(
            "events webhook: timeline ids %d-%d never appeared (rolled back); passed",
            expected,
            rows[0].id - 1,
        )
        expected = rows[0].id
    batch = []
    for row in rows:
        if row.id != expected:
            break
        batch.append(row)
        expected += 1
    return batch, False


def _post(http: httpx.Client, url: str, secret: str, body: bytes, timestamp: int) -> str | None:
    """POST one batch; None when the receiver took it, else what went wrong."""
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    try:
        answer = http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= answer.status_code < 300:
        return None
    return f"answered {answer.status_code}"


def _advance(rt: Runtime, old: int, new: int, now: datetime) -> bool:
    with rt.sessions.begin() as session:
        moved = session.execute(
            update(EventCursor)
            .where(EventCursor.name == CURSOR, EventCursor.last_id == old)
            .values(
                last_id=new, failures=0, retry_at=None, gap_since=None, detail=None, updated_at=now
            )
        )
    return cast(CursorResult[Any], moved).rowcount == 1


def _mark_gap(rt: Runtime, now: datetime) -> None:
    with rt.sessions.begin() as session:
        session.execute(
            update(EventCursor)
            .where(EventCursor.name == CURSOR, EventCursor.gap_since.is_(None))
            .values(gap_since=now, updated_at=now)
        )


def _failed(rt: Runtime, cursor: EventCursor, problem: str, now: datetime) -> None:
    failures = cursor.failures + 1
    wait = backoff(cursor.failures, RETRY_BASE_SECONDS, RETRY_CAP_SECONDS)
    with rt.sessions.begin() as session:
        session.execute(
            update(EventCursor)
            .where(EventCursor.name == CURSOR)
            .values(
                failures=failures,
                retry_at=now + timedelta(seconds=wait),
                detail=problem,
                updated_at=now,
            )
        )
        if failures >= ALERT_AFTER:
            alerts.record(
                session,
                AlertKind.EVENTS_WEBHOOK_FAILING,
                f"the events webhook failed {failures} times in a row: {problem}",
                now,
                quiet_for=timedelta(hours=1),
            )
    log.warning(
        "events webhook: POST after event %d failed (%d in a row), next try in %.0fs: %s",
        cursor.last_id,
        failures,
        wait,
        problem,
    )
