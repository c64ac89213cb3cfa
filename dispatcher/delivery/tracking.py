"""Open and click tracking (off by default: ``TRACK_OPENS``, ``TRACK_CLICKS``).

With it on, each copy's HTML gets a 1x1 image from ``PUBLIC_BASE_URL/t/o/<token>`` (an open,
when the recipient's mail program loads images) and its ``http(s)`` links point at
``PUBLIC_BASE_URL/t/c/<token>``, which records the click and redirects to the link's target.
Tokens are signed (HMAC-SHA256 under a key derived from ``UNSUBSCRIBE_SECRET``) and carry
the send and, for a click, the target: nothing to look up, and no redirect to an address we
did not sign (never an open redirect). The text part is left as it is.

What it costs recipients' privacy is in the README ("Open and click tracking").
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import uuid
from dataclasses import dataclass
from html import unescape

from dispatcher import signing
from dispatcher.errors import InvalidInput
from dispatcher.settings import Settings

_DOMAIN = b"ced-tracking-v1:"
_TAG_BYTES = 16
OPEN, CLICK = b"o", b"c"
#: A link the HTML carries: ``href="http..."`` or ``href='http...'``.
_HREF = re.compile(r"""(\bhref\s*=\s*)(["'])(https?://[^"'\s<>]+)\2""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
#: The 1x1 transparent GIF an open answers with.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@dataclass(frozen=True)
class Hit:
    """What a tracking token says: an open or a click of a send, and a click's target."""

    kind: str  # "open" or "click"
    send_id: str
    url: str | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _tag(settings: Settings, payload: bytes) -> bytes:
    key = signing.derive_key(settings.unsubscribe_secret, _DOMAIN)
    return signing.tag(key, _DOMAIN, payload, _TAG_BYTES)


def token(settings: Settings, kind: bytes, send_id: str, url: str = "") -> str:
    """A signed token for an open (``OPEN``) or a click on ``url`` (``CLICK``) of a send."""
    payload = kind + uuid.UUID(send_id).bytes + url.encode("utf-8")
    tag = _tag(settings, payload)
    return _b64(payload + tag)


def read(settings: Settings, given: str) -> Hit:
    """What a token says; :class:`InvalidInput` for a forged, altered or malformed one."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{44,4096}", given):
        raise InvalidInput("token", "is not a tracking token")
    try:
        data = base64.urlsafe_b64decode(given + "=" * (-len(given) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput("token", "is not a tracking token") from None
    payload, tag = data[:-_TAG_BYTES], data[-_TAG_BYTES:]
    if len(payload) < 17 or not hmac.compare_digest(tag, _tag(settings, payload)):
        raise InvalidInput("token", "is not valid (forged or altered)")
    kind, send_id = payload[:1], str(uuid.UUID(bytes=payload[1:17]))
    if kind == OPEN and len(payload) == 17:
        return Hit("open", send_id, None)
    if kind == CLICK and len(payload) > 17:
        return Hit("click", send_id, payload[17:].decode("utf-8"))
    raise InvalidInput("token", "is not a tracking token")


@dataclass(frozen=True)
class Tracker:
    """Instruments each copy's HTML as the settings ask (built once per batch)."""

    settings: Settings
    opens: bool
    clicks: bool

    @classmethod
    def of(cls, settings: Settings) -> Tracker:
        return cls(settings, settings.track_opens, settings.track_clicks)

    def html(self, html: str, send_id: str) -> str:
        """``html`` with its links through the click redirect and the open pixel, as on; the
        unsubscribe links stay direct (a recipient leaving is not a click)."""
        if not (self.opens or self.clicks):
            return html
        base = self.settings.public_base_url.rstrip("/")
        if self.clicks:
            own = f"{base}/u/"

            def through(m: re.Match[str]) -> str:
                target = unescape(m.group(3))
                if target.startswith(own):
                    return m.group(0)
                link = f"{base}/t/c/{token(self.settings, CLICK, send_id, target)}"
                return f"{m.group(1)}{m.group(2)}{link}{m.group(2)}"

            html = _HREF.sub(through, html)
        if self.opens:
            pixel = (
                f'<img src="{base}/t/o/{token(self.settings, OPEN, send_id)}" width="1" '
                'height="1" alt="" style="display:block;border:0;width:1px;height:1px">'
            )
            end = _BODY_END.search(html)
            html = html[: end.start()] + pixel + html[end.start() :] if end else html + pixel
        return html
