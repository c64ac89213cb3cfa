"""Screenshots of every page at a desktop's and a phone's width, into docs/screenshots/ (the
README shows them). Not part of a suite run: ``make screenshots`` runs it (SCREENSHOTS=1)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.campaigns import control
from dispatcher.credits import subscriptions
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import suppression
from dispatcher.ports import InlineQueue
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import campaign_request, make_user, seed_used_credits, send_request, wait_for
from tests.web.conftest import DESKTOP, OPS_TOKEN, PHONE, portal_link
from workers.queue import CeleryTaskQueue

FOLDER = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("SCREENSHOTS"), reason="makes docs/screenshots/ (make screenshots)"
    ),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


def slowly(stage: str, _r: Received) -> None:
    if stage == "data":
        time.sleep(0.03)


def test_screenshots_of_every_page(
    runtime: Runtime,
    serve: Callable[..., str],
    browser: Any,
    celery_app: Any,
    worker: Any,
    smtp_server: DevSMTPServer,
) -> None:
    # An agent at 4,000 of 5,000 with the 80% notice, a paused campaign, a halted relay
    make_user(runtime, timezone="America/Chicago")
    seed_used_credits(runtime, "agent-1", 3_999)
    runtime.queue = InlineQueue()
    send = submit_send(runtime, runtime.queue, send_request(contact_id="c0")).send_id
    delivery.deliver(runtime, send)
    for address in ("ann@example.org", "bob@example.net"):
        suppression.suppress(runtime, "agent-1", address, detail="asked by phone")
    smtp_server.handler.fault = slowly
    queue = CeleryTaskQueue(celery_app)
    base = serve(queue, broker=queue)
    cid = (
        Producer(runtime, queue).create_campaign(campaign_request(120, name="Spring open house")).id
    )
    wait_for(lambda: control.view(runtime, cid, "agent-1").counts["sent"] >= 40)
    control.pause(runtime, cid, "agent-1")
    wait_for(lambda: control.view(runtime, cid, "agent-1").counts["sending"] == 0)
    runtime.relay.halt("535 5.7.8 Authentication credentials invalid")

    FOLDER.mkdir(parents=True, exist_ok=True)
    for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport)
        page = context.new_page()

        def shot(name: str, page: Any = page, width: str = width) -> None:
            page.screenshot(path=str(FOLDER / f"{name}-{width}.png"), full_page=True)

        page.goto(portal_link(base))
        shot("usage")
        page.goto(base + "/portal/subscription")
        shot("subscription")
        if width == "desktop":  # upgraded once, the receipt shown to both widths
            page.goto(base + "/portal/subscription/confirm?plan=25k")
            shot("confirm-upgrade")
            page.get_by_role("button", name="Save changes and pay $30.00").click()
            expect(page.locator("h1")).to_have_text("Order receipt")
        else:
            page.goto(base + "/portal/subscription/confirm?plan=50k")
            shot("confirm-upgrade")
            (order,) = subscriptions.orders(runtime, "agent-1")
            page.goto(f"{base}/portal/orders/{order.number}")
        shot("receipt")
        page.goto(base + "/portal/subscription/confirm?plan=10k")
        shot("confirm-downgrade")
        page.goto(base + "/portal/subscription/confirm?action=cancel")
        shot("confirm-cancel")
        page.goto(base + "/portal/orders")
        shot("orders")
        page.goto(base + "/portal/campaigns")
        shot("campaigns")
        page.goto(f"{base}/portal/campaigns/{cid}")
        shot("campaign")
        page.goto(base + "/portal/contacts?contact_id=c0")
        shot("contact")
        page.goto(base + "/ops")
        shot("ops-login")
        page.get_by_label("Operator token (OPS_TOKENS)").fill(OPS_TOKEN)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("h1")).to_have_text("Operations")
        shot("ops")
        page.goto(base + "/ops/suppressions?user_id=agent-1&q=")
        shot("ops-suppressions")
        context.close()
