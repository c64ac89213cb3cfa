"""POST /v1/campaigns reads its recipients one at a time (dispatcher.api.campaign_body): in any
member order the same request gives the same campaign; every error FastAPI would name is
named, and a refused body stores and charges nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from dispatcher.api.campaign_body import CampaignBody
from dispatcher.api.campaigns import _ROW, CampaignIn
from dispatcher.credits.subscriptions import credits
from dispatcher.models import Campaign
from dispatcher.runtime import Runtime
from tests.api.client import agent_client
from tests.helpers import statuses

MESSAGE = {"subject": "Hi {{ first_name }}", "html": "<p>Hello {{ first_name }}</p>"}


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return agent_client(runtime)


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"c{i}", "email": f"p{i}@example.org", "fields": {"first_name": f"P{i}"}}
        for i in range(start, start + n)
    ]


def post(client: TestClient, text: str, **headers: str) -> Any:
    return client.post(
        "/v1/campaigns",
        content=text.encode(),
        headers={"Content-Type": "application/json", **headers},
    )


def campaigns(rt: Runtime) -> int:
    with rt.sessions() as session:
        return session.scalar(select(func.count()).select_from(Campaign)) or 0


def nothing_stored(rt: Runtime) -> bool:
    return campaigns(rt) == 0 and statuses(rt, "agent-1") == {} and credits(rt, "agent-1").used == 0


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_the_recipients_may_stand_anywhere_in_the_body(
    client: TestClient, runtime: Runtime, where: str
) -> None:
    members: list[tuple[str, Any]] = [
        ("user_id", "agent-1"),
        ("message", MESSAGE),
        ("idempotency_key", "order-1"),
    ]
    at = {"first": 0, "middle": 1, "last": 3}[where]
    members.insert(at, ("recipients", [*rows(3), {"id": "bad", "email": "nope"}]))
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in members) + "}"
    r = post(client, text)
    assert r.status_code == 202, r.text
    view = r.json()
    assert (view["recipients"], view["invalid"]) == (3, 1)
    assert sum(statuses(runtime, "agent-1").values()) == 3
    assert credits(runtime, "agent-1").used == 3
    # The same request with its members in another order is the same request: a replay.
    again = dict(members)
    r = client.post("/v1/campaigns", json={k: again[k] for k in reversed(list(again))})
    assert r.status_code == 200 and r.json()["id"] == view["id"] and r.json()["replayed"]
    assert campaigns(runtime) == 1 and credits(runtime, "agent-1").used == 3


def test_every_shape_error_is_named_in_field_order_and_nothing_is_stored(
    client: TestClient, runtime: Runtime
) -> None:
    body = {
        "recipients": [*rows(2), {"id": "c9"}, {"id": 5, "email": "x@example.org", "extra": 1}],
        "user_id": "agent-1",
        "message": {"subject": "s"},
        "colour": "blue",
    }
    r = client.post("/v1/campaigns", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    fields = [e["field"] for e in problem["errors"]]
    assert fields == [
        "message.html",
        "recipients[2].email",
        "recipients[3].id",
        "recipients[3].extra",
        "colour",
    ]
    assert problem["field"] == "message.html"
    assert nothing_stored(runtime)


def test_a_bad_row_refuses_the_whole_campaign_after_the_rows_are_read(
    client: TestClient, runtime: Runtime
) -> None:
    body = {"user_id": "agent-1", "message": MESSAGE, "recipients": [*rows(4999), {"id": "c"}]}
    r = client.post("/v1/campaigns", json=body)
    assert r.status_code == 422
    assert r.json()["field"] == "recipients[4999].email"
    assert nothing_stored(runtime)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"user_id": "agent-1", "recipients": [{"id": "c1", "email": "a@b.org"},\n {,}]}', 2),
        ('{"user_id": "agent-1", "recipients": [{"id": "c1", "email": "a@b.org"} {}]}', 1),
        ('{"recipients": [{"id": "c1", "email": "a@b.org"}], "user_id": "agent-1",}', 1),
        ('{"recipients": [], "user_id": "agent-1"} trailing', 1),
    ],
)
def test_a_body_that_is_not_json_says_where(
    client: TestClient, runtime: Runtime, text: str, where: int
) -> None:
    r = post(client, text)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert (problem["code"], problem["field"]) == ("invalid_json", "body")
    assert f"line {where}," in problem["detail"], problem["detail"]
    assert nothing_stored(runtime)


@pytest.mark.parametrize(
    ("text", "headers", "field"),
    [
        ('{"user_id": "agent-1"}', {"Content-Type": "text/plain"}, "body"),
        ("", {}, "body"),
        ("[1, 2]", {}, "body"),
        (
            '{"user_id": "agent-1", "message": {"subject": "s", "html": "h"}, '
            '"recipients": [{"id": "c1", "email": "a@b.org"}], "recipients": []}',
            {},
            "recipients",
        ),
        (
            '{"user_id": "agent-1", "message": {"subject": "s", "html": "h"}, '
            '"recipients": [{"id": "c1", "email": "a@b.org"}], "tags": ["a"]}',
            {},
            "tags",
        ),
        ('{"user_id": "agent-1", "message": {"subject": "s", "html": "h"}}', {}, "recipients"),
        (
            '{"user_id": "agent-1", "message": {"subject": "s", "html": "h"}, "recipients": 3}',
            {},
            "recipients",
        ),
    ],
)
def test_bodies_of_the_wrong_shape_are_refused_naming_the_field(
    client: TestClient, runtime: Runtime, text: str, headers: dict[str, str], field: str
) -> None:
    r = post(client, text, **headers)
    assert r.status_code == 422, r.text
    assert (r.json()["code"], r.json()["field"]) == ("invalid_field", field), r.text
    assert nothing_stored(runtime)


def test_a_body_that_is_not_utf8_is_a_bad_request(client: TestClient, runtime: Runtime) -> None:
    r = client.post(
        "/v1/campaigns",
        content=b'{"user_id": "agent-\xff"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    assert nothing_stored(runtime)


def test_without_a_token_nothing_about_the_body_is_answered(runtime: Runtime) -> None:
    client = agent_client(runtime, headers={})
    r = post(client, "not json at all")
    assert r.status_code == 401


def test_rows_are_decoded_as_they_are_reached() -> None:
    """The reader hands over each row as it parses it: the rows before a break in the JSON
    are read before the break is found (nothing decodes the array whole first)."""
    good = ",".join(json.dumps(r) for r in rows(1000))
    text = f'{{"user_id": "a", "message": {json.dumps(MESSAGE)}, "recipients": [{good}, {{,}}]}}'
    body = CampaignBody(text, CampaignIn, _ROW)
    assert body.validated() is not None
    seen = 0
    with pytest.raises(RequestValidationError) as raised:
        for _ in body.rows():
            seen += 1
    assert seen == 1000
    assert raised.value.errors()[0]["type"] == "json_invalid"


def test_the_openapi_document_describes_the_body(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/campaigns"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CampaignIn"
    }
    schemas = doc["components"]["schemas"]
    assert {"user_id", "message", "recipients"} <= set(schemas["CampaignIn"]["required"])
    items = schemas["CampaignIn"]["properties"]["recipients"]["items"]
    assert schemas[items["$ref"].rsplit("/", 1)[1]]["required"] == ["id", "email"]
    assert "MessageIn" in schemas
