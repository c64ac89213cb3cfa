"""/v1/users and what hangs off an agent: plans, subscription, credits, notices, timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from dispatcher.api.auth import AUTHENTICATED, BillingCaller, Forbidden, ReadCaller, UsersCaller
from dispatcher.api.bodies import StrictBody
from dispatcher.api.deps import PLAIN_PARAMETERS, ProducerDep, RuntimeDep
from dispatcher.api.pages import ENVELOPE, Cursor, Limit
from dispatcher.api.problems import answers
from dispatcher.credits.notices import NotificationView
from dispatcher.credits.plans import Plan
from dispatcher.credits.subscriptions import Action, ChangeResult, CreditsView
from dispatcher.delivery.timeline import EventView
from dispatcher.errors import InvalidInput
from dispatcher.pages import DEFAULT_LIMIT, Page
from dispatcher.users import UserView, get_user
from dispatcher.web import sessions

router = APIRouter(dependencies=[AUTHENTICATED, PLAIN_PARAMETERS], responses=answers(401, 403, 422))


class MailchimpIn(StrictBody):
    api_key: str | None = None
    list_id: str | None = None


class UserIn(StrictBody):
    platform_email: str | None = None
    communications_email: str | None = None
    timezone: str | None = None
    plan: str | None = None
    mailchimp: MailchimpIn | None = None
    postal_address: str | None = Field(
        default=None,
        description=(
            "The agent's postal address, one line (e.g. '350 Main St, Austin, TX 78701'), shown "
            "in the footer of their mail; a Command Email campaign needs one. null removes it."
        ),
    )


class PortalLink(BaseModel):
    url: str = Field(description="Opens the agent's Command Email pages (a session cookie).")
    expires_at: datetime = Field(description="After this the link no longer opens them.")


class SubscriptionIn(StrictBody):
    action: Action = Field(
        description="upgrade (now, charged), downgrade (next period) or cancel (free plan now)"
    )
    plan: str | None = Field(default=None, description="Target plan (not for cancel).")


@router.put(
    "/v1/users/{user_id}",
    response_model=UserView,
    responses={201: {"model": UserView}, **answers(404)},
)
def put_user(
    user_id: str, body: UserIn, response: Response, producer: ProducerDep, _caller: UsersCaller
) -> UserView:
    """Create or update an agent. The MailChimp key is stored sealed and never returned.
    Scope ``users:write``."""
    fields = body.model_dump(exclude_unset=True)
    kwargs: dict[str, Any] = {k: v for k, v in fields.items() if k != "mailchimp"}
    if kwargs.get("timezone", "") is None:
        raise InvalidInput("timezone", "must be an IANA time zone name")
    if kwargs.get("plan", "") is None:
        raise InvalidInput("plan", "must be a plan name")
    if body.mailchimp is not None:
        for k, v in body.mailchimp.model_dump(exclude_unset=True).items():
            kwargs[f"mailchimp_{k}"] = v
    view, created = producer.upsert_user(user_id, **kwargs)
    response.status_code = 201 if created else 200
    return view


@router.get(
    "/v1/contacts/{contact_id}/timeline",
    response_model=Page[EventView],
    responses=answers(404),
    description="The contact's events for this agent, newest first. " + ENVELOPE,
)
def get_timeline(
    contact_id: str,
    user_id: Annotated[str, Query(description="The agent whose timeline to read.")],
    producer: ProducerDep,
    _caller: ReadCaller,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[EventView]:
    """A page of the contact's timeline."""
    return producer.timeline(user_id, contact_id, cursor=cursor, limit=limit)


@router.get(
    "/v1/plans",
    response_model=Page[Plan],
    description=(
        "The plan catalog, smallest first; `price_cents` is the monthly price (0: free). "
        + ENVELOPE
    ),
)
def get_plans(
    producer: ProducerDep, _caller: ReadCaller, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> Page[Plan]:
    """A page of the plan catalog."""
    return producer.plans(cursor=cursor, limit=limit)


@router.post(
    "/v1/users/{user_id}/subscription",
    response_model=ChangeResult,
    responses={201: {"model": ChangeResult}, **answers(404)},
)
def post_subscription(
    user_id: str,
    body: SubscriptionIn,
    response: Response,
    producer: ProducerDep,
    _caller: BillingCaller,
) -> ChangeResult:
    """Upgrade (charged now, new credits at once), downgrade (from the next period) or
    cancel (free plan now). Answers 201 with the order when one was made. Scope ``billing``."""
    result = producer.change_subscription(user_id, body.action.value, body.plan)
    response.status_code = 201 if result.order else 200
    return result


@router.get("/v1/users/{user_id}/credits", response_model=CreditsView, responses=answers(404))
def get_credits(user_id: str, producer: ProducerDep, _caller: ReadCaller) -> CreditsView:
    """The user's current grant: plan, period in their zone (``period_end`` exclusive),
    total, used, remaining. Scope ``read``."""
    return producer.credits(user_id)


@router.get(
    "/v1/users/{user_id}/notifications",
    response_model=Page[NotificationView],
    responses=answers(404),
    description="In-app notifications, newest first. " + ENVELOPE,
)
def get_notifications(
    user_id: str,
    producer: ProducerDep,
    _caller: ReadCaller,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[NotificationView]:
    """A page of the user's in-app notifications."""
    return producer.notifications(user_id, cursor=cursor, limit=limit)


#: What the agent's pages let the holder of a link do, so a client needs them all to make one.
PORTAL_SCOPES = frozenset({"billing", "campaigns:write"})


@router.post("/v1/users/{user_id}/portal-link", response_model=PortalLink, responses=answers(404))
def post_portal_link(user_id: str, rt: RuntimeDep, caller: BillingCaller) -> PortalLink:
    """A short-lived signed link to the agent's Command Email pages (usage, subscription and
    orders, campaigns, timelines), valid ``PORTAL_LINK_SECONDS``; opening it starts a session
    of ``PORTAL_SESSION_SECONDS``. The pages change the subscription and control campaigns,
    so scopes ``billing`` and ``campaigns:write``."""
    missing = PORTAL_SCOPES - caller.scopes
    if missing:
        raise Forbidden(f"the token of {caller.name} does not have the scope {min(missing)!r}")
    with rt.sessions() as session:
        get_user(session, user_id)
    url, expires = sessions.portal_link(rt.settings, user_id, rt.clock.now())
    return PortalLink(url=url, expires_at=expires)
