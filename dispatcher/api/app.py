"""HTTP API under /v1: producers submit sends and manage users; ops read health and metrics."""

from __future__ import annotations

import hmac
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text

from dispatcher import __version__, alerts, sends
from dispatcher.alerts import AlertView
from dispatcher.campaigns import service as campaigns
from dispatcher.campaigns.service import (
    CampaignStateError,
    InsufficientCredits,
    RequestInProgress,
    RequestKeyReused,
)
from dispatcher.credits.notices import NotificationView
from dispatcher.credits.plans import Plan
from dispatcher.credits.subscriptions import ChangeResult, CreditsView
from dispatcher.delivery import suppression, unsubscribe
from dispatcher.delivery.suppression import SuppressionView
from dispatcher.delivery.timeline import EventView
from dispatcher.errors import InvalidInput, NotFound, QueueUnavailable
from dispatcher.models import Send
from dispatcher.ports import TaskQueue
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime
from dispatcher.sends import SendView
from dispatcher.users import UserView

log = logging.getLogger(__name__)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContactIn(_In):
    id: str = Field(description="The CRM's contact id.")
    email: str = Field(description="Recipient address.")
    fields: dict[str, Any] = Field(default_factory=dict, description="Merge fields.")


class SmartPlanIn(_In):
    plan_id: str
    run_id: str
    step_id: str


class MessageIn(_In):
    subject: str = Field(description="Jinja2 template of the subject line.")
    html: str = Field(description="Jinja2 template of the HTML body (autoescaped).")
    text: str | None = Field(default=None, description="Plain-text body; derived when absent.")


class SendIn(_In):
    user_id: str
    contact: ContactIn
    smartplan: SmartPlanIn
    message: MessageIn | None = None
    template: str | None = Field(default=None, description="A stored template's name.")
    from_name: str | None = None
    reply_to: str | None = None


class SendAccepted(BaseModel):
    # Kept: the answer joins the submit result (id, created) with the send's status.
    id: str
    status: str
    duplicate: bool = Field(description="True when this run+step+contact was already submitted.")


class MailchimpIn(_In):
    api_key: str | None = None
    list_id: str | None = None


class UserIn(_In):
    platform_email: str | None = None
    communications_email: str | None = None
    timezone: str | None = None
    plan: str | None = None
    mailchimp: MailchimpIn | None = None


class SubscriptionIn(_In):
    action: str = Field(description="upgrade, downgrade or cancel")
    plan: str | None = Field(default=None, description="Target plan (not for cancel).")


class RecipientIn(_In):
    id: str
    email: str
    fields: dict[str, Any] = Field(default_factory=dict)


class CampaignIn(_In):
    user_id: str
    provider: str = Field(default="command_email", description="command_email or mailchimp")
    name: str | None = None
    message: MessageIn
    recipients: list[RecipientIn]
    from_name: str | None = None
    reply_to: str | None = None
    idempotency_key: str | None = Field(
        default=None,
        description="The producer's key for this request (1-128 letters, digits or _.:@-): "
        "repeating the same request with it answers 200 with the campaign the first one "
        "created, without sending or charging again; another request with it is refused (409).",
    )


class SuppressionIn(_In):
    email: str
    reason: str = Field(default="manual", description="manual, unsubscribe or hard_bounce")
    expires_at: datetime | None = Field(default=None, description="None: until removed.")
    detail: str | None = None


class Problem(BaseModel):
    code: str
    detail: str
    field: str | None = None


def _problem(
    status: int,
    code: str,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"code": code, "detail": detail} | ({"field": field} if field else {})
    return JSONResponse(body, status_code=status, headers=headers)


class Unauthorized(Exception):
    """Raised by the auth dependency; answered with 401 and a Bearer challenge."""


