"""Relays' webhooks about emails already sent: ``POST /v1/webhooks/{provider}``.

No bearer token: each relay's signature (or, for Postmark, its basic auth) is the authority,
checked before anything is recorded; a request that fails it is answered 401. The body is
capped like every request without a token (:mod:`dispatcher.api.bodylimit`).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dispatcher.api.deps import RuntimeDep
from dispatcher.api.problems import answers
from dispatcher.delivery import feedback

router = APIRouter(tags=["webhooks"])

Provider = Literal["ses", "sendgrid", "postmark", "mailgun"]


class WebhookAnswer(BaseModel):
    provider: str
    reports: int = Field(description="Bounces and complaints the request carried.")
    recorded: int = Field(description="Of those, newly recorded (a repeat is recorded once).")
    unmatched: int = Field(description="Of those, about no email of ours.")


@router.post(
    "/v1/webhooks/{provider}",
    response_model=WebhookAnswer,
    responses=answers(401, 404, 422),
)
async def relay_webhook(provider: Provider, request: Request, rt: RuntimeDep) -> WebhookAnswer:
    """A relay's bounce and complaint events (Amazon SES through SNS, SendGrid's Event
    Webhook, Postmark, Mailgun), mapped to the same handling as a DSN or complaint report by
    mail: the address suppressed, the contact's timeline told, the send's outcome unchanged."""
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    done = await run_in_threadpool(feedback.from_webhook, rt, provider, headers, body)
    return WebhookAnswer(
        provider=done.provider,
        reports=done.reports,
        recorded=done.recorded,
        unmatched=done.unmatched,
    )
