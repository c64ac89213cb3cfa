"""The error contract: every 4xx and 5xx is a Problem ``{code, detail, field}``; refused input
names every bad field; the OpenAPI document lists each operation's errors and enumerations."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from dispatcher.api.app import create_api
from dispatcher.campaigns import create
from dispatcher.models import CampaignStatus, SendStatus
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from tests.api.client import agent_client
from tests.helpers import campaign_request, make_user, statuses

HEADERS = {"Authorization": "Bearer test-token-123"}


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return agent_client(runtime)


def is_problem(r: Any) -> dict[str, Any]:
    body: dict[str, Any] = r.json()
    assert {"code", "detail", "field"} <= set(body), body
    assert isinstance(body["code"], str) and isinstance(body["detail"], str)
    return body


def test_malformed_json_says_where_the_body_stops_being_json(client: TestClient) -> None:
    r = client.post(
        "/v1/sends",
        content=b'{"user_id": "agent-1",\n  "contact": {,}}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422
    problem = is_problem(r)
    assert (problem["code"], problem["field"]) == ("invalid_json", "body")
    assert "not valid JSON" in problem["detail"] and "line 2, column 15" in problem["detail"]


def test_unknown_routes_and_wrong_methods_answer_problems(client: TestClient) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and is_problem(r)["code"] == "not_found"
    r = client.delete("/v1/sends")
    assert r.status_code == 405 and is_problem(r)["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"] and "POST" in r.json()["detail"]
    r = client.post("/v1/campaigns/some-id/explode", params={"user_id": "agent-1"})
    assert r.status_code == 404 and is_problem(r)["code"] == "not_found"


def test_every_bad_field_is_named_and_the_first_is_the_field(
    client: TestClient, runtime: Runtime
) -> None:
    # The shape: two fields missing, one unknown
    r = client.post("/v1/sends", json={"user_id": "agent-1", "contact": {}, "extra": 1})
    problem = is_problem(r)
    named = [e["field"] for e in problem["errors"]]
    assert {"contact.id", "contact.email", "smartplan", "extra"} <= set(named)
    assert problem["field"] == named[0]
    # The values: a bad address, a subject with a line break and a surrogate in a merge field
    r = client.post(
        "/v1/sends",
        content=(
            '{"user_id": "agent-1", "contact": {"id": "c-1", "email": "nope", '
            '"fields": {"name": "\\ud83d"}}, "smartplan": {"plan_id": "p", "run_id": "r", '
            '"step_id": "s"}, "message": {"subject": "a\\nb", "html": "x"}}'
        ),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422
    problem = is_problem(r)
    assert [e["field"] for e in problem["errors"]] == [
        "contact.email",
        "contact.fields.name",
        "message.subject",
    ]
    assert problem["field"] == "contact.email"
    assert problem["detail"] == problem["errors"][0]["detail"]
    assert statuses(runtime, "agent-1") == {}


def test_list_positions_are_named_as_the_campaign_report_names_them(client: TestClient) -> None:
    r = client.post(
        "/v1/campaigns",
        json={
            "user_id": "agent-1",
            "message": {"subject": "s", "html": "h"},
            "recipients": [{"id": "c-1", "email": "a@b.org"}, {"id": "c-2"}],
        },
    )
    assert r.status_code == 422
    assert is_problem(r)["field"] == "recipients[1].email"


def test_path_and_query_values_follow_the_text_policy(client: TestClient) -> None:
    for r in (
        client.get("/v1/sends/abc%00def"),
        client.get("/v1/contacts/c-1/timeline", params={"user_id": "agent-1\x00"}),
        client.delete("/v1/users/agent-1/suppressions/a%0A@b.org"),
    ):
        assert r.status_code == 422, r.text
        assert is_problem(r)["code"] == "invalid_field"


def test_an_unforeseen_failure_is_a_500_problem_without_internals(make_runtime: Any) -> None:
    # A campaign row damaged around the API (a status no version ever wrote): the request
    # fails where nothing expects it to.
    rt = make_runtime()
    make_user(rt)
    view, _ = create.create(rt, campaign_request(1))
    with rt.sessions.begin() as session:
        session.execute(
            text("UPDATE campaigns SET status = 'mangled' WHERE id = :id"), {"id": view.id}
        )
    client = TestClient(
        create_api(rt, InlineQueue()), headers=HEADERS, raise_server_exceptions=False
    )
    r = client.get(f"/v1/campaigns/{view.id}", params={"user_id": "agent-1"})
    assert r.status_code == 500
    problem = is_problem(r)
    assert problem["code"] == "internal_error" and "TypeError" not in r.text


def test_a_database_that_is_not_there_is_a_503_problem_without_internals(
    make_runtime: Any,
) -> None:
    rt = make_runtime(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    client = TestClient(
        create_api(rt, InlineQueue()), headers=HEADERS, raise_server_exceptions=False
    )
    r = client.get("/v1/sends/some-id", params={"user_id": "agent-1"})
    assert r.status_code == 503 and r.headers["Retry-After"]
    problem = is_problem(r)
    assert problem["code"] == "database_unavailable" and "psycopg" not in r.text


def test_the_openapi_document_lists_errors_enumerations_and_descriptions(
    client: TestClient,
) -> None:
    doc = client.get("/openapi.json").json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("description"), f"{method} {path} has no description"
            assert {"413", "500"} <= set(op["responses"]), f"{method} {path}"
            if path.startswith("/v1/"):
                assert "401" in op["responses"], f"{method} {path}"
    post_campaign = doc["paths"]["/v1/campaigns"]["post"]["responses"]
    assert {"401", "404", "409", "413", "422", "500", "503"} <= set(post_campaign)
    assert "insufficient_credits" in post_campaign["409"]["description"]
    schemas = doc["components"]["schemas"]

    def enum_of(schema: str, field: str) -> set[str]:
        prop = schemas[schema]["properties"][field]
        if "$ref" in prop:
            return set(schemas[prop["$ref"].rsplit("/", 1)[1]]["enum"])
        options = [prop, *prop.get("anyOf", [])]
        return {v for o in options for v in o.get("enum", [])}

    assert enum_of("CampaignIn", "provider") == {"command_email", "mailchimp"}
    assert enum_of("SubscriptionIn", "action") == {"upgrade", "downgrade", "cancel"}
    assert enum_of("SendView", "status") == {s.value for s in SendStatus}
    assert enum_of("CampaignView", "status") == {s.value for s in CampaignStatus}
    assert "unsubscribe" in enum_of("SuppressionIn", "reason")
    assert set(schemas["Problem"]["properties"]) == {"code", "detail", "field", "errors"}
