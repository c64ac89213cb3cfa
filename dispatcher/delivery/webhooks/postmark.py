"""Postmark's bounce and spam complaint webhooks (``POST /v1/webhooks/postmark``).

Postmark secures a webhook with HTTP basic auth written into its URL
(``https://user:password@host/v1/webhooks/postmark``): ``POSTMARK_WEBHOOK_AUTH`` holds that
``user:password``, compared in constant time. A ``Bounce`` record (``Type`` ``HardBounce``,
``BadEmailAddress``: hard; ``SoftBounce``, ``Transient``, ``DnsError``: soft) or a
``SpamComplaint`` record is a report; Postmark names the email by its own ``MessageID``, so the
send is found by the ``ced_return_path`` metadata: our signed return path, which every email
carries as the ``X-PM-Metadata-ced_return_path`` field while ``POSTMARK_WEBHOOK_AUTH`` is set
(:func:`dispatcher.delivery.returnpath.relay_fields`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from datetime import datetime
from typing import Any

from dispatcher.delivery import returnpath
from dispatcher.delivery.reports import Report
from dispatcher.delivery.webhooks.common import Headers, address, json_body, text
from dispatcher.errors import InvalidInput, WebhookRefused
from dispatcher.models import FeedbackKind
from dispatcher.settings import Settings

NAME = "postmark"
METADATA = returnpath.POSTMARK_METADATA
_HARD = {"HardBounce", "BadEmailAddress"}
_SOFT = {"SoftBounce", "Transient", "DnsError"}


def reports(settings: Settings, headers: Headers, body: bytes, now: datetime) -> list[Report]:
    """The report one Postmark record is, once its credentials checked."""
    _verify(settings, headers)
    record = json_body(body)
    if not isinstance(record, dict):
        raise InvalidInput("body", "is not a Postmark webhook record (a JSON object)")
    found = _report(record)
    return [] if found is None else [found]


def _report(record: dict[str, Any]) -> Report | None:
    kind_of = str(record.get("RecordType"))
    bounce_type = str(record.get("Type"))
    if kind_of == "SpamComplaint" or bounce_type == "SpamComplaint":
        kind = FeedbackKind.COMPLAINT
    elif kind_of == "Bounce" and bounce_type in _HARD:
        kind = FeedbackKind.HARD_BOUNCE
    elif kind_of == "Bounce" and bounce_type in _SOFT:
        kind = FeedbackKind.SOFT_BOUNCE
    else:
        return None
    metadata = record.get("Metadata") if isinstance(record.get("Metadata"), dict) else {}
    path = metadata.get(METADATA) if isinstance(metadata, dict) else None
    return Report(
        kind=kind,
        source=NAME,
        recipient=address(record.get("Email")),
        status=bounce_type,
        detail=text(record.get("Details")) or text(record.get("Description")),
        return_path=path if isinstance(path, str) else None,
    )


def _verify(settings: Settings, headers: Headers) -> None:
    expected = settings.postmark_webhook_auth
    if expected is None:
        raise WebhookRefused(NAME, "POSTMARK_WEBHOOK_AUTH is not set", configured=False)
    scheme, _, value = headers.get("authorization", "").partition(" ")
    try:
        given = base64.b64decode(value, validate=True) if scheme.lower() == "basic" else b""
    except (binascii.Error, ValueError):
        given = b""
    if not hmac.compare_digest(given, expected.encode()):
        raise WebhookRefused(NAME, "the basic auth credentials do not match")
