"""/v1/campaigns: start a campaign, watch it, pause, resume or cancel it."""

from __future__ import annotations

from typing import Annotated, Any, NotRequired

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from dispatcher.api.auth import AUTHENTICATED, CampaignCaller, ReadCaller
from dispatcher.api.bodies import MessageIn, StrictBody
from dispatcher.api.campaign_body import CampaignBody, ReadsBodyFirst, body_text
from dispatcher.api.deps import PLAIN_PARAMETERS, ProducerDep, QueueDep, RuntimeDep
from dispatcher.api.pages import ENVELOPE, Cursor, Limit
from dispatcher.api.problems import answers
from dispatcher.campaigns import control, create, schedule
from dispatcher.errors import NotFound
from dispatcher.models import ExclusionKind, Provider
from dispatcher.pages import DEFAULT_LIMIT, Page

#: What a campaign can be told to do (an unknown action is 404, as an unknown route).
ACTIONS = ("pause", "resume", "cancel")

router = APIRouter(dependencies=[AUTHENTICATED, PLAIN_PARAMETERS], responses=answers(401, 403, 422))

#: The owner a campaign is read or changed for: another agent's campaign is not found.
Owner = Annotated[str, Query(description="The agent who owns the campaign.")]


class RecipientIn(TypedDict):
    """One recipient. A typed dict, not a model: a campaign's recipients are checked in place
    as the plain objects the JSON parser made (no model object per row), one at a time
    (:mod:`dispatcher.api.campaign_body`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    id: str
    email: str
    fields: NotRequired[dict[str, Any]]


SEND_AT = (
    "When to start the campaign (it is `scheduled` until then; beat starts it within a minute "
    "of this time, never before): an ISO 8601 instant with its offset "
    "(`2026-12-01T09:00:00-07:00`, `...Z`), or a local time without one "
    "(`2026-12-01T09:00:00`), read in the agent's time zone (their `timezone`). It must be in "
    "the future and at most `SCHEDULE_MAX_DAYS` (365) days ahead. Command Email: when it falls "
    "in the current month (agent's zone) the credits are reserved now (all or nothing, 409 if "
    "short); in a later month none are held now, and that month's credits are reserved when it "
    "starts (all or nothing: if the balance is then short the campaign fails, every recipient "
    "`quota_exhausted`). Leave it out to start now."
)


class CampaignIn(StrictBody):
    user_id: str
    provider: Provider = Field(
        default=Provider.COMMAND_EMAIL, description="Our SMTP path (credits) or MailChimp."
    )
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
    send_at: str | None = Field(default=None, description=SEND_AT)


_ROW = TypeAdapter(RecipientIn)
#: The body is read by :class:`CampaignBody`, not by FastAPI; the document says what it is.
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CampaignIn"}}},
    }
}
#: Request bodies the OpenAPI document describes without FastAPI reading them.
BODIES = (CampaignIn,)


def post_campaign(
    response: Response,
    producer: ProducerDep,
    caller: CampaignCaller,
    text: Annotated[str, Depends(body_text)],
) -> control.CampaignView:
    """Start a campaign. Command Email: every valid recipient's credit is reserved at once
    (a campaign larger than the balance is refused whole, 409); ``recipients`` counts the
    valid ones, one send each. A campaign of ``CAMPAIGN_COMPACT_FROM`` (10,000) valid
    recipients or more answers ``reserving``, its credits taken: its sends are written by a
    worker and it is ``running`` a few seconds later. ``invalid`` counts the recipients
    refused as invalid and ``suppressed`` those on the agent's suppression list: neither sent
    nor charged; which rows they were, and why, is listed a page at a time by ``GET
    /v1/campaigns/{id}/invalid`` and ``/suppressed`` (fetch them when a count is not 0).
    MailChimp: sent through the agent's account, no credits. ``replayed`` is true when this
    answers a repeat of an earlier request. With ``send_at`` it is ``scheduled`` until that
    time (``send_at`` in the answer, UTC). Scope ``campaigns:write``. The body is a
    ``CampaignIn``; its recipients are read one at a time, not held whole."""
    body = CampaignBody(text, CampaignIn, _ROW)
    head = body.validated()
    if head is None:
        raise body.refuse()
    assert isinstance(head, CampaignIn)
    caller.check_user(head.user_id)
    req = create.CampaignRequest(
        user_id=head.user_id,
        provider=head.provider.value,
        name=head.name,
        subject=head.message.subject,
        html=head.message.html,
        text=head.message.text,
        recipients=body.rows(),
        from_name=head.from_name,
        reply_to=head.reply_to,
        idempotency_key=head.idempotency_key,
        send_at=head.send_at,
    )
    created = producer.create_campaign(req)
    if created.replayed:
        response.status_code = 200
    return created


router.add_api_route(
    "/v1/campaigns",
    post_campaign,
    methods=["POST"],
    status_code=202,
    response_model=control.CampaignView,
    responses=answers(404, 409, 503),
    openapi_extra=_BODY_DOC,
    route_class_override=ReadsBodyFirst,
)


@router.get(
    "/v1/campaigns/{campaign_id}", response_model=control.CampaignView, responses=answers(404)
)
def get_campaign(
    campaign_id: str, rt: RuntimeDep, _caller: ReadCaller, user_id: Owner
) -> control.CampaignView:
    """Status, counts by outcome and progress: small whatever the campaign's size, to be
    polled. ``cancelled`` counts recipients failed because the campaign was cancelled (also
    in ``counts.failed`` and ``failed_by_reason``); ``invalid`` and ``suppressed`` are counts,
    their recipients are listed by ``/invalid`` and ``/suppressed``; ``missing_fields``
    counts, per merge field the message uses without a default, the recipients lacking it
    (sent with it empty). Scope ``read``."""
    return control.view(rt, campaign_id, user_id)


@router.get(
    "/v1/campaigns/{campaign_id}/invalid",
    response_model=Page[control.ExcludedView],
    responses=answers(404),
    description=(
        "The request's recipients refused as invalid (never sent, never charged), in request "
        "order: `index` is the row in `recipients` (from 0), `field` and `reason` say what "
        "is wrong with it. " + ENVELOPE
    ),
)
def get_invalid(
    campaign_id: str,
    rt: RuntimeDep,
    _caller: ReadCaller,
    user_id: Owner,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[control.ExcludedView]:
    """A page of the campaign's invalid recipients."""
    kind = ExclusionKind.INVALID
    return control.excluded(rt, campaign_id, kind, user_id, cursor=cursor, limit=limit)


