"""Amazon SES notifications through Amazon SNS (``POST /v1/webhooks/ses``).

SNS signs every message (RFC: its "Verifying the signatures of Amazon SNS messages"): the
fields ``Message``, ``MessageId``, ``Subject`` (if present), ``Timestamp``, ``TopicArn`` and
``Type`` (a subscription confirmation: ``SubscribeURL`` and ``Token`` instead of ``Subject``),
each as its name and value on lines of their own, signed with RSA (``SignatureVersion`` 1:
SHA1, 2: SHA256) by the key of the certificate at ``SigningCertURL``. SNS signs every AWS
account's messages with the same certificates, so the topic must also be one of
``SES_TOPIC_ARNS``. The certificate is the one
in ``SES_SIGNING_CERT_FILE`` when set, else the one at that URL (HTTPS, an
``sns.<region>.amazonaws.com`` host only), fetched once per process.

The SES notification in ``Message`` (``notificationType``, or ``eventType`` for event
publishing) is a ``Bounce`` (``Permanent``: hard; ``Transient``: soft; ``Undetermined``: not
acted on) or a ``Complaint``, about the email whose envelope sender was ``mail.source`` (our
signed return path) and whose Message-ID was ``mail.commonHeaders.messageId``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import urllib.request
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dispatcher.delivery.reports import Report
from dispatcher.delivery.webhooks.common import Headers, address, fresh, json_body, text
from dispatcher.errors import InvalidInput, WebhookRefused
from dispatcher.models import FeedbackKind
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

NAME = "ses"
_CERT_URL = re.compile(r"https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[A-Za-z0-9_./-]+\.pem")
#: SNS re-sends a notification for up to an hour; older signed messages are refused.
MAX_AGE_SECONDS = 3600


def reports(settings: Settings, headers: Headers, body: bytes, now: datetime) -> list[Report]:
    """The bounces and complaints one SNS message carries, once its signature checked."""
    message = json_body(body)
    if not isinstance(message, dict):
        raise InvalidInput("body", "is not an SNS message (a JSON object)")
    if not settings.ses_topic_arns:
        raise WebhookRefused(NAME, "SES_TOPIC_ARNS is not set", configured=False)
    _verify(settings, message, now)
    if message.get("TopicArn") not in settings.ses_topic_arns:
        raise WebhookRefused(NAME, "the message is from a topic not in SES_TOPIC_ARNS")
    kind = message.get("Type")
    if kind == "SubscriptionConfirmation":
        # Confirming is ops' step (the URL in the log): nobody can subscribe us to a topic.
        log.info(
            "SNS subscription to confirm topic=%s url=%s",
            message.get("TopicArn"),
            message.get("SubscribeURL"),
        )
        return []
    if kind != "Notification":
        return []
    inner = json_body(str(message.get("Message", "")).encode())
    return _notification(inner) if isinstance(inner, dict) else []


def _notification(note: dict[str, Any]) -> list[Report]:
    what = note.get("notificationType") or note.get("eventType")
    mail = note.get("mail") or {}
    common = mail.get("commonHeaders") or {}
    source = mail.get("source") if isinstance(mail.get("source"), str) else None
    message_id = common.get("messageId") if isinstance(common.get("messageId"), str) else None
    found: list[Report] = []
    if what == "Bounce":
        bounce = note.get("bounce") or {}
        kind = {"Permanent": FeedbackKind.HARD_BOUNCE, "Transient": FeedbackKind.SOFT_BOUNCE}.get(
            str(bounce.get("bounceType"))
        )
        if kind is None:
            return []  # Undetermined: SES could not tell; nothing to act on
        for r in bounce.get("bouncedRecipients") or []:
            found.append(
                Report(
                    kind=kind,
                    source=NAME,
                    recipient=address(r.get("emailAddress")),
                    status=text(r.get("status")) or text(bounce.get("bounceSubType")),
                    detail=text(r.get("diagnosticCode"))
                    or text(f"{bounce.get('bounceType')} {bounce.get('bounceSubType')}"),
                    message_id=message_id,
                    return_path=source,
                )
            )
    elif what == "Complaint":
        complaint = note.get("complaint") or {}
        feedback = text(complaint.get("complaintFeedbackType")) or "abuse"
        for r in complaint.get("complainedRecipients") or []:
            found.append(
                Report(
                    kind=FeedbackKind.COMPLAINT,
                    source=NAME,
                    recipient=address(r.get("emailAddress")),
                    status=feedback,
                    detail=text(f"reported as {feedback} by {complaint.get('userAgent', 'SES')}"),
                    message_id=message_id,
                    return_path=source,
                )
            )
    return found


def _signed_text(message: dict[str, Any]) -> bytes:
    names: tuple[str, ...]
    if message.get("Type") in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        names = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
    else:
        names = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
    lines = []
    for name in names:
        if name == "Subject" and message.get(name) is None:
            continue
        value = message.get(name)
        if not isinstance(value, str):
            raise WebhookRefused(NAME, f"the signed field {name} is missing")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode()


def _verify(settings: Settings, message: dict[str, Any], now: datetime) -> None:
    version = message.get("SignatureVersion")
    algorithm: hashes.HashAlgorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(
        str(version), hashes.SHA256()
    )
    if str(version) not in ("1", "2"):
        raise WebhookRefused(NAME, f"unknown SignatureVersion {version!r}")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookRefused(NAME, "the Signature is not base64") from None
    key = _certificate(settings, str(message.get("SigningCertURL", ""))).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise WebhookRefused(NAME, "the signing certificate's key is not RSA")
    try:
        key.verify(signature, _signed_text(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise WebhookRefused(NAME, "the signature does not match the message") from None
    try:
        at = datetime.fromisoformat(str(message.get("Timestamp", "")).replace("Z", "+00:00"))
    except ValueError:
        raise WebhookRefused(NAME, "the Timestamp is not a time") from None
    if not fresh(at, now, MAX_AGE_SECONDS):
        raise WebhookRefused(NAME, "the message is too old (or from the future)")


def _certificate(settings: Settings, url: str) -> x509.Certificate:
    if settings.ses_signing_cert_file is not None:
        return _load(Path(settings.ses_signing_cert_file).read_bytes())
    if not _CERT_URL.fullmatch(url):
        raise WebhookRefused(NAME, "the SigningCertURL is not an Amazon SNS address")
    return _fetched(url)


@lru_cache(maxsize=16)
def _fetched(url: str) -> x509.Certificate:
    """The certificate at an SNS URL (checked by :data:`_CERT_URL`), once per process."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        return _load(answer.read(65_536))


def _load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise WebhookRefused(NAME, "the signing certificate cannot be read") from None
