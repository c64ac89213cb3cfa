"""Every exception the API answers, in one place: a Problem body ``{code, detail, field}``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatcher.api.auth import Forbidden, Unauthorized
from dispatcher.campaigns.control import CampaignStateError
from dispatcher.campaigns.create import InsufficientCredits, RequestInProgress, RequestKeyReused
from dispatcher.errors import InvalidInput, NotFound, QueueUnavailable, WebhookRefused

log = logging.getLogger(__name__)

#: The code of an HTTP error the framework raises (no route, wrong method, unreadable body).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


class FieldProblem(BaseModel):
    field: str | None = Field(description="The field at fault, as a dotted path.")
    detail: str


class Problem(BaseModel):
    """Every error answer: a machine-readable ``code``, a human ``detail`` and the ``field`` at
    fault (null when the request as a whole is); a refused input lists every bad field in
    ``errors``, the first of them in ``field``."""

    code: str = Field(description="Machine-readable reason, e.g. invalid_field, not_found.")
    detail: str = Field(description="What went wrong, for people; names the field.")
    field: str | None = Field(default=None, description="The field at fault, if one is.")
    errors: list[FieldProblem] | None = Field(
        default=None, description="Every field at fault (invalid input only)."
    )


#: The codes each status may carry, as the OpenAPI document lists them per operation.
_CODES_BY_STATUS = {
    400: "`bad_request`: the body could not be read",
    401: "`unauthorized`: no valid bearer token (a `WWW-Authenticate: Bearer` challenge); "
    "on a relay's webhook, `webhook_unauthorized`: its signature or credentials do not check",
    403: "`forbidden`: no operator token is configured (`OPS_TOKENS`)",
    404: "`not_found`: the user, send, campaign or other resource does not exist; "
    "`webhook_not_configured`: this deployment has no key for that relay's webhook",
    405: "`method_not_allowed`: the route does not take this method (see `Allow`)",
    409: "`insufficient_credits` (with `needed`, `remaining`, `total`), "
    "`idempotency_key_reused`, `request_in_progress` (with `Retry-After`) or `invalid_state`",
    413: "`request_too_large`: the body is larger than `MAX_REQUEST_BYTES` (64 KiB without a "
    "token); refused before it is read",
    422: "`invalid_field` (every bad field in `errors`, the first in `field`; a list's "
    "`cursor` it did not hand out, or a `limit` out of range, names that parameter) or "
    "`invalid_json` (where the body stops being JSON)",
    500: "`internal_error`: something unforeseen; it was logged",
    503: "`queue_unavailable` (stored but not queued), `redis_unavailable` or "
    "`database_unavailable` (also a statement or lock wait that ran out): repeat the request "
    "after `Retry-After`",
}


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of an operation, for its ``responses``: a Problem each, described
    by the codes it may carry."""
    return {s: {"model": Problem, "description": _CODES_BY_STATUS[s]} for s in statuses}


def _utf8(text: str) -> str:
    """``text`` with any lone surrogate escaped, so the answer always encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def problem_body(
    code: str,
    detail: str,
    field: str | None = None,
    errors: Sequence[tuple[str | None, str]] | None = None,
) -> dict[str, Any]:
    """A Problem's members; ``errors`` as (field, detail) pairs."""
    body: dict[str, Any] = {
        "code": code,
        "detail": _utf8(detail),
        "field": None if field is None else _utf8(field),
    }
    if errors is not None:
        body["errors"] = [
            {"field": None if f is None else _utf8(f), "detail": _utf8(d)} for f, d in errors
        ]
    return body


