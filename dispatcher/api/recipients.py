"""What recipients reach from an email, with no bearer token (signed tokens are the
authority): the unsubscribe link (/u/{token}) and, when tracking is on, the open pixel
(/t/o/{token}) and click redirects (/t/c/{token})."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.api.deps import RuntimeDep
from dispatcher.api.problems import answers
from dispatcher.delivery import engagement, tracking, unsubscribe
from dispatcher.errors import InvalidInput, NotFound

log = logging.getLogger(__name__)

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


@router.get("/t/o/{token}", responses=answers(404), include_in_schema=False)
def tracked_open(token: str, rt: RuntimeDep) -> Response:
    """The open pixel (``TRACK_OPENS``): records the copy's first open, answers a 1x1 GIF."""
    _record(rt, token, "open")
    return Response(tracking.PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store"})


@router.get("/t/c/{token}", responses=answers(404), include_in_schema=False)
def tracked_click(token: str, rt: RuntimeDep) -> Response:
    """A tracked link (``TRACK_CLICKS``): records the click and redirects to the target the
    token was signed with (a token we did not sign is 404, never a redirect)."""
    hit = _record(rt, token, "click")
    assert hit.url is not None
    return RedirectResponse(hit.url, status_code=302, headers={"Cache-Control": "no-store"})


def _record(rt: RuntimeDep, token: str, kind: str) -> tracking.Hit:
    """Record a hit; a bad token (or one of the other kind) is 404. The recipient gets the
    image or the link even when recording fails (logged)."""
    try:
        hit = tracking.read(rt.settings, token)
    except InvalidInput:
        raise NotFound("link", "this tracking link") from None
    if hit.kind != kind:
        raise NotFound("link", "this tracking link")
    try:
        engagement.record(rt, hit)
    except SQLAlchemyError as exc:
        log.warning("%s of send %s not recorded: %s", kind, hit.send_id, type(exc).__name__)
    return hit
