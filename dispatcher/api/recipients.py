"""The pages behind an email's unsubscribe link: /u/{token}, for recipients (no bearer token)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, PlainTextResponse

from dispatcher.api.deps import RuntimeDep
from dispatcher.api.problems import answers
from dispatcher.delivery import unsubscribe

router = APIRouter(tags=["recipients"])


@router.post("/u/{token}", responses=answers(422))
def one_click_unsubscribe(token: str, rt: RuntimeDep) -> Response:
    """RFC 8058 one-click unsubscribe: the POST a mailbox provider makes with
    ``List-Unsubscribe=One-Click``. No cookie or bearer token: the signed token is the
    authority. The contact is suppressed for the agent who sent the email."""
    unsubscribe.unsubscribe(rt, token)
    return PlainTextResponse("You are unsubscribed.\n")


@router.get("/u/{token}", response_class=HTMLResponse, responses=answers(422))
def unsubscribe_page(token: str, rt: RuntimeDep) -> HTMLResponse:
    """The page behind the link, for people: a button that makes the POST. Opening it
    changes nothing (link scanners open links)."""
    unsubscribe.send_id_of(rt.settings, token)
    return HTMLResponse(
        "<!doctype html><title>Unsubscribe</title>"
        f'<form method="post" action="/u/{token}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<p>Stop receiving these emails?</p><button>Unsubscribe</button></form>"
    )
