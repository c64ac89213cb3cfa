"""Mailgun's webhooks (``POST /v1/webhooks/mailgun``).

Each request carries ``signature`` {``timestamp``, ``token``, ``signature``}: the hex
HMAC-SHA256 of timestamp and token with the HTTP webhook signing key
(``MAILGUN_SIGNING_KEY``). ``event-data`` is a ``failed`` event (``severity`` ``permanent``:
hard; ``temporary``: soft) or a ``complained`` event, naming the email by its Message-ID
(``message.headers.message-id``) and recipient, and its envelope sender (our signed return path).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any

from dispatcher.delivery.reports import Report
from dispatcher.delivery.webhooks.common import Headers, address, fresh, json_body, text
from dispatcher.errors import InvalidInput, WebhookRefused
from dispatcher.models import FeedbackKind
from dispatcher.settings import Settings

NAME = "mailgun"


def reports(settings: Settings, headers: Headers, body: bytes, now: datetime) -> list[Report]:
    """The report one Mailgun event is, once its signature checked."""
    payload = json_body(body)
    if not isinstance(payload, dict):
        raise InvalidInput("body", "is not a Mailgun webhook (a JSON object)")
    _verify(settings, payload.get("signature"), now)
    event = payload.get("event-data")
    found = _report(event) if isinstance(event, dict) else None
    return [] if found is None else [found]


def _report(event: dict[str, Any]) -> Report | None:
    what, severity = event.get("event"), event.get("severity")
    if what == "complained":
        kind = FeedbackKind.COMPLAINT
    elif what == "failed" and severity == "permanent":
        kind = FeedbackKind.HARD_BOUNCE
    elif what == "failed" and severity == "temporary":
        kind = FeedbackKind.SOFT_BOUNCE
    else:
        return None
    status = event.get("delivery-status") or {}
    headers = (event.get("message") or {}).get("headers") or {}
    message_id = headers.get("message-id")
    sender = (event.get("envelope") or {}).get("sender")
    code = status.get("code")
    return Report(
        kind=kind,
        source=NAME,
        recipient=address(event.get("recipient")),
        status=text(code) if kind is not FeedbackKind.COMPLAINT else "abuse",
        detail=text(status.get("description")) or text(status.get("message")) or text(what),
        message_id=message_id if isinstance(message_id, str) else None,
        return_path=sender if isinstance(sender, str) else None,
    )


def _verify(settings: Settings, signature: Any, now: datetime) -> None:
    key = settings.mailgun_signing_key
    if key is None:
        raise WebhookRefused(NAME, "MAILGUN_SIGNING_KEY is not set", configured=False)
    if not isinstance(signature, dict):
        raise WebhookRefused(NAME, "the request is not signed")
    timestamp, token = str(signature.get("timestamp", "")), str(signature.get("token", ""))
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(signature.get("signature", "")), expected):
        raise WebhookRefused(NAME, "the signature does not match the request")
    if not timestamp.isdigit() or not fresh(float(timestamp), now):
        raise WebhookRefused(NAME, "the request's timestamp is too old (or from the future)")
