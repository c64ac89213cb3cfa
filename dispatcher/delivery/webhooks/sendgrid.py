"""SendGrid's Event Webhook (``POST /v1/webhooks/sendgrid``).

A signed Event Webhook request carries ``X-Twilio-Email-Event-Webhook-Signature`` (base64 of an
ECDSA P-256 / SHA-256 signature) and ``X-Twilio-Email-Event-Webhook-Timestamp``; the signed
bytes are the timestamp followed by the raw body. The key is the verification key SendGrid shows
(``SENDGRID_WEBHOOK_PUBLIC_KEY``: base64 DER, or PEM).

The body is a JSON array of events: ``bounce`` (``type`` ``bounce``: hard; ``blocked``: soft)
and ``spamreport`` (a complaint) are reports; the rest (delivered, deferred, dropped, opens...)
are not. Each names the email by ``smtp-id`` (our Message-ID) and ``email`` (the recipient).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dispatcher.delivery.reports import Report
from dispatcher.delivery.webhooks.common import Headers, address, fresh, json_body, text
from dispatcher.errors import InvalidInput, WebhookRefused
from dispatcher.models import FeedbackKind
from dispatcher.settings import Settings

NAME = "sendgrid"
SIGNATURE = "x-twilio-email-event-webhook-signature"
TIMESTAMP = "x-twilio-email-event-webhook-timestamp"


def reports(settings: Settings, headers: Headers, body: bytes, now: datetime) -> list[Report]:
    """The bounces and complaints among a batch of events, once its signature checked."""
    _verify(settings, headers, body, now)
    events = json_body(body)
    if not isinstance(events, list):
        raise InvalidInput("body", "is not a list of SendGrid events")
    return [r for r in (_report(e) for e in events if isinstance(e, dict)) if r is not None]


def _report(event: dict[str, Any]) -> Report | None:
    what = event.get("event")
    if what == "bounce":
        kind = (
            FeedbackKind.SOFT_BOUNCE if event.get("type") == "blocked" else FeedbackKind.HARD_BOUNCE
        )
        status, detail = text(event.get("status")), text(event.get("reason"))
    elif what == "spamreport":
        kind, status, detail = FeedbackKind.COMPLAINT, "abuse", "reported as spam"
    else:
        return None
    message_id = event.get("smtp-id")
    return Report(
        kind=kind,
        source=NAME,
        recipient=address(event.get("email")),
        status=status,
        detail=detail,
        message_id=message_id if isinstance(message_id, str) else None,
    )


def _key(settings: Settings) -> ec.EllipticCurvePublicKey:
    configured = settings.sendgrid_webhook_public_key
    if configured is None:
        raise WebhookRefused(NAME, "SENDGRID_WEBHOOK_PUBLIC_KEY is not set", configured=False)
    try:
        if "BEGIN PUBLIC KEY" in configured:
            key = serialization.load_pem_public_key(configured.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(configured))
    except (ValueError, binascii.Error):
        raise WebhookRefused(NAME, "SENDGRID_WEBHOOK_PUBLIC_KEY is not a public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise WebhookRefused(NAME, "SENDGRID_WEBHOOK_PUBLIC_KEY is not an ECDSA key")
    return key


def _verify(settings: Settings, headers: Headers, body: bytes, now: datetime) -> None:
    key = _key(settings)
    signature, timestamp = headers.get(SIGNATURE), headers.get(TIMESTAMP)
    if not signature or not timestamp:
        raise WebhookRefused(NAME, "the request is not signed (no signature or timestamp)")
    try:
        key.verify(
            base64.b64decode(signature, validate=True),
            timestamp.encode() + body,
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, binascii.Error, ValueError):
        raise WebhookRefused(NAME, "the signature does not match the request") from None
    if not timestamp.isdigit() or not fresh(float(timestamp), now):
        raise WebhookRefused(NAME, "the request's timestamp is too old (or from the future)")
