"""/v1/sends: submit one SmartPlan email and read how it went."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from dispatcher import sends
from dispatcher.api.auth import AUTHENTICATED, ReadCaller, SendCaller
from dispatcher.api.bodies import MessageIn, StrictBody
from dispatcher.api.deps import PLAIN_PARAMETERS, ProducerDep
from dispatcher.api.problems import answers
from dispatcher.sends import SendView

router = APIRouter(dependencies=[AUTHENTICATED, PLAIN_PARAMETERS], responses=answers(401, 403, 422))


class ContactIn(StrictBody):
    id: str = Field(description="The CRM's contact id.")
    email: str = Field(description="Recipient address.")
    fields: dict[str, Any] = Field(default_factory=dict, description="Merge fields.")


class SmartPlanIn(StrictBody):
    plan_id: str
    run_id: str
    step_id: str


class SendIn(StrictBody):
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


@router.post(
    "/v1/sends",
    status_code=202,
    response_model=SendAccepted,
    responses=answers(404, 503),
)
def post_send(body: SendIn, producer: ProducerDep, caller: SendCaller) -> SendAccepted:
    """Submit one SmartPlan email; the same run + step + contact is accepted only once.
    Scope ``smartplan:send``."""
    caller.check_user(body.user_id)
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


@router.get(
    "/v1/sends/{send_id}",
    response_model=SendView,
    responses=answers(404),
)
def get_send(
    send_id: str,
    producer: ProducerDep,
    _caller: ReadCaller,
    user_id: Annotated[str, Query(description="The agent who owns the send.")],
) -> SendView:
    """A send's status and outcome; another agent's send is not found. Scope ``read``."""
    return producer.get_send(send_id, user_id)
