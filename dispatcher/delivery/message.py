"""Standards-correct MIME messages: SMTP policy, Date, deterministic Message-ID, text + HTML."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime

from dispatcher.delivery.rendering import Rendered


def message_id_for(idempotency_key: str, domain: str) -> str:
    """The Message-ID of a send: derived from its idempotency key, so a duplicate is visible."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:40]
    return f"<{digest}@{domain}>"


@dataclass(frozen=True)
class Envelope:
    """What the SMTP conversation carries besides the message bytes."""

    mail_from: str
    recipients: tuple[str, ...]

    @property
    def smtputf8(self) -> bool:
        """Whether an address has non-ASCII characters (before the @: domains are punycode),
        so the conversation needs the relay's SMTPUTF8 (RFC 6531)."""
        return not (self.mail_from.isascii() and all(r.isascii() for r in self.recipients))


def build_message(
    rendered: Rendered,
    *,
    from_address: str,
    from_name: str | None,
    to_address: str,
    reply_to: str | None,
    message_id: str,
    date: datetime,
    extra_headers: dict[str, str] | None = None,
) -> EmailMessage:
    """A multipart/alternative message (text first, HTML preferred) under the SMTP policy, or
    its UTF-8 variant (RFC 6532 headers) for a recipient whose address is not ASCII."""
    msg = EmailMessage(policy=SMTP if to_address.isascii() else SMTPUTF8)
    msg["From"] = _address(from_address, from_name)
    msg["To"] = _address(to_address, None)
    if reply_to:
        msg["Reply-To"] = _address(reply_to, None)
    msg["Subject"] = rendered.subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = message_id
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg.set_content(rendered.text, subtype="plain", charset="utf-8")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8")
    return msg


def _address(addr: str, display_name: str | None) -> Address:
    local, _, domain = addr.rpartition("@")
    return Address(display_name=display_name or "", username=local, domain=domain)