@router.get(
    "/v1/campaigns/{campaign_id}/suppressed",
    response_model=Page[control.ExcludedView],
    responses=answers(404),
    description=(
        "The request's recipients skipped because their address was on the agent's "
        "suppression list (never sent, never charged), in request order: `index` is the row "
        "in `recipients`, `reason` the suppression entry's reason. " + ENVELOPE
    ),
)
def get_suppressed(
    campaign_id: str,
    rt: RuntimeDep,
    _caller: ReadCaller,
    user_id: Owner,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[control.ExcludedView]:
    """A page of the campaign's suppressed recipients."""
    kind = ExclusionKind.SUPPRESSED
    return control.excluded(rt, campaign_id, kind, user_id, cursor=cursor, limit=limit)


class MessageEdit(StrictBody):
    subject: str | None = Field(default=None, description="New subject template.")
    html: str | None = Field(default=None, description="New HTML body template.")
    text: str | None = Field(default=None, description="New plain-text body.")


class CampaignEdit(StrictBody):
    send_at: str | None = Field(
        default=None,
        description="New start time, as for `POST /v1/campaigns`. A campaign holding this "
        "month's credits can only move within this month (cancel and create it again to move "
        "it to another); one holding none can move to any time.",
    )
    message: MessageEdit | None = None
    name: str | None = None


@router.patch(
    "/v1/campaigns/{campaign_id}",
    response_model=control.CampaignView,
    responses=answers(404, 409),
)
def patch_campaign(
    campaign_id: str, body: CampaignEdit, rt: RuntimeDep, _caller: CampaignCaller, user_id: Owner
) -> control.CampaignView:
    """Change a scheduled campaign before it starts: ``send_at``, the message's subject and
    bodies, its name (fields left out stay as they are). 409 once it has started or was
    cancelled. Scope ``campaigns:write``."""
    message = body.message or MessageEdit()
    change = schedule.Edit(
        send_at=body.send_at,
        subject=message.subject,
        html=message.html,
        text=message.text,
        name=body.name,
    )
    return schedule.edit(rt, campaign_id, change, user_id)


@router.post(
    "/v1/campaigns/{campaign_id}/{action}",
    response_model=control.CampaignView,
    responses=answers(404, 409, 503),
)
def campaign_action(
    campaign_id: str,
    action: Annotated[
        str, Path(json_schema_extra={"enum": list(ACTIONS)}, description="What to do.")
    ],
    rt: RuntimeDep,
    queue: QueueDep,
    _caller: CampaignCaller,
    user_id: Owner,
) -> control.CampaignView:
    """``pause`` (recipients in flight finish, nobody gets two copies), ``resume``, or
    ``cancel`` (unsent recipients fail as cancelled and their credits come back; a scheduled
    campaign can be cancelled until it starts, every credit it holds back). Scope
    ``campaigns:write``."""
    if action == "pause":
        return control.pause(rt, campaign_id, user_id)
    if action == "resume":
        return control.resume(rt, campaign_id, user_id, queue)
    if action == "cancel":
        return control.cancel(rt, campaign_id, user_id)
    raise NotFound("campaign action", action)
