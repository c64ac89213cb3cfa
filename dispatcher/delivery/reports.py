"""Reports about an email already sent, read from mail: delivery status notifications (DSN,
RFC 3464) and complaint feedback reports (ARF, RFC 5965).

Both are ``multipart/report`` messages: a DSN (``report-type=delivery-status``) carries a
``message/delivery-status`` part with one block per recipient (``Action``, ``Status``,
``Final-Recipient``, ``Diagnostic-Code``); a feedback report (``report-type=feedback-report``)
a ``message/feedback-report`` part (``Feedback-Type: abuse``). Either may attach the original
message or its headers, which is where a report sent to the plain bounce mailbox is matched
to its send (see :mod:`dispatcher.delivery.feedback`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_bytes, message_from_string
from email.message import Message
from email.policy import compat32

from dispatcher.models import FeedbackKind

#: Longest diagnostic kept (a relay's text can run long).
MAX_DETAIL = 500


@dataclass(frozen=True)
class Report:
    """What one report says about one recipient of one email."""

    kind: FeedbackKind
    source: str  # dsn | arf
    recipient: str | None  # the address it is about, when the report names it
    status: str | None  # the DSN status (5.1.1) or the feedback type (abuse)
    detail: str | None  # the diagnostic, for the timeline and the suppression entry
    #: Header fields of the original email the report attached (None: none attached).
    original: Message | None = None
    #: A relay's webhook: our Message-ID of the email, and its envelope sender, when given.
    message_id: str | None = None
    return_path: str | None = None


def parse(data: bytes) -> Report | None:
    """The report a message carries, or None when it is none (an auto-reply, a delivered or
    relayed notice): the most serious recipient block of a DSN, the feedback of an ARF."""
    message = message_from_bytes(data, policy=compat32)
    if message.get_content_type() != "multipart/report":
        return None
    report_type = str(message.get_param("report-type", "") or "").lower()
    parts = list(message.walk())
    original = _original(parts)
    if report_type == "delivery-status":
        return _dsn(parts, original)
    if report_type == "feedback-report":
        return _arf(parts, original)
    return None


def _dsn(parts: list[Message], original: Message | None) -> Report | None:
    """The first failed recipient block, else the first delayed one (our emails have one
    recipient each, so there is one block in practice)."""
    blocks = [
        b for p in parts if p.get_content_type() == "message/delivery-status" for b in _blocks(p)
    ]
    found: Report | None = None
    for block in blocks:
        action = block.get("Action", "").strip().lower()
        status = block.get("Status", "").strip().split(" ")[0] or None
        if action == "failed":
            kind = (
                FeedbackKind.SOFT_BOUNCE
                if status is not None and status.startswith("4.")
                else FeedbackKind.HARD_BOUNCE
            )
        elif action == "delayed":
            kind = FeedbackKind.SOFT_BOUNCE
        else:
            continue  # delivered, relayed, expanded: nothing went wrong
        report = Report(
            kind=kind,
            source="dsn",
            recipient=_address(block.get("Final-Recipient") or block.get("Original-Recipient")),
            status=status,
            detail=_text(block.get("Diagnostic-Code") or f"{action} {status or ''}".strip()),
            original=original,
        )
        if kind is FeedbackKind.HARD_BOUNCE:
            return report
        found = found or report
    return found


def _arf(parts: list[Message], original: Message | None) -> Report | None:
    """A complaint (``abuse``, and the other feedback types a provider may send for spam
    reports); ``not-spam`` and the authentication failure types are no complaint."""
    for part in parts:
        if part.get_content_type() != "message/feedback-report":
            continue
        fields = _fields(part)
        feedback = fields.get("Feedback-Type", "").strip().lower()
        if feedback not in {"abuse", "fraud", "virus", "other"}:
            return None
        recipient = _address(fields.get("Original-Rcpt-To"))
        if recipient is None and original is not None:
            recipient = _address(original.get("To"))
        return Report(
            kind=FeedbackKind.COMPLAINT,
            source="arf",
            recipient=recipient,
            status=feedback,
            detail=_text(f"reported as {feedback} by {fields.get('User-Agent', 'the provider')}"),
            original=original,
        )
    return None


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a ``message/delivery-status`` part: per-message, then one per
    recipient."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    # Sent base64 or quoted-printable, the part arrives as text: read its blocks ourselves.
    text = _decoded(part)
    return [message_from_string(chunk, policy=compat32) for chunk in re.split(r"\r?\n\r?\n", text)]


def _fields(part: Message) -> Message:
    """The header fields a ``message/feedback-report`` part carries."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    return message_from_string(_decoded(part), policy=compat32)


def _original(parts: list[Message]) -> Message | None:
    """The attached original (``message/rfc822``) or its headers (``text/rfc822-headers``)."""
    for part in parts:
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if kind == "text/rfc822-headers":
            return message_from_string(_decoded(part), policy=compat32)
    return None


def _decoded(part: Message) -> str:
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def _address(field: str | None) -> str | None:
    """``rfc822; person@example.org`` to ``person@example.org``."""
    if not field:
        return None
    value = field.partition(";")[2] if ";" in field else field
    value = value.strip().strip("<>").strip()
    return value.lower() if "@" in value else None


def _text(value: str | None) -> str | None:
    """One line of printable text, capped."""
    if not value:
        return None
    line = " ".join(value.split())
    return "".join(c for c in line if c.isprintable())[:MAX_DETAIL] or None
