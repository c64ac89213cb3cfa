"""The agent's pages under /portal: usage this month, the subscription (upgrade, downgrade,
cancel, each confirmed first) and its orders, campaigns with live progress, a contact's
timeline. Reached through a portal link; every form carries the session's token."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from dispatcher import users
from dispatcher.campaigns import control
from dispatcher.credits import notices, plans, subscriptions
from dispatcher.credits.quota import THRESHOLDS
from dispatcher.credits.subscriptions import Action, CreditsView
from dispatcher.errors import InvalidInput
from dispatcher.models import CampaignStatus
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime
from dispatcher.users import UserView
from dispatcher.web import sessions
from dispatcher.web.render import (
    HEADERS,
    PageRoute,
    form_fields,
    page,
    plain_parameters,
    runtime,
)
from dispatcher.web.sessions import AGENT, FORM_TOKEN, Refused, Session

router = APIRouter(
    route_class=PageRoute, include_in_schema=False, dependencies=[Depends(plain_parameters)]
)

#: Campaign statuses whose progress still moves (the page keeps polling).
LIVE = (CampaignStatus.RESERVING.value, CampaignStatus.RUNNING.value)

#: The campaign actions a page offers.
CAMPAIGN_ACTIONS = ("pause", "resume", "cancel")


def _agent(request: Request) -> Session:
    rt = runtime(request)
    found = sessions.read(rt.settings, AGENT, request.cookies.get(AGENT.cookie), rt.clock.now())
    if found is None:
        raise Refused(
            401,
            "Your session has ended",
            "Open the link to your Command Email pages from Command again.",
        )
    return found


Agent = Annotated[Session, Depends(_agent)]
Fields = Annotated[dict[str, str], Depends(form_fields)]


def _producer(request: Request) -> Producer:
    producer: Producer = request.app.state.producer
    return producer


def _checked(request: Request, agent: Session, fields: dict[str, str]) -> None:
    agent.check_form(runtime(request).settings, fields.get(FORM_TOKEN))


def _render(request: Request, agent: Session, template: str, **context: Any) -> HTMLResponse:
    rt = runtime(request)
    status = context.pop("status", 200)
    return page(
        request,
        template,
        status,
        agent=agent.subject,
        form_token=agent.form_token(rt.settings),
        form_token_name=FORM_TOKEN,
        **context,
    )


def _user(rt: Runtime, user_id: str) -> UserView:
    with rt.sessions() as session:
        return users.view(users.get_user(session, user_id))


def _period(credits: CreditsView) -> dict[str, Any]:
    """The period's first and last day in the agent's zone, and the zone's name."""
    return {
        "first_day": credits.period_start,
        "last_day": credits.period_end - timedelta(days=1),
        "zone": str(credits.period_start.tzinfo),
    }


@router.get("/portal/enter/{token}")
def enter(token: str, request: Request) -> RedirectResponse:
    """Open a portal link: a session for its agent, then the usage page."""
    rt = runtime(request)
    now = rt.clock.now()
    user_id = sessions.open_link(rt.settings, token, now)
    _producer(request).credits(user_id)  # the agent exists (else: not found)
    value, _ = sessions.start(rt.settings, AGENT, user_id, now)
    response = RedirectResponse("/portal", status_code=303, headers=HEADERS)
    response.set_cookie(
        value=value,
        max_age=rt.settings.portal_session_seconds,
        **sessions.cookie_options(rt.settings, AGENT),
    )
    return response


@router.get("/portal")
def usage(request: Request, agent: Agent) -> Response:
    """This month's usage: used, remaining, the meter with its notice marks, the period's
    dates in the agent's zone and the notices received."""
    rt = runtime(request)
    credits = subscriptions.credits(rt, agent.subject)
    received = notices.notifications(rt, agent.subject, limit=20).items
    share = credits.used / credits.total if credits.total else 1.0
    return _render(
        request,
        agent,
        "usage.html",
        credits=credits,
        percent=min(100.0, round(share * 100, 1)),
        marks=[t for t in THRESHOLDS if t < 100],
        notices=received,
        **_period(credits),
    )


def _subscription_context(rt: Runtime, user_id: str) -> dict[str, Any]:
    credits = subscriptions.credits(rt, user_id)
    catalog = list(plans.catalog(rt.settings).values())
    current = plans.plan(rt.settings, credits.plan)
    return {
        "credits": credits,
        "catalog": catalog,
        "current": current,
        # The free plan is reached by cancelling (now), not by a downgrade.
        "others": [p for p in catalog if p.paid and p.name != current.name],
        "next_first_day": credits.period_end,
        **_period(credits),
    }


@router.get("/portal/subscription")
def subscription(request: Request, agent: Agent, done: str | None = None) -> Response:
    """The plan, the available plans with credits and price, and the ways to change."""
    rt = runtime(request)
    context = _subscription_context(rt, agent.subject)
    return _render(request, agent, "subscription.html", done=done, **context)


def _action_for(current: plans.Plan, target: plans.Plan | None) -> Action:
    if target is None:
        return Action.CANCEL
    if target.monthly_credits > current.monthly_credits:
        return Action.UPGRADE
    if target.monthly_credits < current.monthly_credits:
        return Action.DOWNGRADE
    raise InvalidInput("plan", f"you are already on the {target.name} plan")


