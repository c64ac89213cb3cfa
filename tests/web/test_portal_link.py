"""Who may make a portal link, and what a session lets through (without a browser): scopes,
agents, an ended session, a cookie of the other kind."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from dispatcher.api.app import create_api
from dispatcher.clock import FrozenClock
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.settings import ApiClient
from dispatcher.web import sessions
from tests.helpers import make_user

BILLING_ONLY = ApiClient("billing-svc", "billing-token-0002", frozenset({"billing", "read"}))
PLATFORM = ApiClient(
    "platform",
    "platform-token-0003",
    frozenset({"billing", "campaigns:write", "read"}),
    frozenset({"agent-1"}),
)

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def rt(make_runtime: Callable[..., Runtime]) -> Runtime:
    rt = make_runtime(api_clients=(BILLING_ONLY, PLATFORM))
    make_user(rt, "agent-1")
    make_user(rt, "agent-2")
    return rt


def _as(rt: Runtime, client: ApiClient | None) -> TestClient:
    headers = {"Authorization": f"Bearer {client.token}"} if client else {}
    return TestClient(create_api(rt, InlineQueue()), headers=headers)


def test_a_link_needs_a_token_with_billing_and_campaigns_for_that_agent(rt: Runtime) -> None:
    assert _as(rt, None).post("/v1/users/agent-1/portal-link").status_code == 401
    refused = _as(rt, BILLING_ONLY).post("/v1/users/agent-1/portal-link")
    assert refused.status_code == 403
    assert "campaigns:write" in refused.json()["detail"]
    platform = _as(rt, PLATFORM)
    assert platform.post("/v1/users/agent-2/portal-link").status_code == 404  # not its agent
    made = platform.post("/v1/users/agent-1/portal-link")
    assert made.status_code == 200
    assert made.json()["url"].startswith(rt.settings.public_base_url + "/portal/enter/")
    assert made.json()["expires_at"].startswith("2026-11-10T15:15:00")
    every_agent = TestClient(
        create_api(rt, InlineQueue()), headers={"Authorization": "Bearer test-token-123"}
    )
    missing = every_agent.post("/v1/users/nobody/portal-link")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_a_session_ends_on_time_and_an_agents_cookie_opens_no_operators_page(
    rt: Runtime, clock: FrozenClock
) -> None:
    url, _ = sessions.portal_link(rt.settings, "agent-1", clock.now())
    app = create_api(rt, InlineQueue())
    entered = TestClient(app).get(
        url.removeprefix(rt.settings.public_base_url), follow_redirects=False
    )
    assert entered.status_code == 303
    cookie = entered.cookies[sessions.AGENT.cookie]
    agent, operator = TestClient(app), TestClient(app)
    agent.cookies.set(sessions.AGENT.cookie, cookie)
    assert agent.get("/portal").status_code == 200
    # The same signed value as the operators' cookie is refused: another key
    operator.cookies.set(sessions.OPERATOR.cookie, cookie)
    ops = operator.get("/ops")
    assert ops.status_code == 401 and "Operator login" in ops.text

    # A value the text policy refuses is named on a page, before any lookup
    refused = agent.get("/portal/contacts", params={"contact_id": "c\x00"})
    assert refused.status_code == 422 and "contact_id" in refused.text

    clock.advance(timedelta(seconds=rt.settings.portal_session_seconds))
    ended = agent.get("/portal")
    assert ended.status_code == 401 and "Your session has ended" in ended.text
