"""A campaign's page in Chromium while a real worker sends it: the figures move without a
reload, pause stops the sending, cancel ends it; the list and a contact's timeline."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery.worker import state
from playwright.sync_api import expect

from devstack.devsmtp import DevSMTPServer, Received
from dispatcher.campaigns import control
from dispatcher.producer import Producer
from dispatcher.runtime import Runtime
from tests.helpers import campaign_request, make_user, wait_for
from tests.web.conftest import log_in, portal_link
from workers.queue import CeleryTaskQueue

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

RECIPIENTS = 200


def slowly(stage: str, _r: Received) -> None:
    """The relay takes a twentieth of a second per message, one message at a time."""
    if stage == "data":
        time.sleep(0.05)


def shown(page: Any, field: str) -> int:
    return int(page.locator(f'[data-field="{field}"]').inner_text().replace(",", ""))


def test_a_campaigns_progress_moves_while_it_sends_and_pause_stops_it(
    runtime: Runtime,
    serve: Callable[..., str],
    context: Any,
    celery_app: Any,
    worker: Any,
    smtp_server: DevSMTPServer,
) -> None:
    make_user(runtime)
    smtp_server.handler.fault = slowly
    queue = CeleryTaskQueue(celery_app)
    base = serve(queue, broker=queue)
    page = context.new_page()
    page.goto(portal_link(base))
    created = control.view(runtime, _start(runtime, queue), "agent-1")

    page.get_by_role("link", name="Campaigns").click()
    page.get_by_role("link", name="Spring open house").click()
    expect(page.locator('[data-field="status"]')).to_have_text("running")
    # The figures move on the open page (refreshed by its script, no reload)
    expect(page.locator('[data-field="sent"]')).not_to_have_text("0", timeout=15_000)
    first = shown(page, "sent")
    expect(page.locator('[data-field="sent"]')).not_to_have_text(str(first), timeout=15_000)
    assert first < shown(page, "sent") < RECIPIENTS

    page.get_by_role("button", name="Pause").click()
    expect(page.locator('[data-field="status"]')).to_have_text("paused")
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    wait_for(lambda: _settled(runtime, created.id), what="the chunks in flight to finish")
    stopped = len(smtp_server.messages)
    page.reload()
    assert shown(page, "sent") == stopped < RECIPIENTS
    assert shown(page, "remaining") == RECIPIENTS - stopped
    time.sleep(0.5)
    assert len(smtp_server.messages) == stopped, "sending went on while paused"

    page.get_by_role("button", name=re.compile("^Cancel")).click()
    expect(page.locator('[data-field="status"]')).to_have_text("cancelled")
    expect(page.locator('[data-field="failed_by_reason"]')).to_contain_text(
        f"campaign_cancelled: {RECIPIENTS - stopped:,}"
    )

    # A recipient's timeline shows the campaign's email
    page.get_by_role("link", name="Contacts").click()
    page.get_by_label("Contact id").fill("c0")
    page.get_by_role("button", name="Show timeline").click()
    expect(page.locator("#timeline li")).to_have_count(1)
    expect(page.locator("#timeline")).to_contain_text("sent")

    # The operators' page names the worker of each queue, as `dispatcher status` does
    log_in(page, base)
    expect(page.locator("#queues tbody tr")).to_have_count(3)
    campaign_row = page.locator("#queues tbody tr", has_text="campaign")
    expect(campaign_row).to_contain_text(re.compile(r"\(4, \d+\)"))


def _start(runtime: Runtime, queue: CeleryTaskQueue) -> str:
    return (
        Producer(runtime, queue)
        .create_campaign(campaign_request(RECIPIENTS, name="Spring open house"))
        .id
    )


def _settled(runtime: Runtime, campaign_id: str) -> bool:
    view = control.view(runtime, campaign_id, "agent-1")
    return view.counts["sending"] == 0 and not state.active_requests
