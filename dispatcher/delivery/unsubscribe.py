"""One-click unsubscribe (RFC 8058): the bulk-sender headers on campaign and SmartPlan mail
and the signed, opaque token their link carries.

The token is the send's id and an HMAC-SHA256 tag over it, base64url-encoded: it names no
agent, contact or address, and cannot be forged or altered without the key
(``UNSUBSCRIBE_SECRET``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import uuid
from dataclasses import dataclass

from dispatcher import signing
from dispatcher.delivery import suppression, timeline
from dispatcher.errors import InvalidInput
from dispatcher.models import Send, SuppressionReason, TimelineKind
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

_TAG_BYTES = 16
_DOMAIN = b"ced-unsubscribe-v1:"


def _key(secret: str | None) -> bytes:
    return signing.derive_key(secret, _DOMAIN)


def _tag(key: bytes, send_id: bytes) -> bytes:
    return signing.tag(key, _DOMAIN, send_id, _TAG_BYTES)


def token_for(settings: Settings, send_id: str) -> str:
    """The opaque token for one recipient's copy of a campaign email."""
    raw = uuid.UUID(send_id).bytes
    return (
        base64.urlsafe_b64encode(raw + _tag(_key(settings.unsubscribe_secret), raw))
        .decode("ascii")
        .rstrip("=")
    )


def send_id_of(settings: Settings, token: str) -> str:
    """The send a token was made for; :class:`InvalidInput` for a forged, altered or
    malformed token (compared in constant time)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{40,64}", token):
        raise InvalidInput("token", "is not an unsubscribe token")
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput("token", "is not an unsubscribe token") from None
    raw, tag = data[:16], data[16:]
    if len(raw) != 16 or not hmac.compare_digest(tag, _tag(_key(settings.unsubscribe_secret), raw)):
        raise InvalidInput("token", "is not valid (forged or altered)")
    return str(uuid.UUID(bytes=raw))


def mailbox(settings: Settings) -> str:
    """The address of the ``List-Unsubscribe`` mailto (``UNSUBSCRIBE_MAILTO``, else
    ``unsubscribe@`` the Message-ID domain); ``dispatcher serve-unsubscribe`` receives it."""
    return settings.unsubscribe_mailto or f"unsubscribe@{settings.message_id_domain}"


def token_in(subject: str, body: str = "") -> str | None:
    """The token of an unsubscribe request by mail: ``unsubscribe <token>`` in the subject
    the mailto link sets (or, failing that, in the body), else None."""
    for text in (subject, body):
        found = _REQUEST.search(text)
        if found:
            return found[1]
    return None


_REQUEST = re.compile(r"\bunsubscribe\s+([A-Za-z0-9_-]{40,64})\b", re.IGNORECASE)


class BulkHeaders:
    """What a campaign's copies carry: the constant headers once, the link per recipient."""

    def __init__(self, constant: dict[str, str], settings: Settings) -> None:
        self.constant = constant
        self.settings = settings
        # Worked out once per campaign: this runs for every recipient of 100,000.
        self._base = settings.public_base_url.rstrip("/") + "/u/"
        self._mailto = "mailto:" + mailbox(settings)

    def for_send(self, send_id: str) -> tuple[str, bytes]:
        """One copy's visible unsubscribe link (its footer's) and its ``List-Unsubscribe``
        field, with the same token: the one-click HTTPS link, then the mailto; folded after
        the comma (both parts are ASCII)."""
        token = token_for(self.settings, send_id)
        link = self.link(token)
        field = f"List-Unsubscribe: <{link}>,\r\n <{self.mailto(token)}>\r\n".encode("ascii")
        return link, field

    def link(self, token: str) -> str:
        """The one-click HTTPS link for ``token``."""
        return self._base + token

    def mailto(self, token: str) -> str:
        """The mailto alternative for ``token``."""
        return f"{self._mailto}?subject=unsubscribe%20{token}"


def bulk_headers(settings: Settings, campaign_id: str, user_id: str) -> BulkHeaders:
    """``List-Unsubscribe-Post`` and ``List-Id`` (RFC 2919: the campaign's list, under the
    agent, in our domain), and the per-recipient ``List-Unsubscribe``."""
    agent = hashlib.sha256(user_id.encode()).hexdigest()[:12]
    return BulkHeaders(
        constant={
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "List-Id": f"<{campaign_id}.{agent}.{settings.message_id_domain}>",
        },
        settings=settings,
    )


def smartplan_headers(settings: Settings, smartplan_id: str, user_id: str) -> BulkHeaders:
    """The same bulk-sender headers for a SmartPlan's mail (a drip plan's mail is bulk mail
    too): ``List-Id`` names the plan under the agent, the link unsubscribes from the agent.
    The ``List-Unsubscribe`` field goes in as the bytes :meth:`BulkHeaders.for_send`
    makes: the email package would fold its long link into encoded words no provider reads."""
    plan = hashlib.sha256(smartplan_id.encode()).hexdigest()[:12]
    return bulk_headers(settings, f"plan-{plan}", user_id)


def origin(send: Send) -> str:
    """The email an unsubscribe (or a bounce, a complaint) came from, as the suppression list
    shows it."""
    if send.campaign_id is not None:
        return f"campaign {send.campaign_id}"
    return f"SmartPlan {send.smartplan_id} step {send.step_id}"


@dataclass(frozen=True)
class Unsubscribed:
    user_id: str
    contact_id: str


def unsubscribe(rt: Runtime, token: str, via: str = "one-click") -> Unsubscribed:
    """Suppress the contact a token was sent to, for the agent who sent it (idempotent);
    ``via`` says how the request came (``one-click``, ``mail``) in the entry's detail."""
    send_id = send_id_of(rt.settings, token)
    with rt.sessions.begin() as session:
        send = session.get(Send, send_id)
        if send is None:
            # A valid signature on a send we no longer have: nothing to suppress.
            raise InvalidInput("token", "refers to an email this service no longer knows")
        now = rt.clock.now()
        already = suppression.reason_for(session, send.user_id, send.contact_email, now)
        detail = f"{via} unsubscribe from {origin(send)}"
        suppression.add(
            session,
            send.user_id,
            send.contact_email,
            SuppressionReason.UNSUBSCRIBE,
            now,
            contact_id=send.contact_id,
            detail=detail,
        )
        if already != SuppressionReason.UNSUBSCRIBE:
            # On the contact's timeline (and so to the events webhook), once.
            session.add(
                timeline.about_send(
                    send,
                    TimelineKind.UNSUBSCRIBED,
                    now,
                    reason=SuppressionReason.UNSUBSCRIBE.value,
                    detail=detail,
                )
            )
        done = Unsubscribed(send.user_id, send.contact_id)
    log.info("contact unsubscribed user=%s contact=%s", done.user_id, done.contact_id)
    return done
