"""Bearer-token dependencies: a producer's token for /v1, an operator's for relay actions."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dispatcher.api.deps import RuntimeDep
from dispatcher.settings import Settings

_BEARER = HTTPBearer(auto_error=False)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


class Unauthorized(Exception):
    """Raised by the auth dependencies; answered with 401 and a Bearer challenge."""


class Forbidden(Exception):
    """An operator's endpoint with no operator token configured; answered with 403."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _known(token: str, tokens: tuple[str, ...]) -> bool:
    """Whether ``token`` is one of ``tokens`` (an empty token never matches)."""
    given = token.encode()
    # Compare against every token so timing says nothing about which one nearly matched.
    return any([hmac.compare_digest(given, t.encode()) for t in tokens]) and bool(given)


def _presented(creds: HTTPAuthorizationCredentials | None, tokens: tuple[str, ...]) -> bool:
    """Whether ``creds`` carry one of ``tokens``."""
    return _known(creds.credentials if creds else "", tokens)


def carries_a_token(authorization: str | None, settings: Settings) -> bool:
    """Whether an ``Authorization`` header value is a bearer token of a producer or an
    operator (read before the body, to choose how much of it to accept)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return _known(token.strip(), settings.api_tokens + settings.ops_tokens)


def producer_token(creds: BearerCredentials, rt: RuntimeDep) -> None:
    """Let the request through only with one of the producers' tokens (``API_TOKENS``)."""
    if not _presented(creds, rt.settings.api_tokens):
        raise Unauthorized()


def operator_token(creds: BearerCredentials, rt: RuntimeDep) -> None:
    """Let the request through only with an operator's token (``OPS_TOKENS``); 403 when no
    operator token is configured at all."""
    if not rt.settings.ops_tokens:
        raise Forbidden("no operator token is configured (OPS_TOKENS); use the CLI")
    if not _presented(creds, rt.settings.ops_tokens):
        raise Unauthorized()


def caller(creds: BearerCredentials) -> str:
    """Who made the request, for the records that say so: the fingerprint of the bearer
    token (never the token itself)."""
    given = creds.credentials.encode() if creds else b""
    return "token:" + hashlib.sha256(given).hexdigest()[:12]


Caller = Annotated[str, Depends(caller)]
