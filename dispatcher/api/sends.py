"""/v1/sends: submit one SmartPlan email or a batch of them, and read how one went."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from dispatcher import sends
from dispatcher.api.auth import AUTHENTICATED, ReadCaller, SendCaller
from dispatcher.api.bodies import MessageIn, StrictBody
from dispatcher.api.deps import PLAIN_PARAMETERS, ProducerDep
from dispatcher.api.problems import Problem, answers, refusal
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.sends import SendRequest, SendView, SubmitResult

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
    id: str
    status: str
    duplicate: bool = Field(description="True when this run+step+contact was already submitted.")


class BatchIn(StrictBody):
    sends: list[Any] = Field(
        min_length=1,
        max_length=sends.BATCH_MAX,
        description=f"1 to {sends.BATCH_MAX} sends, each the body `POST /v1/sends` takes; one "
        "that is not is refused alone, in its result.",
        json_schema_extra={"items": {"$ref": "#/components/schemas/SendIn"}},
    )


class BatchResult(BaseModel):
    """One send's answer: `id`, `status` and `duplicate` when accepted (202), `error` when
    refused (422 invalid, 404 an unknown agent or one the client may not act for)."""

    index: int = Field(description="The send's place in `sends`, from 0.")
    status_code: int = Field(description="202, 422 or 404: what `POST /v1/sends` answers.")
    id: str | None = None
    status: str | None = None
    duplicate: bool | None = None
    error: Problem | None = None


class BatchAccepted(BaseModel):
    results: list[BatchResult] = Field(description="One per send, in the order given.")


def _request(body: SendIn) -> SendRequest:
    msg = body.message
    return SendRequest(
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
    result = producer.submit_send(_request(body))
    return SendAccepted(id=result.send_id, status=result.status, duplicate=not result.created)


@router.post(
    "/v1/sends/batch",
    response_model=BatchAccepted,
    responses=answers(503),
)
def post_batch(body: BatchIn, producer: ProducerDep, caller: SendCaller) -> JSONResponse:
    """Submit up to 1,000 SmartPlan emails at once, each as `POST /v1/sends` would: one result
    per send, in order; a send refused (422, 404) is refused alone, with nothing stored for it.
    The same run + step + contact again (here or in an earlier request) is a duplicate with
    the first send's id. 503 `queue_unavailable`: the accepted sends are stored but not all
    queued; the same batch again queues them. Scope ``smartplan:send``."""
    results: list[dict[str, Any] | None] = [None] * len(body.sends)
    requests: list[SendRequest] = []
    slots: list[int] = []
    for index, raw in enumerate(body.sends):
        try:
            item = SendIn.model_validate(raw)
            caller.check_user(item.user_id)
        except (ValidationError, NotFound) as exc:
            results[index] = _refused(index, exc)
            continue
        slots.append(index)
        requests.append(_request(item))
    for index, outcome in zip(slots, producer.submit_sends(requests), strict=True):
        if isinstance(outcome, SubmitResult):
            results[index] = {
                "index": index,
                "status_code": 202,
                "id": outcome.send_id,
                "status": outcome.status,
                "duplicate": not outcome.created,
            }
        else:
            results[index] = _refused(index, outcome)
    return JSONResponse({"results": results})


def _refused(index: int, exc: InvalidInput | NotFound | ValidationError) -> dict[str, Any]:
    status, error = refusal(exc, f"sends[{index}]")
    return {"index": index, "status_code": status, "error": error}


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