def problem(
    status: int,
    code: str,
    detail: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[tuple[str | None, str]] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A Problem response; ``errors`` as (field, detail) pairs; ``extra`` members go beside."""
    return JSONResponse(
        problem_body(code, detail, field, errors) | extra, status_code=status, headers=headers
    )


def refusal(
    exc: InvalidInput | NotFound | ValidationError, within: str
) -> tuple[int, dict[str, Any]]:
    """The status and Problem of one item of a batch that ``exc`` refused, as the item alone
    would have been answered, its fields named inside the batch (``within``: ``sends[3]``)."""
    if isinstance(exc, NotFound):
        return 404, problem_body("not_found", str(exc))
    if isinstance(exc, InvalidInput):
        found = [(f"{within}.{p.field}", f"{within}.{p.field}: {p.problem}") for p in exc.all]
    else:
        found = _shape_errors(exc.errors(), within)
    return 422, problem_body("invalid_field", found[0][1], found[0][0], errors=found)


async def _unauthorized(_r: Request, _e: Unauthorized) -> JSONResponse:
    return problem(
        401,
        "unauthorized",
        "a valid bearer token is required",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _webhook_refused(_r: Request, exc: WebhookRefused) -> JSONResponse:
    log.warning("%s webhook refused: %s", exc.provider, exc.problem)
    if not exc.configured:
        return problem(404, "webhook_not_configured", str(exc), "provider")
    return problem(401, "webhook_unauthorized", str(exc), "signature")


async def _forbidden(_r: Request, exc: Forbidden) -> JSONResponse:
    return problem(403, "forbidden", exc.detail)


async def _invalid(_r: Request, exc: InvalidInput) -> JSONResponse:
    found = [(p.field, f"{p.field}: {p.problem}") for p in exc.all]
    return problem(422, "invalid_field", found[0][1], exc.field, errors=found)


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
    return problem(
        409,
        "insufficient_credits",
        str(exc),
        needed=exc.needed,
        remaining=exc.remaining,
        total=exc.total,
    )


async def _key_reused(_r: Request, exc: RequestKeyReused) -> JSONResponse:
    return problem(409, "idempotency_key_reused", str(exc), exc.field)


async def _in_progress(_r: Request, exc: RequestInProgress) -> JSONResponse:
    return problem(409, "request_in_progress", str(exc), headers={"Retry-After": "2"})


async def _state(_r: Request, exc: CampaignStateError) -> JSONResponse:
    return problem(409, "invalid_state", str(exc))


def _field(loc: Sequence[int | str]) -> str:
    """Pydantic's location as the API names fields: ``recipients[3].fields.first_name``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


async def _shape(_r: Request, exc: RequestValidationError) -> JSONResponse:
    """The request's shape is wrong: the body is not JSON (where, by line and column), or
    fields are missing, unknown or of the wrong type (every one named; the first in ``field``)."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return problem(422, "invalid_json", _json_detail(first, exc.body), "body")
    found = _shape_errors(errors)
    return problem(422, "invalid_field", found[0][1], found[0][0], errors=found)


def _shape_errors(errors: Sequence[Any], within: str = "") -> list[tuple[str, str]]:
    """Pydantic's errors as (field, detail) pairs, each field named from ``within``."""
    found = []
    for error in errors:
        loc = [p for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        field = _field(loc)
        if within:
            field = within if field == "body" else within + ("" if field[0] == "[" else ".") + field
        found.append((field, f"{field}: {error.get('msg', 'invalid')}"))
    return found


def _json_detail(error: dict[str, Any], doc: object) -> str:
    """Why the body is not JSON, at which line and column."""
    why = error.get("ctx", {}).get("error", "malformed")
    loc = error.get("loc", ())
    at = loc[-1] if loc and isinstance(loc[-1], int) else None
    if at is None or not isinstance(doc, str):
        return f"the body is not valid JSON: {why}"
    line = doc.count("\n", 0, at) + 1
    column = at - (doc.rfind("\n", 0, at) + 1) + 1
    return f"the body is not valid JSON: {why} at line {line}, column {column} (char {at})"


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """An HTTP error of the framework's own: no such route (404), a method the route does not
    take (405, with ``Allow``), a body that cannot be read (400)."""
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such resource: {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    elif exc.status_code == 400:
        detail = f"the request body could not be read: {detail}"
    field = "body" if exc.status_code in (400, 413) else None
    return problem(exc.status_code, code, detail, field, headers=exc.headers)


async def _unexpected(_r: Request, exc: Exception) -> JSONResponse:
    """Anything unforeseen: logged with its traceback, answered 500 without internals."""
    log.error("unexpected error answering a request", exc_info=exc)
    return problem(500, "internal_error", "an unexpected error occurred; it has been logged")


_HANDLERS: tuple[tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]], ...] = (
    (Unauthorized, _unauthorized),
    (Forbidden, _forbidden),
    (WebhookRefused, _webhook_refused),
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
    (StarletteHTTPException, _http),
    (Exception, _unexpected),
)


def install(app: FastAPI) -> None:
    """Answer every exception above on ``app`` with its response."""
    for exc, handler in _HANDLERS:
        app.exception_handler(exc)(handler)
