"""The agent's pages in Chromium: a portal link opens them; upgrade (receipt with the order
number and the new total at once), downgrade (pending for next month), cancel (exactly the
free credits), the usage meter and its 80% notice, a refused link, a form without its token."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from playwright.sync_api import expect

from dispatcher.clock import FrozenClock
from dispatcher.credits import subscriptions
from dispatcher.delivery import smartplan as delivery
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import make_user, seed_used_credits, send_request
from tests.web.conftest import portal_link

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_an_agent_upgrades_from_the_free_plan_and_sees_the_receipt_and_new_total(
    runtime: Runtime, serve: Callable[..., str], context: Any
) -> None:
    make_user(runtime)
    base = serve()
    page = context.new_page()
    page.goto(portal_link(base))
    expect(page.locator("h1")).to_have_text("Usage this month")
    expect(page.locator("#total")).to_have_text("5,000")

    page.get_by_role("link", name="Subscription").click()
    page.get_by_label("Available plans").select_option("25k")
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("#what")).to_contain_text(
        "The payment will immediately be charged to the card on file, and you will receive "
        "the new total of credits instantly"
    )
    expect(page.locator("#subtotal")).to_have_text("$30.00")
    page.get_by_role("button", name="Save changes and pay $30.00").click()

    # The receipt, with the order's number and the new total at once
    (order,) = subscriptions.orders(runtime, "agent-1")
    expect(page.locator("h1")).to_have_text("Order receipt")
    expect(page.locator("#order-number")).to_have_text(order.number)
    expect(page.locator("#amount")).to_have_text("$30.00")
    expect(page.locator("#new-total")).to_contain_text("25,000 credits this month")
    assert subscriptions.credits(runtime, "agent-1").total == 25_000
    page.get_by_role("link", name="All your orders").click()
    expect(page.get_by_role("link", name=order.number)).to_be_visible()


def test_a_downgrade_is_pending_for_next_month_and_a_cancel_leaves_exactly_the_free_credits(
    runtime: Runtime, serve: Callable[..., str], context: Any
) -> None:
    make_user(runtime, plan="50k")
    seed_used_credits(runtime, "agent-1", 7)
    base = serve()
    page = context.new_page()
    page.goto(portal_link(base))
    page.goto(base + "/portal/subscription")
    page.get_by_label("Available plans").select_option("10k")
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("#what")).to_contain_text(
        "Nothing will happen instantly, you keep any credits you had before"
    )
    expect(page.locator("#what")).to_contain_text("December 1, 2026")
    # By keyboard alone: the page starts with a skip link, the button takes Enter
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.get_by_role("button", name="Save changes").focus()
    page.keyboard.press("Enter")

    expect(page.locator("#pending")).to_contain_text("10k plan from December 1, 2026")
    expect(page.locator("#plan")).to_have_text("50k")
    expect(page.locator("#credits-total")).to_have_text("50,000")
    assert subscriptions.credits(runtime, "agent-1").pending_downgrade == "10k"
    assert subscriptions.orders(runtime, "agent-1") == []  # nothing charged now

    page.get_by_role("link", name="Cancel subscription").click()
    expect(page.locator("#what")).to_contain_text(
        "No matter how many credits you had before doing this, you will end up with 5,000 "
        "total credits"
    )
    page.get_by_role("button", name="Cancel subscription").click()
    expect(page.locator("#plan")).to_have_text("free")
    expect(page.locator("#credits-total")).to_have_text("5,000")
    expect(page.locator("#pending")).to_have_count(0)
    after = subscriptions.credits(runtime, "agent-1")
    assert (after.plan, after.total, after.remaining) == ("free", 5_000, 5_000)


def test_the_usage_meter_after_4000_of_5000_shows_the_80_percent_notice(
    runtime: Runtime, serve: Callable[..., str], context: Any
) -> None:
    make_user(runtime, timezone="America/Chicago")
    seed_used_credits(runtime, "agent-1", 3_999)
    runtime.queue = InlineQueue()
    send_id = submit_send(runtime, runtime.queue, send_request()).send_id
    assert delivery.deliver(runtime, send_id).value == "sent"  # the 4,000th
    base = serve()
    page = context.new_page()
    page.goto(portal_link(base))

    expect(page.locator("#used")).to_have_text("4,000")
    expect(page.locator("#remaining")).to_have_text("1,000")
    meter = page.get_by_role("meter", name="Emails used this month")
    expect(meter).to_have_attribute("aria-valuenow", "4000")
    expect(page.locator(".period")).to_have_text(
        "November 1, 2026 to November 30, 2026 (America/Chicago)"
    )
    expect(page.locator("#notices li")).to_have_count(1)
    expect(page.locator("#notices strong")).to_have_text(
        "You have used 80% of your Command Email sends"
    )
    expect(page.locator("#notices")).to_contain_text("4,000 of 5,000 sends used this month")


def test_an_expired_or_altered_link_is_refused(
    runtime: Runtime, clock: FrozenClock, serve: Callable[..., str], context: Any
) -> None:
    make_user(runtime)
    base = serve()
    link = portal_link(base)
    page = context.new_page()

    body, tag = link.rsplit("/", 1)[1].split(".")
    altered = f"{base}/portal/enter/{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}.{tag}"
    answer = page.goto(altered)
    assert answer is not None and answer.status == 403
    expect(page.locator("h1")).to_have_text("This link is not valid")
    page.goto(base + "/portal")
    expect(page.locator("h1")).to_have_text("Your session has ended")

    clock.advance(timedelta(seconds=runtime.settings.portal_link_seconds + 1))
    answer = page.goto(link)
    assert answer is not None and answer.status == 403
    expect(page.locator("h1")).to_have_text("This link has expired")
    assert context.cookies() == []


def test_a_form_posted_without_its_token_is_refused_and_changes_nothing(
    runtime: Runtime, serve: Callable[..., str], context: Any, browser: Any
) -> None:
    make_user(runtime, plan="25k")
    base = serve()
    page = context.new_page()
    page.goto(portal_link(base))
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    # Without the token, and with another session's token
    refused = context.request.post(f"{base}/portal/subscription", form={"action": "cancel"})
    assert refused.status == 403
    assert "security token" in refused.text()
    other = browser.new_context()
    try:
        other_page = other.new_page()
        other_page.goto(portal_link(base))
        other_page.goto(base + "/portal/subscription/confirm?action=cancel")
        foreign = other_page.locator("input[name=csrf_token]").get_attribute("value")
    finally:
        other.close()
    refused = context.request.post(
        f"{base}/portal/subscription", form={"action": "cancel", "csrf_token": foreign or ""}
    )
    assert refused.status == 403
    assert subscriptions.credits(runtime, "agent-1").plan == "25k"

    # The page's own form goes through
    page.goto(base + "/portal/subscription/confirm?action=cancel")
    page.get_by_role("button", name="Cancel subscription").click()
    expect(page.locator("#plan")).to_have_text("free")
