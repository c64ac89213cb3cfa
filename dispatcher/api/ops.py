"""An agent's suppression list, alerts, and lifting a halt on the SMTP relay."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import Field

from dispatcher import alerts
from dispatcher.alerts import AlertView
from dispatcher.api.auth import AUTHENTICATED, OpsCaller, ReadCaller, UsersCaller
from dispatcher.api.bodies import StrictBody
from dispatcher.api.deps import PLAIN_PARAMETERS, RuntimeDep
from dispatcher.api.pages import ENVELOPE, Cursor, Limit
from dispatcher.api.problems import answers
from dispatcher.delivery import suppression
from dispatcher.delivery.suppression import RemovalView, SuppressionView
from dispatcher.models import SuppressionReason
from dispatcher.pages import DEFAULT_LIMIT, Page

router = APIRouter()
_PRODUCER = [AUTHENTICATED, PLAIN_PARAMETERS]
_ANSWERS = answers(401, 403, 404, 422)


class SuppressionIn(StrictBody):
    email: str
    reason: SuppressionReason = Field(default=SuppressionReason.MANUAL, description="Why.")
    expires_at: datetime | None = Field(default=None, description="None: until removed.")
    detail: str | None = None


@router.get(
    "/v1/users/{user_id}/suppressions",
    response_model=Page[SuppressionView],
    dependencies=_PRODUCER,
    responses=_ANSWERS,
    description=(
        "Addresses this agent's emails skip (hard bounces, unsubscribes, manual entries in "
        "force), newest first by when they were first added (a renewed entry keeps its "
        "place). " + ENVELOPE
    ),
)
def get_suppressions(
    user_id: str,
    rt: RuntimeDep,
    _caller: ReadCaller,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[SuppressionView]:
    """A page of the agent's suppression list."""
    return suppression.listing(rt, user_id, cursor=cursor, limit=limit)


@router.post(
    "/v1/users/{user_id}/suppressions",
    status_code=201,
    response_model=SuppressionView,
    dependencies=_PRODUCER,
    responses=_ANSWERS,
)
def post_suppression(
    user_id: str, body: SuppressionIn, rt: RuntimeDep, _caller: UsersCaller
) -> SuppressionView:
    """Suppress an address for this agent, optionally until ``expires_at``. Scope
    ``users:write``."""
    return suppression.suppress(
        rt,
        user_id,
        body.email,
        reason=body.reason.value,
        expires_at=body.expires_at,
        detail=body.detail,
    )


@router.delete(
    "/v1/users/{user_id}/suppressions/{email}",
    status_code=204,
    dependencies=_PRODUCER,
    responses=_ANSWERS,
)
def delete_suppression(
    user_id: str,
    email: str,
    rt: RuntimeDep,
    caller: UsersCaller,
    why: Annotated[
        str,
        Query(
            max_length=suppression.MAX_WHY, description="Why it may be emailed again (recorded)."
        ),
    ],
) -> Response:
    """Take an address off the agent's list; who (the client's name), when and why are
    recorded (see ``/suppression-removals``). Scope ``users:write``."""
    suppression.remove(rt, user_id, email, by=f"api:{caller.name}", why=why)
    return Response(status_code=204)


@router.get(
    "/v1/users/{user_id}/suppression-removals",
    response_model=Page[RemovalView],
    dependencies=_PRODUCER,
    responses=_ANSWERS,
    description=(
        "Addresses taken off the agent's list: who (a token's fingerprint), when, why, and "
        "the entry as it was; newest first. " + ENVELOPE
    ),
)
def get_suppression_removals(
    user_id: str,
    rt: RuntimeDep,
    _caller: ReadCaller,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[RemovalView]:
    """A page of the addresses taken off the agent's list."""
    return suppression.removals(rt, user_id, cursor=cursor, limit=limit)


@router.get(
    "/v1/alerts",
    response_model=Page[AlertView],
    dependencies=_PRODUCER,
    responses=answers(401, 403, 422),
    description=(
        "Policy refusals (campaign paused) and refused relay credentials (sending halted), "
        "newest first; with `user_id`, only that agent's; a client limited to some agents "
        "sees only theirs. " + ENVELOPE
    ),
)
def get_alerts(
    rt: RuntimeDep,
    caller: ReadCaller,
    user_id: str | None = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[AlertView]:
    """A page of alerts."""
    only = caller.users if user_id is None else None
    return alerts.recent(rt, user_id=user_id, user_ids=only, cursor=cursor, limit=limit)


@router.post(
    "/v1/relay/resume",
    responses=answers(401, 403),
)
def resume_relay(rt: RuntimeDep, _caller: OpsCaller) -> dict[str, bool]:
    """Lift a halt on the SMTP relay (after the credentials were fixed). Scope ``ops`` (an
    ``OPS_TOKENS`` token), not a producer's; ``dispatcher relay resume`` does the same from
    a shell."""
    return {"resumed": rt.relay.resume()}
