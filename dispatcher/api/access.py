"""One log line per API request: method, route, status, time and which client called (the name
of its token, never the token; ``-`` when there was none or it was not valid)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

log = logging.getLogger("dispatcher.api.access")


async def access_log(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """HTTP middleware: answer, then log the request by its route (``/v1/users/{user_id}/
    suppressions/{email}``, not the path itself nor its query: they may carry an address)."""
    started = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    log.info(
        "%s %s %d %.1fms client=%s",
        request.method,
        getattr(route, "path", "(no route)"),
        response.status_code,
        (time.perf_counter() - started) * 1000,
        getattr(request.state, "caller", "-"),
    )
    return response
