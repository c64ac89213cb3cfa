"""One log line per API request: method, route, status, time and which client called (the name
of its token, never the token; ``-`` when there was none or it was not valid)."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("dispatcher.api.access")


class AccessLog:
    """ASGI middleware: answer, then log the request by its route (``/v1/users/{user_id}/
    suppressions/{email}``, not the path itself nor its query: they may carry an address).

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs every request
    through an extra task and memory stream (about a millisecond each)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the application answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route: Any = scope.get("route")
            log.info(
                "%s %s %d %.1fms client=%s",
                scope["method"],
                getattr(route, "path", "(no route)"),
                status,
                (time.perf_counter() - started) * 1000,
                scope.get("state", {}).get("caller", "-"),
            )
