"""Who is looking at a page: an agent who opened a portal link, or an operator who logged in
with an ``ops`` token; and the token every form of their pages carries (CSRF).

A portal link carries the agent's id and when it expires, signed (``dispatcher.signing``) with
``UNSUBSCRIBE_SECRET`` under a key of its own; opening it in time starts a session. A session
is a signed cookie (HttpOnly, SameSite=Lax, Secure behind https) naming its subject, when it
ends and a random nonce; a form's token is a signature of that nonce, so it is bound to the
session and a page on another site cannot forge it. Times are the application clock's.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatcher import signing
from dispatcher.settings import Settings

LINK_DOMAIN = b"ced-portal-link-v1:"
FORM_DOMAIN = b"ced-page-form-v1:"

#: The name of a form's hidden field holding its token.
FORM_TOKEN = "csrf_token"


class Refused(Exception):
    """A page or form that is not answered: the status, a title and what to do about it."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


@dataclass(frozen=True)
class Kind:
    """A kind of session: its cookie, the path it is sent to and its signing domain."""

    cookie: str
    path: str
    domain: bytes


AGENT = Kind("ced_portal", "/portal", b"ced-portal-session-v1:")
OPERATOR = Kind("ced_ops", "/ops", b"ced-ops-session-v1:")


@dataclass(frozen=True)
class Session:
    """A signed-in person: the agent's id or the operator's client name."""

    subject: str
    nonce: str
    expires: int  # unix seconds

    def form_token(self, settings: Settings) -> str:
        """The token the forms of this session's pages carry."""
        key = signing.derive_key(settings.unsubscribe_secret, FORM_DOMAIN)
        raw = signing.tag(key, FORM_DOMAIN, self.nonce.encode(), 24)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def check_form(self, settings: Settings, given: str | None) -> None:
        """Refuse a form whose token is missing or is not this session's (403)."""
        if not given or not hmac.compare_digest(given.encode(), self.form_token(settings).encode()):
            raise Refused(
                403,
                "This form was refused",
                "It did not carry this session's security token, so it may not have come "
                "from this page. Nothing was changed. Reload the page and try again.",
            )


def portal_link(settings: Settings, user_id: str, now: datetime) -> tuple[str, datetime]:
    """The link to ``user_id``'s pages, and when it stops opening them."""
    expires = int(now.timestamp()) + settings.portal_link_seconds
    token = signing.sign(settings.unsubscribe_secret, LINK_DOMAIN, {"u": user_id, "x": expires})
    url = f"{settings.public_base_url.rstrip('/')}/portal/enter/{token}"
    return url, datetime.fromtimestamp(expires, tz=now.tzinfo)


def open_link(settings: Settings, token: str, now: datetime) -> str:
    """The agent a portal link was made for; :class:`Refused` when it was altered or forged
    (or is not a link at all) and when it expired."""
    claims = signing.verify(settings.unsubscribe_secret, LINK_DOMAIN, token)
    if claims is None or not isinstance(claims.get("u"), str) or not _int(claims.get("x")):
        raise Refused(
            403,
            "This link is not valid",
            "It was altered or was not made by Command Email. Open the link to your "
            "Command Email pages from Command again.",
        )
    if claims["x"] <= now.timestamp():
        raise Refused(
            403,
            "This link has expired",
            "Links to your Command Email pages work for a short time only. Open the link "
            "from Command again to get a new one.",
        )
    user_id: str = claims["u"]
    return user_id


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def start(settings: Settings, kind: Kind, subject: str, now: datetime) -> tuple[str, Session]:
    """A new session of ``subject``: the cookie's value and the session."""
    session = Session(
        subject=subject,
        nonce=secrets.token_urlsafe(18),
        expires=int(now.timestamp()) + settings.portal_session_seconds,
    )
    claims = {"s": session.subject, "n": session.nonce, "x": session.expires}
    return signing.sign(settings.unsubscribe_secret, kind.domain, claims), session


def read(settings: Settings, kind: Kind, cookie: str | None, now: datetime) -> Session | None:
    """The session a cookie holds, or None (no cookie, altered, another kind's, ended)."""
    if not cookie:
        return None
    claims = signing.verify(settings.unsubscribe_secret, kind.domain, cookie)
    if claims is None:
        return None
    subject, nonce, expires = claims.get("s"), claims.get("n"), claims.get("x")
    if not isinstance(subject, str) or not isinstance(nonce, str):
        return None
    if not isinstance(expires, int) or expires <= now.timestamp():
        return None
    return Session(subject=subject, nonce=nonce, expires=expires)


def cookie_options(settings: Settings, kind: Kind) -> dict[str, Any]:
    """How the session cookie of ``kind`` is set (and cleared): HttpOnly, SameSite=Lax, only
    on the pages of its kind, Secure when the dispatcher is served over https."""
    return {
        "key": kind.cookie,
        "path": kind.path,
        "httponly": True,
        "samesite": "lax",
        "secure": settings.public_base_url.startswith("https://"),
    }
