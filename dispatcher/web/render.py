"""How a page is answered: Jinja2 templates from ``templates/web/`` (autoescaped), the
filters they use, the headers every page carries, the posted form, and the refusal page."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from fastapi import Request, Response
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from dispatcher import validation
from dispatcher.campaigns.control import CampaignStateError
from dispatcher.credits.subscriptions import money
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.runtime import Runtime
from dispatcher.web.sessions import Refused

#: Where the pages' stylesheet and script are served from (this server: no CDN).
ASSETS = "/assets/web"

#: Every page: its own origin only (no inline script; inline style attributes only, for the
#: meters' widths; no frame), never cached, and the
#: address (a portal link) never sent to another site.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def static_dir(templates_dir: str) -> Path:
    """The folder of the pages' stylesheet and script."""
    return Path(templates_dir) / "web" / "static"


def _day(value: datetime) -> str:
    return f"{value:%B} {value.day}, {value.year}"


def _moment(value: datetime, zone: str | tzinfo | None = None) -> str:
    if zone is not None:
        value = value.astimezone(ZoneInfo(zone) if isinstance(zone, str) else zone)
    return f"{value:%b} {value.day}, {value.year} {value:%H:%M} {value.tzname() or ''}".rstrip()


def _number(value: int) -> str:
    return f"{value:,}"


@lru_cache(maxsize=4)
def environment(templates_dir: str) -> Environment:
    """The pages' Jinja2 environment (autoescaped, an unknown name is an error)."""
    env = Environment(
        loader=FileSystemLoader(str(Path(templates_dir) / "web")),
        autoescape=select_autoescape(default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(money=money, day=_day, moment=_moment, number=_number)
    env.globals["assets"] = ASSETS
    return env


def runtime(request: Request) -> Runtime:
    """The runtime the application was built with."""
    rt: Runtime = request.app.state.runtime
    return rt


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context`` (and the request), with the pages' headers."""
    env = environment(runtime(request).settings.templates_dir)
    html = env.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def refusal(request: Request, refused: Refused) -> HTMLResponse:
    """The page that says why a page or a form was refused, and what to do."""
    return page(request, "refused.html", refused.status, title=refused.title, detail=refused.detail)


def plain_parameters(request: Request) -> None:
    """A page's path and query values follow the one-line text policy (a refusal names the
    value at fault)."""
    validation.plain_parameters([*request.path_params.items(), *request.query_params.multi_items()])


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a posted HTML form (``application/x-www-form-urlencoded``; the first
    value of a repeated field); anything else is refused (415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refused(415, "This form was refused", "It was not sent as a web form.")
    body = (await request.body()).decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for name, value in parse_qsl(body, keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


class PageRoute(APIRoute):
    """A page's route: what the use cases refuse (not found, invalid, a campaign that cannot
    do that now) is answered as a page, not as the API's JSON problem."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except NotFound as exc:
                raise Refused(
                    404, "Not found", f"There is no {exc.resource} {exc.identifier!r} here."
                ) from exc
            except InvalidInput as exc:
                raise Refused(422, "That could not be done", str(exc)) from exc
            except CampaignStateError as exc:
                raise Refused(409, "That could not be done now", str(exc)) from exc

        return answer
