"""Tokens with scopes: each client's token says what it may do and for which agents; another
agent is not found, a missing scope is 403, and the log says which client called."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from dispatcher import alerts
from dispatcher.api.app import create_api
from dispatcher.errors import ConfigError
from dispatcher.models import AlertKind
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.settings import ApiClient, Settings
from tests.helpers import make_user

CRM = ApiClient(
    "crm", "crm-token-0001", frozenset({"smartplan:send", "read"}), frozenset({"agent-1"})
)
BILLING = ApiClient("billing-svc", "billing-token-0002", frozenset({"billing", "read"}))


def _send(user_id: str) -> dict[str, object]:
    return {
        "user_id": user_id,
        "contact": {"id": "c-1", "email": "pat@example.org"},
        "smartplan": {"plan_id": "p", "run_id": "r", "step_id": "s"},
        "message": {"subject": "Hi", "html": "<p>Hello</p>"},
    }


@pytest.fixture
def rt(make_runtime: Callable[..., Runtime]) -> Runtime:
    rt = make_runtime(api_clients=(CRM, BILLING))
    make_user(rt, "agent-1")
    make_user(rt, "agent-2")
    return rt


def _as(rt: Runtime, client: ApiClient) -> TestClient:
    return TestClient(
        create_api(rt, InlineQueue()), headers={"Authorization": f"Bearer {client.token}"}
    )


def test_a_client_acts_only_within_its_scopes_and_agents(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    crm, billing = _as(rt, CRM), _as(rt, BILLING)
    with caplog.at_level(logging.INFO, logger="dispatcher.api.access"):
        sent = crm.post("/v1/sends", json=_send("agent-1"))
    assert sent.status_code == 202
    line = next(r.getMessage() for r in caplog.records if r.name == "dispatcher.api.access")
    assert "POST /v1/sends 202" in line and "client=crm" in line and CRM.token not in line
    # Another agent does not exist for this client, whatever the route
    assert crm.post("/v1/sends", json=_send("agent-2")).status_code == 404
    assert crm.get("/v1/users/agent-2/credits").status_code == 404
    other = sent.json()["id"]
    assert crm.get(f"/v1/sends/{other}", params={"user_id": "agent-2"}).status_code == 404
    assert crm.get(f"/v1/sends/{other}", params={"user_id": "agent-1"}).status_code == 200
    # What its scopes do not cover is refused, naming the scope
    changed = crm.put("/v1/users/agent-1", json={"timezone": "UTC"})
    assert changed.status_code == 403 and "users:write" in changed.json()["detail"]
    upgrade = {"action": "upgrade", "plan": "10k"}
    assert crm.post("/v1/users/agent-1/subscription", json=upgrade).status_code == 403
    # A billing client may change any agent's plan, and send nothing
    assert billing.post("/v1/users/agent-2/subscription", json=upgrade).status_code == 201
    assert billing.post("/v1/sends", json=_send("agent-2")).status_code == 403
    assert TestClient(create_api(rt, InlineQueue())).get("/v1/plans").status_code == 401


def test_a_client_limited_to_some_agents_sees_only_their_alerts(rt: Runtime) -> None:
    with rt.sessions.begin() as session:
        for user_id in ("agent-1", "agent-2", None):
            alerts.record(
                session,
                AlertKind.POLICY_REJECTED,
                f"about {user_id}",
                rt.clock.now(),
                user_id=user_id,
            )
    mine = _as(rt, CRM).get("/v1/alerts").json()
    everyone = _as(rt, BILLING).get("/v1/alerts").json()
    assert [a["user_id"] for a in mine["items"]] == ["agent-1"]
    assert len(everyone["items"]) == 3
    assert _as(rt, CRM).get("/v1/alerts", params={"user_id": "agent-2"}).status_code == 404


def test_tokens_are_checked_when_the_settings_are_read(settings: Settings) -> None:
    public = {
        "public_base_url": "https://mail.example.com",
        "unsubscribe_secret": "s" * 32,
        "secret_keys": ("Wd3h0Zt4sPfYl8o3hmVqQKQv3K3kq1RZr7l9p8o0vWc=",),
    }
    with pytest.raises(ConfigError) as short:
        settings.with_overrides(api_tokens=(), api_clients=(CRM,), **public)
    assert short.value.variable == "API_CLIENTS"
    twice = ApiClient("twice", CRM.token, frozenset({"read"}))
    with pytest.raises(ConfigError):
        settings.with_overrides(api_clients=(CRM, twice))
    env = Settings.from_env
    with pytest.raises(ConfigError) as bad:
        env({"API_CLIENTS": '[{"name": "x", "token": "t" , "scopes": ["fly"]}]'}, env_file=None)
    assert bad.value.variable == "API_CLIENTS"
    read = env(
        {"API_CLIENTS": '[{"name": "crm", "token": "crm-token-0001", "scopes": ["read"]}]'},
        env_file=None,
    )
    assert read.api_clients == (ApiClient("crm", "crm-token-0001", frozenset({"read"})),)
