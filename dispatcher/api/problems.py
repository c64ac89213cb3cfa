"""Every exception the API answers, in one place: a Problem body ``{code, detail, field}``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from dispatcher.api.auth import Forbidden, Unauthorized
from dispatcher.campaigns.control import CampaignStateError
from dispatcher.campaigns.create import InsufficientCredits, RequestInProgress, RequestKeyReused
from dispatcher.errors import InvalidInput, NotFound, QueueUnavailable

log = logging.getLogger(__name__)


class Problem(BaseModel):
    code: str
    detail: str
    field: str | None = None


def problem(
    status: int,
    code: str,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A Problem response; ``field`` is left out of the body when there is none."""
    body = {"code": code, "detail": detail} | ({"field": field} if field else {})
    return JSONResponse(body, status_code=status, headers=headers)


async def _unauthorized(_r: Request, _e: Unauthorized) -> JSONResponse:
    return problem(
        401,
        "unauthorized",
        "a valid bearer token is required",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _forbidden(_r: Request, exc: Forbidden) -> JSONResponse:
    return problem(403, "forbidden", exc.detail)


async def _invalid(_r: Request, exc: InvalidInput) -> JSONResponse:
    return problem(422, "invalid_field", f"{exc.field}: {exc.problem}", exc.field)


async def _not_found(_r: Request, exc: NotFound) -> JSONResponse:
    return problem(404, "not_found", str(exc))


async def _queue_down(_r: Request, exc: QueueUnavailable) -> JSONResponse:
    log.error("broker did not take a task: %s", exc.detail)
    return problem(
        503,
        "queue_unavailable",
        "the send is stored but could not be queued; repeat the request",
        headers={"Retry-After": "5"},
    )


#: How long a client waits before repeating a request an outage refused.
OUTAGE_RETRY_AFTER = "5"


async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
    log.error("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    return problem(
        503,
        "redis_unavailable",
        "the credit store (Redis) is unavailable; repeat the request",
        headers={"Retry-After": OUTAGE_RETRY_AFTER},
    )


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: database unavailable: %s", request.method, request.url.path, exc)
    return problem(
        503,
        "database_unavailable",
        "the database is unavailable or did not answer in time; repeat the request",
        headers={"Retry-After": OUTAGE_RETRY_AFTER},
    )


async def _short(_r: Request, exc: InsufficientCredits) -> JSONResponse:
    # Not a plain Problem: the producer also learns the numbers to size a smaller campaign.
    body = {
        "code": "insufficient_credits",
        "detail": str(exc),
        "needed": exc.needed,
        "remaining": exc.remaining,
        "total": exc.total,
    }
    return JSONResponse(body, status_code=409)


async def _key_reused(_r: Request, exc: RequestKeyReused) -> JSONResponse:
    return problem(409, "idempotency_key_reused", str(exc), exc.field)


async def _in_progress(_r: Request, exc: RequestInProgress) -> JSONResponse:
    return problem(409, "request_in_progress", str(exc), headers={"Retry-After": "2"})


async def _state(_r: Request, exc: CampaignStateError) -> JSONResponse:
    return problem(409, "invalid_state", str(exc))


async def _shape(_r: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's first complaint, naming the field as ``contact.email`` (no body/query)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or "body"
    return problem(422, "invalid_field", f"{field}: {first.get('msg', 'invalid')}", field)


_HANDLERS: tuple[tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]], ...] = (
    (Unauthorized, _unauthorized),
    (Forbidden, _forbidden),
    (InvalidInput, _invalid),
    (NotFound, _not_found),
    (QueueUnavailable, _queue_down),
    (RedisError, _redis_down),
    # Connection refused or lost, statement or lock timeout: an outage, not a bug.
    (OperationalError, _database_down),
    (InterfaceError, _database_down),
    (SQLAlchemyTimeoutError, _database_down),
    (InsufficientCredits, _short),
    (RequestKeyReused, _key_reused),
    (RequestInProgress, _in_progress),
    (CampaignStateError, _state),
    (RequestValidationError, _shape),
)


def install(app: FastAPI) -> None:
    """Answer every exception above on ``app`` with its response."""
    for exc, handler in _HANDLERS:
        app.exception_handler(exc)(handler)