class Forbidden(Exception):
    """An operator's endpoint with no operator token configured; answered with 403."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_BEARER = HTTPBearer(auto_error=False)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


def create_api(rt: Runtime, queue: TaskQueue) -> FastAPI:
    """The FastAPI application over ``rt``; sends are handed to ``queue`` after they commit."""
    app = FastAPI(
        title="Command Email dispatcher",
        version=__version__,
        description="Credits-aware email sending for SmartPlan steps and campaigns.",
        responses={401: {"model": Problem}, 422: {"model": Problem}},
    )
    tokens = [t.encode() for t in rt.settings.api_tokens]
    producer = Producer(rt, queue)

    def authorized(creds: BearerCredentials) -> None:
        given = creds.credentials.encode() if creds else b""
        # Compare against every token so timing says nothing about which one nearly matched.
        if not any([hmac.compare_digest(given, t) for t in tokens]) or not given:
            raise Unauthorized()

    auth = [Depends(authorized)]
    ops_tokens = [t.encode() for t in rt.settings.ops_tokens]

    def operator(creds: BearerCredentials) -> None:
        if not ops_tokens:
            raise Forbidden("no operator token is configured (OPS_TOKENS); use the CLI")
        given = creds.credentials.encode() if creds else b""
        if not any([hmac.compare_digest(given, t) for t in ops_tokens]) or not given:
            raise Unauthorized()

    ops_auth = [Depends(operator)]

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_r: Request, _e: Unauthorized) -> JSONResponse:
        return _problem(
            401,
            "unauthorized",
            "a valid bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(Forbidden)
    async def _forbidden(_r: Request, exc: Forbidden) -> JSONResponse:
        return _problem(403, "forbidden", exc.detail)

    @app.exception_handler(InvalidInput)
    async def _invalid(_r: Request, exc: InvalidInput) -> JSONResponse:
        return _problem(422, "invalid_field", f"{exc.field}: {exc.problem}", exc.field)

    @app.exception_handler(NotFound)
    async def _not_found(_r: Request, exc: NotFound) -> JSONResponse:
        return _problem(404, "not_found", str(exc))

    @app.exception_handler(QueueUnavailable)
    async def _queue_down(_r: Request, exc: QueueUnavailable) -> JSONResponse:
        log.error("broker did not take a task: %s", exc.detail)
        return _problem(
            503,
            "queue_unavailable",
            "the send is stored but could not be queued; repeat the request",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(InsufficientCredits)
    async def _short(_r: Request, exc: InsufficientCredits) -> JSONResponse:
        body = {
            "code": "insufficient_credits",
            "detail": str(exc),
            "needed": exc.needed,
            "remaining": exc.remaining,
            "total": exc.total,
        }
        return JSONResponse(body, status_code=409)

    @app.exception_handler(RequestKeyReused)
    async def _key_reused(_r: Request, exc: RequestKeyReused) -> JSONResponse:
        return _problem(409, "idempotency_key_reused", str(exc), exc.field)

    @app.exception_handler(RequestInProgress)
    async def _in_progress(_r: Request, exc: RequestInProgress) -> JSONResponse:
        return _problem(409, "request_in_progress", str(exc), headers={"Retry-After": "2"})

    @app.exception_handler(CampaignStateError)
    async def _state(_r: Request, exc: CampaignStateError) -> JSONResponse:
        return _problem(409, "invalid_state", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _shape(_r: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        return _problem(422, "invalid_field", f"{field}: {first.get('msg', 'invalid')}", field)

    @app.post(
        "/v1/sends",
        status_code=202,
        response_model=SendAccepted,
        dependencies=auth,
        responses={404: {"model": Problem}},
    )
    def post_send(body: SendIn) -> SendAccepted:
        """Submit one SmartPlan email; the same run + step + contact is accepted only once."""
        msg = body.message
        req = sends.SendRequest(
            user_id=body.user_id,
            contact_id=body.contact.id,
            contact_email=body.contact.email,
            smartplan_id=body.smartplan.plan_id,
            run_id=body.smartplan.run_id,
            step_id=body.smartplan.step_id,
            subject=msg.subject if msg else None,
            html=msg.html if msg else None,
            text=msg.text if msg else None,
            template=body.template,
            merge_fields=body.contact.fields,
            from_name=body.from_name,
            reply_to=body.reply_to,
        )
        result = producer.submit_send(req)
        status = producer.get_send(result.send_id).status
        return SendAccepted(id=result.send_id, status=status, duplicate=not result.created)

    @app.get(
        "/v1/sends/{send_id}",
        response_model=SendView,
        dependencies=auth,
        responses={404: {"model": Problem}},
    )
    def get_send(send_id: str, user_id: str | None = None) -> SendView:
        """A send's status and outcome (scoped to ``user_id`` when given)."""
        return producer.get_send(send_id, user_id)

    @app.put(
        "/v1/users/{user_id}",
        response_model=UserView,
        dependencies=auth,
        responses={201: {"model": UserView}},
    )
    def put_user(user_id: str, body: UserIn, response: Response) -> UserView:
        """Create or update an agent. The MailChimp key is stored and never returned."""
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

    @app.get(
        "/v1/contacts/{contact_id}/timeline", response_model=list[EventView], dependencies=auth
    )
    def get_timeline(
        contact_id: str,
        user_id: Annotated[str, Query(description="The agent whose timeline to read.")],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[EventView]:
        """The contact's events for this agent, newest first."""
        return producer.timeline(user_id, contact_id, limit)

    @app.get("/v1/plans", response_model=list[Plan], dependencies=auth)
    def get_plans() -> list[Plan]:
        """The plan catalog, smallest first; ``price_cents`` is the monthly price (0: free
        plan)."""
        return producer.plans()

    @app.post(
        "/v1/users/{user_id}/subscription",
        response_model=ChangeResult,
        dependencies=auth,
        responses={201: {"model": ChangeResult}},
    )
    def post_subscription(user_id: str, body: SubscriptionIn, response: Response) -> ChangeResult:
        """Upgrade (charged now, new credits at once), downgrade (from the next period) or
        cancel (free plan now). Answers 201 with the order when one was made."""
        result = producer.change_subscription(user_id, body.action, body.plan)
        response.status_code = 201 if result.order else 200
        return result

    @app.get("/v1/users/{user_id}/credits", response_model=CreditsView, dependencies=auth)
    def get_credits(user_id: str) -> CreditsView:
        """The user's current grant: plan, period in their zone (``period_end`` exclusive),
        total, used, remaining."""
        return producer.credits(user_id)

    @app.get(
        "/v1/users/{user_id}/notifications",
        response_model=list[NotificationView],
        dependencies=auth,
    )
    def get_notifications(
        user_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[NotificationView]:
        """In-app notifications, newest first."""
        return producer.notifications(user_id, limit)

    @app.post(
        "/v1/campaigns",
        status_code=202,
        response_model=campaigns.CampaignView,
        dependencies=auth,
        responses={404: {"model": Problem}, 409: {"model": Problem}},
    )
    def post_campaign(body: CampaignIn, response: Response) -> campaigns.CampaignView:
        """Start a campaign. Command Email: every valid recipient's credit is reserved at once
        (a campaign larger than the balance is refused whole, 409); invalid recipients are
        listed in ``invalid``, never sent or charged, and those on the agent's suppression list
        in ``suppressed``, skipped and never charged; ``recipients`` counts the valid ones, one
        send each. MailChimp: sent through the agent's account, no credits. ``replayed`` is true
        when this answers a repeat of an earlier request."""
        req = campaigns.CampaignRequest(
            user_id=body.user_id,
            provider=body.provider,
            name=body.name,
            subject=body.message.subject,
            html=body.message.html,
            text=body.message.text,
            recipients=[campaigns.Recipient(r.id, r.email, r.fields) for r in body.recipients],
            from_name=body.from_name,
            reply_to=body.reply_to,
            idempotency_key=body.idempotency_key,
        )
        created = producer.create_campaign(req)
        if created.replayed:
            response.status_code = 200
        return created

    @app.get(
        "/v1/campaigns/{campaign_id}", response_model=campaigns.CampaignView, dependencies=auth
    )
    def get_campaign(campaign_id: str, user_id: str | None = None) -> campaigns.CampaignView:
        """Status, counts by outcome and progress."""
        return campaigns.view(rt, campaign_id, user_id)

    @app.post(
        "/v1/campaigns/{campaign_id}/{action}",
        response_model=campaigns.CampaignView,
        dependencies=auth,
    )
    def campaign_action(
        campaign_id: str, action: str, user_id: str | None = None
    ) -> campaigns.CampaignView:
        """``pause`` (recipients in flight finish, nobody gets two copies), ``resume``, or
        ``cancel`` (unsent recipients fail as cancelled and their credits come back)."""
        if action == "pause":
            result = campaigns.pause(rt, campaign_id, user_id)
        elif action == "resume":
            result = campaigns.resume(rt, campaign_id, user_id, queue)
        elif action == "cancel":
            result = campaigns.cancel(rt, campaign_id, user_id)
        else:
            raise NotFound("campaign action", action)
        return result

    @app.get(
        "/v1/users/{user_id}/suppressions",
        response_model=list[SuppressionView],
        dependencies=auth,
    )
    def get_suppressions(
        user_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
    ) -> list[SuppressionView]:
        """Addresses this agent's emails skip (hard bounces, unsubscribes, manual entries in
        force), newest first."""
        return suppression.listing(rt, user_id, limit=limit)

    @app.post(
        "/v1/users/{user_id}/suppressions",
        status_code=201,
        response_model=SuppressionView,
        dependencies=auth,
    )
    def post_suppression(user_id: str, body: SuppressionIn) -> SuppressionView:
        """Suppress an address for this agent, optionally until ``expires_at``."""
        view = suppression.suppress(
            rt,
            user_id,
            body.email,
            reason=body.reason,
            expires_at=body.expires_at,
            detail=body.detail,
        )
        return view

    @app.delete("/v1/users/{user_id}/suppressions/{email}", status_code=204, dependencies=auth)
    def delete_suppression(user_id: str, email: str) -> Response:
        """Take an address off the agent's list."""
        suppression.remove(rt, user_id, email)
        return Response(status_code=204)

    @app.get("/v1/alerts", response_model=list[AlertView], dependencies=auth)
    def get_alerts(
        user_id: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[AlertView]:
        """Policy refusals (campaign paused) and refused relay credentials (sending halted),
        newest first."""
        return alerts.recent(rt, user_id=user_id, limit=limit)

    @app.post("/v1/relay/resume", dependencies=ops_auth, responses={403: {"model": Problem}})
    def resume_relay() -> dict[str, bool]:
        """Lift a halt on the SMTP relay (after the credentials were fixed). Needs an
        operator token (``OPS_TOKENS``), not a producer's; ``dispatcher relay resume`` does
        the same from a shell."""
        return {"resumed": rt.relay.resume()}

    @app.post("/u/{token}", include_in_schema=True, tags=["recipients"])
    def one_click_unsubscribe(token: str) -> Response:
        """RFC 8058 one-click unsubscribe: the POST a mailbox provider makes with
        ``List-Unsubscribe=One-Click``. No cookie or bearer token: the signed token is the
        authority. The contact is suppressed for the agent who sent the email."""
        unsubscribe.unsubscribe(rt, token)
        return PlainTextResponse("You are unsubscribed.\n")

    @app.get("/u/{token}", response_class=HTMLResponse, tags=["recipients"])
    def unsubscribe_page(token: str) -> HTMLResponse:
        """The page behind the link, for people: a button that makes the POST. Opening it
        changes nothing (link scanners open links)."""
        unsubscribe.send_id_of(rt.settings, token)
        return HTMLResponse(
            "<!doctype html><title>Unsubscribe</title>"
            f'<form method="post" action="/u/{token}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            "<p>Stop receiving these emails?</p><button>Unsubscribe</button></form>"
        )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Redis (quota store and broker) and the database are reachable."""
        checks: dict[str, str] = {}
        try:
            rt.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            with rt.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["database"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text: sends by status and the step-outcome stream length."""
        with rt.sessions() as session:
            rows = session.execute(select(Send.status, func.count()).group_by(Send.status)).all()
        lines = [
            "# HELP dispatcher_sends Sends by status.",
            "# TYPE dispatcher_sends gauge",
            *(f'dispatcher_sends{{status="{s.value}"}} {n}' for s, n in rows),
            "# HELP dispatcher_outcome_stream_length Entries on the step-outcome stream.",
            "# TYPE dispatcher_outcome_stream_length gauge",
            f"dispatcher_outcome_stream_length {rt.redis.xlen(rt.settings.outcome_stream)}",
        ]
        return "\n".join(lines) + "\n"

    return app
