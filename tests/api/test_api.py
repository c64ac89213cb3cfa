"""The HTTP API's contract: auth, clear errors naming the field, nothing half-done on bad input."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from dispatcher.api.app import create_api
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from tests.helpers import statuses

HEADERS = {"Authorization": "Bearer test-token-123"}
OWNER = {"user_id": "agent-1"}


@pytest.fixture
def queue() -> InlineQueue:
    return InlineQueue()


@pytest.fixture
def client(runtime: Runtime, queue: InlineQueue) -> TestClient:
    c = TestClient(create_api(runtime, queue), headers=HEADERS)
    c.put(
        "/v1/users/agent-1",
        json={
            "platform_email": "agent1@kw.example.com",
            "postal_address": "350 Main St, Austin, TX 78701",
        },
    )
    return c


def body(**changes: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "user_id": "agent-1",
        "contact": {"id": "c-1", "email": "pat@example.org", "fields": {"first_name": "Pat"}},
        "smartplan": {"plan_id": "p", "run_id": "r", "step_id": "s"},
        "message": {"subject": "Hi {{ first_name }}", "html": "<p>Hello</p>"},
    }
    for path, value in changes.items():
        node = b
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        if value is ...:
            node.pop(leaf)
        else:
            node[leaf] = value
    return b


def test_requests_without_a_valid_token_get_401(runtime: Runtime, queue: InlineQueue) -> None:
    bare = TestClient(create_api(runtime, queue))
    for headers in ({}, {"Authorization": "Bearer wrong-token-000"}, {"Authorization": "Basic x"}):
        r = bare.post("/v1/sends", json=body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert bare.get("/v1/contacts/c/timeline", params={"user_id": "x"}).status_code == 401
    assert queue.enqueued == []


def test_only_an_operator_token_lifts_a_relay_halt(make_runtime: Any, queue: InlineQueue) -> None:
    halt = "535 5.7.8 authentication failed (at login)"
    # With no operator token configured, nobody lifts it over HTTP (the CLI still can).
    closed = make_runtime()
    closed.relay.halt(halt)
    r = TestClient(create_api(closed, queue), headers=HEADERS).post("/v1/relay/resume")
    assert r.status_code == 403 and "OPS_TOKENS" in r.json()["detail"]
    assert closed.relay.halted() is not None

    rt = make_runtime(ops_tokens=("ops-token-456",))
    api = TestClient(create_api(rt, queue))
    for token, status in (("test-token-123", 403), ("wrong-token-000", 401)):
        # a producer's token is not enough (no ops scope); a wrong one is no token at all
        r = api.post("/v1/relay/resume", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == status
    assert rt.relay.halted() is not None
    r = api.post("/v1/relay/resume", headers={"Authorization": "Bearer ops-token-456"})
    assert r.status_code == 200 and r.json() == {"resumed": True}
    assert rt.relay.halted() is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"message__subject": "Hi\r\nBcc: victim@example.org"}, "message.subject"),
        ({"contact__email": "pat@example.org\nBcc: x@y.org"}, "contact.email"),
        ({"contact__email": "not-an-address"}, "contact.email"),
        ({"contact__email": "pat@localhost"}, "contact.email"),
        ({"message__html": "   "}, "message.html"),
        ({"message__html": "x" * 1_000_001}, "message.html"),
        ({"message__subject": "Hi {{ first_name "}, "message.subject"),
        ({"message__html": "{% for x in y %}"}, "message.html"),
        ({"reply_to": "bad address@x.org"}, "reply_to"),
        ({"from_name": "Agent\nX"}, "from_name"),
        ({"contact__fields": {"__class__": "x"}}, "contact.fields.__class__"),
        ({"contact__fields": {"nested": {"a": 1}}}, "contact.fields.nested"),
        ({"smartplan__run_id": ""}, "smartplan.run_id"),
        ({"contact__id": ...}, "contact.id"),
        ({"surprise": 1}, "surprise"),
        ({"message": ...}, "message"),
        ({"template": "no-such-template", "message": ...}, "template"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(
    client: TestClient, runtime: Runtime, queue: InlineQueue, changes: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/sends", json=body(**changes))
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "invalid_field"
    assert problem["field"] == field
    assert problem["detail"].startswith(field)
    assert queue.enqueued == []
    assert statuses(runtime, "agent-1") == {}


def test_unknown_user_is_404_and_nothing_is_stored(client: TestClient, queue: InlineQueue) -> None:
    r = client.post("/v1/sends", json=body(user_id="nobody"))
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    assert queue.enqueued == []


def test_stored_template_is_accepted(client: TestClient, queue: InlineQueue) -> None:
    r = client.post("/v1/sends", json=body(template="smartplan-check-in", message=...))
    assert r.status_code == 202, r.text
    assert queue.enqueued == [r.json()["id"]]


def test_duplicate_step_returns_the_first_id_and_enqueues_nothing(
    client: TestClient, queue: InlineQueue
) -> None:
    first = client.post("/v1/sends", json=body()).json()
    second = client.post("/v1/sends", json=body()).json()
    assert first["id"] == second["id"] and second["duplicate"] is True
    assert queue.enqueued == [first["id"]]
    assert client.get(f"/v1/sends/{first['id']}", params=OWNER).json()["status"] == "queued"
    assert client.get(f"/v1/sends/{first['id']}").json()["field"] == "user_id"  # required
    assert client.get(f"/v1/sends/{first['id']}", params={"user_id": "other"}).status_code == 404


def test_put_user_creates_then_updates_and_never_returns_the_mailchimp_key(
    client: TestClient,
) -> None:
    r = client.put(
        "/v1/users/agent-2",
        json={
            "communications_email": "a2@example.org",
            "timezone": "America/Chicago",
            "mailchimp": {"api_key": "abc123-us6", "list_id": "list1"},
        },
    )
    assert r.status_code == 201
    assert r.json()["mailchimp_connected"] is True
    assert "abc123" not in r.text
    r = client.put(
        "/v1/users/agent-2",
        json={"timezone": "Pacific/Auckland", "postal_address": " 1 Queen St, Auckland 1010 "},
    )
    assert r.status_code == 200
    assert (r.json()["timezone"], r.json()["communications_email"]) == (
        "Pacific/Auckland",
        "a2@example.org",
    )
    assert r.json()["postal_address"] == "1 Queen St, Auckland 1010"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"platform_email": "x@y.org", "timezone": "Mars/Olympus"}, "timezone"),
        ({"platform_email": "nope"}, "platform_email"),
        ({"timezone": "UTC"}, "platform_email"),
        ({"platform_email": "x@y.org", "plan": "platinum"}, "plan"),
        ({"platform_email": "x@y.org", "postal_address": "1 Main St\r\nAustin"}, "postal_address"),
        ({"platform_email": "x@y.org", "postal_address": "x" * 301}, "postal_address"),
    ],
)
def test_put_user_refuses_bad_fields(
    client: TestClient, payload: dict[str, Any], field: str
) -> None:
    r = client.put("/v1/users/agent-9", json=payload)
    assert r.status_code == 422
    assert r.json()["field"] == field
    assert client.put("/v1/users/agent-9", json={"timezone": "UTC"}).status_code == 422


def test_timeline_of_an_unknown_user_is_404(client: TestClient) -> None:
    assert client.get("/v1/contacts/c-1/timeline", params={"user_id": "ghost"}).status_code == 404
    empty = client.get("/v1/contacts/c-1/timeline", params={"user_id": "agent-1"}).json()
    assert empty == {"items": [], "next_cursor": None}


def test_health_and_metrics(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "redis": "ok", "database": "ok"}
    client.post("/v1/sends", json=body())
    metrics = client.get("/metrics").text
    # Built without a broker (an inline queue): no queue gauges, and the broker reads down.
    assert "dispatcher_broker_up 0.0" in metrics
    assert 'dispatcher_sends_in_flight{kind="smartplan"} 0.0' in metrics
    assert "dispatcher_queue_messages{" not in metrics
    assert client.get("/openapi.json").json()["info"]["title"] == "Command Email dispatcher"