@router.get("/portal/subscription/confirm")
def confirm(
    request: Request,
    agent: Agent,
    plan: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    """What a change will do, in the help article's words, before it is made."""
    rt = runtime(request)
    context = _subscription_context(rt, agent.subject)
    if action == Action.CANCEL.value:
        target = None
        if not context["current"].paid:
            raise InvalidInput("action", "you are already on the free plan")
    elif plan:
        target = plans.plan(rt.settings, plan)
    else:
        raise InvalidInput("plan", "choose one of the available plans")
    act = _action_for(context["current"], target)
    free = plans.plan(rt.settings, plans.FREE)
    return _render(
        request,
        agent,
        "confirm.html",
        action=act.value,
        target=target or free,
        free=free,
        **context,
    )


@router.post("/portal/subscription")
def change(request: Request, agent: Agent, fields: Fields) -> RedirectResponse:
    """Make the confirmed change: an order's receipt next, else the subscription page."""
    _checked(request, agent, fields)
    action = fields.get("action", "")
    result = _producer(request).change_subscription(
        agent.subject, action, fields.get("plan") or None
    )
    if result.order is not None:
        target = f"/portal/orders/{result.order.number}?placed=1"
    else:
        target = f"/portal/subscription?done={result.action}"
    return RedirectResponse(target, status_code=303, headers=HEADERS)


@router.get("/portal/orders")
def orders(request: Request, agent: Agent) -> Response:
    """Every order of the agent, newest first, each with its receipt."""
    made = list(reversed(subscriptions.orders(runtime(request), agent.subject)))
    return _render(request, agent, "orders.html", orders=made)


@router.get("/portal/orders/{number}")
def receipt(number: str, request: Request, agent: Agent, placed: str | None = None) -> Response:
    """An order's receipt: its number, what was charged, the recurring subtotal and the
    credits; right after the order (``placed``), the agent's new total."""
    rt = runtime(request)
    order = subscriptions.order(rt, agent.subject, number)
    credits = subscriptions.credits(rt, agent.subject)
    user = _user(rt, agent.subject)
    return _render(
        request,
        agent,
        "receipt.html",
        order=order,
        credits=credits,
        plan=plans.plan(rt.settings, order.plan),
        emailed_to=user.platform_email or user.communications_email,
        placed=placed is not None,
    )


@router.get("/portal/campaigns")
def campaigns(request: Request, agent: Agent) -> Response:
    """The agent's campaigns, newest first."""
    listed = control.recent(runtime(request), user_id=agent.subject)
    return _render(request, agent, "campaigns.html", campaigns=listed)


def _progress(view: control.CampaignView) -> dict[str, Any]:
    return {
        "status": view.status,
        "recipients": view.recipients,
        "sent": view.counts["sent"],
        "failed": view.counts["failed"],
        "failed_by_reason": view.failed_by_reason,
        "unknown": view.counts["unknown"],
        "remaining": view.recipients - view.done,
        "percent": round(view.progress * 100, 1),
        "live": view.status in LIVE,
    }


def _actions(status: str) -> tuple[str, ...]:
    """What the campaign's page offers in its status."""
    if status in LIVE:
        return ("pause", "cancel")
    if status == CampaignStatus.PAUSED.value:
        return ("resume", "cancel")
    return ()


@router.get("/portal/campaigns/{campaign_id}")
def campaign(campaign_id: str, request: Request, agent: Agent) -> Response:
    """A campaign's progress (refreshed while it sends), with pause, resume and cancel."""
    view = control.view(runtime(request), campaign_id, agent.subject)
    return _render(
        request,
        agent,
        "campaign.html",
        campaign=view,
        progress=_progress(view),
        actions=_actions(view.status),
    )


@router.get("/portal/campaigns/{campaign_id}/progress")
def campaign_progress(campaign_id: str, request: Request, agent: Agent) -> JSONResponse:
    """The figures the campaign page refreshes itself with."""
    view = control.view(runtime(request), campaign_id, agent.subject)
    return JSONResponse(_progress(view), headers=HEADERS)


@router.post("/portal/campaigns/{campaign_id}/{action}")
def campaign_action(
    campaign_id: str, action: str, request: Request, agent: Agent, fields: Fields
) -> RedirectResponse:
    """Pause, resume or cancel the campaign, then back to its page."""
    _checked(request, agent, fields)
    rt = runtime(request)
    if action not in CAMPAIGN_ACTIONS:
        raise Refused(404, "Not found", f"A campaign cannot {action!r}.")
    if action == "pause":
        control.pause(rt, campaign_id, agent.subject)
    elif action == "resume":
        control.resume(rt, campaign_id, agent.subject, request.app.state.queue)
    else:
        control.cancel(rt, campaign_id, agent.subject)
    return RedirectResponse(f"/portal/campaigns/{campaign_id}", status_code=303, headers=HEADERS)


@router.get("/portal/contacts")
def contact(
    request: Request,
    agent: Agent,
    contact_id: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """A contact's timeline (newest first), found by the contact's id."""
    events = None
    if contact_id:
        events = _producer(request).timeline(agent.subject, contact_id, limit=100).items
    return _render(request, agent, "contact.html", contact_id=contact_id, events=events)
