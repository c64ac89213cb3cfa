"""The operators' pages in Chromium: an ``ops`` token exchanged for a session, a halted relay
shown and resumed, an agent's suppression list searched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import expect

from dispatcher.delivery import suppression
from dispatcher.runtime import Runtime
from tests.helpers import make_user
from tests.web.conftest import TOKEN, log_in

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_the_ops_page_shows_a_halted_relay_and_resumes_it(
    runtime: Runtime, serve: Callable[..., str], context: Any
) -> None:
    runtime.relay.halt("535 5.7.8 Authentication credentials invalid")
    base = serve()
    page = context.new_page()

    # A producer's token is not an operator's
    log_in(page, base, TOKEN)
    expect(page.locator("#login-error")).to_have_text("That is not an operator token.")
    log_in(page, base)
    expect(page.locator("h1")).to_have_text("Operations")
    expect(page.locator("#relay-state")).to_contain_text("HALTED")
    expect(page.locator("#relay-state")).to_contain_text("535 5.7.8")
    expect(page.locator("#alerts")).to_contain_text("smtp_auth_failed")

    page.get_by_role("button", name="Resume sending (the credentials are fixed)").click()
    expect(page.get_by_role("status")).to_have_text("The halt is lifted: sending resumes.")
    expect(page.locator("#relay-state")).to_contain_text("Sending")
    assert runtime.relay.halted() is None


def test_an_agents_suppression_list_is_searched(
    runtime: Runtime, serve: Callable[..., str], context: Any
) -> None:
    make_user(runtime)
    for address in ("ann@example.org", "bob@example.org", "ann.lee@example.net"):
        suppression.suppress(runtime, "agent-1", address, detail="asked by phone")
    base = serve()
    page = context.new_page()
    log_in(page, base)
    page.get_by_role("link", name="Suppression lists").click()
    page.get_by_label("Agent (user id)").fill("agent-1")
    page.get_by_label("Address contains").fill("ANN")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("#suppressions tbody th")
    expect(rows).to_have_text(["ann.lee@example.net", "ann@example.org"])
