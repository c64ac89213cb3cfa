"""Values signed with HMAC-SHA256 under a secret from the environment, one key per purpose.

Each purpose (unsubscribe tokens, portal links, page sessions) names its own ``domain``: the
key is derived from the secret and the domain, and the domain is signed with the value, so a
value signed for one purpose is refused by every other. A signed set of claims is the
base64url of its JSON, a dot, and the base64url of its tag: readable, but not forgeable nor
alterable without the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

#: Used when no secret is configured (local runs and tests); it is in the source, so the
#: settings refuse a public deployment without a secret of its own.
DEVELOPMENT_SECRET = "command-email-development-unsubscribe-key"

#: The longest signed claims accepted (anything longer is refused before it is decoded).
MAX_SIGNED = 2048


@lru_cache(maxsize=16)
def derive_key(secret: str | None, domain: bytes) -> bytes:
    """The key of ``domain`` under ``secret`` (``UNSUBSCRIBE_SECRET``; the development secret
    when None, said once in the log)."""
    if secret is None:
        _warn_development()
    return hashlib.sha256(domain + (secret or DEVELOPMENT_SECRET).encode()).digest()


@lru_cache(maxsize=1)
def _warn_development() -> None:
    log.warning(
        "UNSUBSCRIBE_SECRET is not set: unsubscribe links, return paths, tracking links and "
        "portal links are signed with the development key; set it in production"
    )


def tag(key: bytes, domain: bytes, data: bytes, size: int = 32) -> bytes:
    """The first ``size`` bytes of the HMAC-SHA256 of ``domain`` and ``data`` under ``key``."""
    return hmac.new(key, domain + data, hashlib.sha256).digest()[:size]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str | None, domain: bytes, claims: dict[str, Any]) -> str:
    """``claims`` (JSON values) signed for ``domain``."""
    raw = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return f"{_b64(raw)}.{_b64(tag(derive_key(secret, domain), domain, raw))}"


def verify(secret: str | None, domain: bytes, signed: str) -> dict[str, Any] | None:
    """The claims ``signed`` carries when its tag is right for ``domain``; None when it was
    forged, altered, signed for another domain or is not a signed value at all (the tag is
    compared in constant time)."""
    if len(signed) > MAX_SIGNED or signed.count(".") != 1:
        return None
    body, given = signed.split(".")
    try:
        raw, got = _unb64(body), _unb64(given)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(got, tag(derive_key(secret, domain), domain, raw)):
        return None
    try:
        claims = json.loads(raw)
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None
