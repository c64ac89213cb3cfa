"""The per-message return path (VERP): the envelope sender that names the send it belongs to.

Every campaign and SmartPlan email goes out with ``MAIL FROM:<bounce+<send>-<tag>@<domain>>``:
``<send>`` is the send's id (32 hex digits), ``<tag>`` an HMAC-SHA256 tag over it (80 bits,
base32), so a bounce or complaint that reaches the inbound SMTP server names its send, and a
forged or altered address names none. Lower case only: relays may change the case of the local
part. The local part is 56 characters (RFC 5321 allows 64).

``bounce@<domain>`` (no tag) is the plain bounce mailbox: reports that arrive there (a feedback
loop registered with a mailbox provider) are identified by a signed reference in the attached
original instead (see :mod:`dispatcher.delivery.feedback`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

from dispatcher import signing
from dispatcher.errors import InvalidInput
from dispatcher.settings import Settings

LOCAL = "bounce"
_PURPOSE = b"ced-return-path-v1:"
_TAG_BYTES = 10  # 16 base32 characters, no padding
_VERP = re.compile(rf"{LOCAL}\+([0-9a-f]{{32}})-([a-z2-7]{{16}})")


def domain(settings: Settings) -> str:
    """The platform's return-path domain: that of mail not sent as an agent on one of
    ``SENDER_DOMAINS`` (whose return paths are at their own domain, aligned with ``From``:
    :func:`dispatcher.delivery.identity.envelope_sender`)."""
    return settings.message_id_domain


def _ours(settings: Settings, host: str) -> bool:
    """Whether return paths at ``host`` are ours: the platform's domain, or a sending
    domain (whose ``bounce+...`` mail its owner routes to the inbound server)."""
    return host == domain(settings).lower() or host in {d.lower() for d in settings.sender_domains}


def _tag(settings: Settings, raw: bytes) -> str:
    key = signing.derive_key(settings.unsubscribe_secret, _PURPOSE)
    digest = hmac.new(key, _PURPOSE + raw, hashlib.sha256).digest()[:_TAG_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()


def address_for(settings: Settings, send_id: str, at: str | None = None) -> str:
    """The envelope sender of one send's email, at domain ``at`` (default :func:`domain`)."""
    raw = uuid.UUID(send_id)
    return f"{LOCAL}+{raw.hex}-{_tag(settings, raw.bytes)}@{at or domain(settings)}"


#: The metadata key our return path travels under to Postmark, which echoes only metadata
#: (``X-PM-Metadata-<key>`` fields, removed before delivery) in its webhooks.
POSTMARK_METADATA = "ced_return_path"


def relay_fields(settings: Settings, send_id: str) -> bytes:
    """Header fields of one copy that hand its return path to a relay that reports by
    metadata only: with ``POSTMARK_WEBHOOK_AUTH`` set (mail goes out through Postmark), the
    ``X-PM-Metadata-ced_return_path`` field; nothing otherwise."""
    if settings.postmark_webhook_auth is None:
        return b""
    field = f"X-PM-Metadata-{POSTMARK_METADATA}: {address_for(settings, send_id)}\r\n"
    return field.encode("ascii") if field.isascii() else b""


def mailbox(settings: Settings) -> str:
    """The plain bounce mailbox (feedback loops), without a send in it."""
    return f"{LOCAL}@{domain(settings)}"


@dataclass(frozen=True)
class ReturnPath:
    """An address of ours the inbound server takes reports at: ``send_id`` is None for the
    plain bounce mailbox."""

    send_id: str | None


def parse(settings: Settings, address: str) -> ReturnPath | None:
    """What ``address`` is: None when it is not a bounce address of ours (another mailbox,
    another domain); :class:`InvalidInput` on ``return_path`` when it looks like one but its
    tag does not match (forged or altered; compared in constant time)."""
    local, at, host = address.strip().strip("<>").lower().rpartition("@")
    if not at or not _ours(settings, host):
        return None
    if local == LOCAL:
        return ReturnPath(None)
    if not local.startswith(LOCAL + "+"):
        return None
    found = _VERP.fullmatch(local)
    if found is None:
        raise InvalidInput("return_path", "is not a return path of ours (malformed)")
    raw = bytes.fromhex(found[1])
    if not hmac.compare_digest(found[2], _tag(settings, raw)):
        raise InvalidInput("return_path", "is not valid (forged or altered)")
    return ReturnPath(str(uuid.UUID(bytes=raw)))
