"""The operators' pages under /ops, behind a login with an ``ops`` token: queues and work in
flight (the figures of ``dispatcher status``), the relay with resume, alerts, running
campaigns, and an agent's suppression list with search."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from dispatcher import alerts, monitoring
from dispatcher.campaigns import control
from dispatcher.delivery import suppression
from dispatcher.errors import QueueUnavailable
from dispatcher.models import CampaignStatus
from dispatcher.ports import BrokerView, WorkerState, WorkersView
from dispatcher.tokens import client_for, operators_configured
from dispatcher.web import sessions
from dispatcher.web.render import (
    HEADERS,
    PageRoute,
    form_fields,
    page,
    plain_parameters,
    runtime,
)
from dispatcher.web.sessions import FORM_TOKEN, OPERATOR, Refused, Session

router = APIRouter(
    route_class=PageRoute, include_in_schema=False, dependencies=[Depends(plain_parameters)]
)

Fields = Annotated[dict[str, str], Depends(form_fields)]

#: Suppression entries shown on one page.
SUPPRESSIONS_SHOWN = 100


class LoginNeeded(Exception):
    """An operator's page was asked for without a session: answered with the login page."""


def _operator(request: Request) -> Session:
    rt = runtime(request)
    cookie = request.cookies.get(OPERATOR.cookie)
    found = sessions.read(rt.settings, OPERATOR, cookie, rt.clock.now())
    if found is None:
        raise LoginNeeded()
    return found


Operator = Annotated[Session, Depends(_operator)]


def _render(request: Request, operator: Session, template: str, **context: Any) -> HTMLResponse:
    rt = runtime(request)
    return page(
        request,
        template,
        operator=operator.subject,
        form_token=operator.form_token(rt.settings),
        form_token_name=FORM_TOKEN,
        **context,
    )


def login_page(request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
    """The login form (also the answer to an operator's page without a session)."""
    return page(request, "ops_login.html", status, error=error)


@router.get("/ops/login")
def login_form(request: Request) -> Response:
    """The operator's login form: an ``ops`` token."""
    return login_page(request)


@router.post("/ops/login")
def login(request: Request, fields: Fields) -> Response:
    """Exchange an ``ops`` token for a session."""
    rt = runtime(request)
    if not operators_configured(rt.settings):
        raise Refused(
            403,
            "Operator pages are off",
            "No operator token is configured (OPS_TOKENS); use the dispatcher CLI.",
        )
    client = client_for(fields.get("token", "").strip(), rt.settings)
    if client is None or "ops" not in client.scopes:
        return login_page(request, 401, "That is not an operator token.")
    value, _ = sessions.start(rt.settings, OPERATOR, client.name, rt.clock.now())
    response = RedirectResponse("/ops", status_code=303, headers=HEADERS)
    response.set_cookie(
        value=value,
        max_age=rt.settings.portal_session_seconds,
        **sessions.cookie_options(rt.settings, OPERATOR),
    )
    return response


@router.post("/ops/logout")
def logout(request: Request, operator: Operator, fields: Fields) -> RedirectResponse:
    """End the operator's session."""
    rt = runtime(request)
    operator.check_form(rt.settings, fields.get(FORM_TOKEN))
    response = RedirectResponse("/ops/login", status_code=303, headers=HEADERS)
    options = sessions.cookie_options(rt.settings, OPERATOR)
    response.delete_cookie(**options)
    return response


@router.get("/ops")
def overview(request: Request, operator: Operator, resumed: str | None = None) -> Response:
    """Queues, work in flight, the last minute's outcomes, the relay, alerts and the running
    campaigns."""
    rt = runtime(request)
    broker: BrokerView | None = request.app.state.broker
    snap = monitoring.snapshot(rt, broker)
    workers: list[WorkerState] = []
    workers_error: str | None = None
    if isinstance(broker, WorkersView) and snap.broker_error is None:
        try:
            workers = broker.workers()
        except QueueUnavailable as exc:
            workers_error = exc.detail
    finished = sorted(monitoring.finished_recently(rt).items())
    return _render(
        request,
        operator,
        "ops.html",
        snap=snap,
        workers={q.name: [w for w in workers if q.name in w.queues] for q in snap.queues},
        workers_asked=isinstance(broker, WorkersView),
        workers_error=workers_error,
        finished=[(f"{kind} {status}", n) for (kind, status), n in finished],
        relay=rt.relay.relay,
        alerts=alerts.recent(rt, limit=20).items,
        running=control.recent(rt, status=CampaignStatus.RUNNING),
        resumed=resumed,
    )


@router.post("/ops/relay/resume")
def resume_relay(request: Request, operator: Operator, fields: Fields) -> RedirectResponse:
    """Lift a halt on the relay (after its credentials were fixed)."""
    rt = runtime(request)
    operator.check_form(rt.settings, fields.get(FORM_TOKEN))
    lifted = rt.relay.resume()
    target = "/ops?resumed=" + ("lifted" if lifted else "not-halted")
    return RedirectResponse(target, status_code=303, headers=HEADERS)


@router.get("/ops/suppressions")
def suppressions(
    request: Request,
    operator: Operator,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    q: Annotated[str | None, Query(max_length=254)] = None,
) -> Response:
    """An agent's suppression list, optionally only the addresses containing ``q``."""
    entries = None
    if user_id:
        entries = suppression.listing(
            runtime(request), user_id, limit=SUPPRESSIONS_SHOWN, containing=q or None
        ).items
    return _render(
        request, operator, "ops_suppressions.html", user_id=user_id, q=q, entries=entries
    )
