"""The request size cap: an ASGI middleware in front of everything else (auth included) that
refuses a body larger than its limit with 413, by ``Content-Length`` before reading a byte, and
by counting the bytes of a body sent without one (chunked), reading no further than the limit."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dispatcher.api.auth import carries_a_token
from dispatcher.api.problems import problem
from dispatcher.settings import Settings

#: What a request without a producer's or operator's token may carry (the unsubscribe POST
#: carries a few bytes): a stranger cannot make the server hold ``MAX_REQUEST_BYTES`` of body.
ANONYMOUS_LIMIT = 64 * 1024
#: What a relay's webhook may carry (signed, not token-bearing): a SendGrid batch of events
#: or an SNS message with the original's headers runs past 64 KiB.
WEBHOOK_PREFIX = "/v1/webhooks/"
WEBHOOK_LIMIT = 1024 * 1024


def limit_for(headers: Headers, settings: Settings, path: str = "") -> int:
    """The largest body a request with these headers, to this path, may carry."""
    if carries_a_token(headers.get("authorization"), settings):
        return settings.request_limit
    if path.startswith(WEBHOOK_PREFIX):
        return min(WEBHOOK_LIMIT, settings.request_limit)
    return min(ANONYMOUS_LIMIT, settings.request_limit)


class BodySizeLimit:
    """Answers 413 (``request_too_large``) instead of letting the app read a body beyond
    :func:`limit_for`; the connection is closed after the answer, so the rest of the body is
    never read."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = limit_for(headers, self.settings, str(scope.get("path", "")))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        await _Counted(self.app, limit, receive, send).run(scope)


class _Counted:
    """One request whose body is counted as the app reads it."""

    def __init__(self, app: ASGIApp, limit: int, receive: Receive, send: Send) -> None:
        self.app = app
        self.limit = limit
        self.outer_receive = receive
        self.outer_send = send
        self.seen = 0
        self.refused = False
        self.started = False

    async def run(self, scope: Scope) -> None:
        await self.app(scope, self.receive, self.send)

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self.outer_receive()
        if message["type"] != "http.request":
            return message
        self.seen += len(message.get("body", b""))
        if self.seen <= self.limit:
            return message
        # Over the limit: answer now (the app is still reading, it has not answered), and
        # tell the app the client went away so it stops; whatever it answers is dropped.
        self.refused = True
        if not self.started:
            self.started = True
            await _refuse(self.outer_send, self.limit)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self.outer_send(message)


async def _refuse(send: Send, limit: int) -> None:
    """Send the 413 answer and ask the server to close the connection."""
    response = problem(
        413,
        "request_too_large",
        f"the request body is larger than {limit:,} bytes, the most this request may carry "
        f"(MAX_REQUEST_BYTES with a producer's token, {ANONYMOUS_LIMIT // 1024} KiB without, "
        f"{WEBHOOK_LIMIT // 1024} KiB to a relay's webhook)",
        headers={"Connection": "close"},
    )
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
