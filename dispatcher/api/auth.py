"""Who is calling, and what they may do: bearer tokens of named API clients with scopes, each
possibly limited to some agents (``API_CLIENTS``; ``API_TOKENS`` and ``OPS_TOKENS`` are
clients too). A request without a valid token is 401; a token without the route's scope is 403;
a token limited to some agents that names another agent finds nothing there (404)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dispatcher.api.deps import RuntimeDep
from dispatcher.errors import NotFound
from dispatcher.settings import Settings
from dispatcher.tokens import client_for, operators_configured

_BEARER = HTTPBearer(auto_error=False)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


class Unauthorized(Exception):
    """Raised by the auth dependencies; answered with 401 and a Bearer challenge."""


class Forbidden(Exception):
    """A token without the route's scope, or an operator's route with no operator token
    configured; answered with 403."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Caller:
    """The client a request came from."""

    name: str
    scopes: frozenset[str]
    users: frozenset[str] | None  # None: every agent

    def may_act_for(self, user_id: str) -> bool:
        return self.users is None or user_id in self.users

    def check_user(self, user_id: str) -> None:
        """Raise :class:`NotFound` for an agent this client may not act for: it must not even
        learn that the agent exists."""
        if not self.may_act_for(user_id):
            raise NotFound("user", user_id)


def carries_a_token(authorization: str | None, settings: Settings) -> bool:
    """Whether an ``Authorization`` header value is the bearer token of a client (read before
    the body, to choose how much of it to accept)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return client_for(token.strip(), settings) is not None


async def authenticated(creds: BearerCredentials, rt: RuntimeDep) -> None:
    """A router dependency: any client's valid token (401 before anything else is looked at;
    the route's scope is checked by :func:`scoped`)."""
    if client_for(creds.credentials if creds else "", rt.settings) is None:
        raise Unauthorized()


AUTHENTICATED = Depends(authenticated)


def scoped(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A route dependency: the caller, who must hold ``scope``. A ``user_id`` in the path or
    the query must be an agent the caller may act for (a body's is checked by the route).
    ``async`` (it never waits): run on the event loop, not handed to a thread."""

    async def dependency(request: Request, creds: BearerCredentials, rt: RuntimeDep) -> Caller:
        if scope == "ops" and not operators_configured(rt.settings):
            raise Forbidden("no operator token is configured (OPS_TOKENS); use the CLI")
        client = client_for(creds.credentials if creds else "", rt.settings)
        if client is None:
            raise Unauthorized()
        if scope not in client.scopes:
            raise Forbidden(f"the token of {client.name} does not have the scope {scope!r}")
        caller = Caller(client.name, client.scopes, client.users)
        named = request.path_params.get("user_id") or request.query_params.get("user_id")
        if named:
            caller.check_user(named)
        request.state.caller = caller.name
        return caller

    return dependency


#: The caller of a route that needs the scope (``Annotated[Caller, ...]`` for routes).
SendCaller = Annotated[Caller, Depends(scoped("smartplan:send"))]
CampaignCaller = Annotated[Caller, Depends(scoped("campaigns:write"))]
UsersCaller = Annotated[Caller, Depends(scoped("users:write"))]
BillingCaller = Annotated[Caller, Depends(scoped("billing"))]
ReadCaller = Annotated[Caller, Depends(scoped("read"))]
OpsCaller = Annotated[Caller, Depends(scoped("ops"))]
