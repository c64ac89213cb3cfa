"""The pages joined to the API's application: their routers, their static files, the
answers to a refused page and to an operator's page without a session, and the addresses
people try first (/, /ui, /dashboard, /admin)."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from dispatcher.settings import Settings
from dispatcher.web import agent, operators
from dispatcher.web.render import ASSETS, HEADERS, page, refusal, static_dir
from dispatcher.web.sessions import Refused


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return refusal(request, exc)


async def _login_needed(request: Request, _exc: Exception) -> Response:
    return operators.login_page(request, 401)


def _home(request: Request) -> Response:
    """Where the pages are: the agent's come from a link, the operators' need a login."""
    return page(request, "home.html")


def _to(target: str) -> RedirectResponse:
    return RedirectResponse(target, status_code=307, headers=HEADERS)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the pages to ``app``."""
    app.include_router(agent.router)
    app.include_router(operators.router)
    app.add_api_route("/", _home, methods=["GET"], include_in_schema=False)
    for path, target in (("/ui", "/portal"), ("/dashboard", "/portal"), ("/admin", "/ops")):
        app.add_api_route(path, lambda t=target: _to(t), methods=["GET"], include_in_schema=False)
    app.mount(ASSETS, StaticFiles(directory=static_dir(settings.templates_dir)), name="web-assets")
    app.exception_handler(Refused)(_refused)
    app.exception_handler(operators.LoginNeeded)(_login_needed)
