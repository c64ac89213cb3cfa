"""Lists a client can poll: every list answers pages `{items, next_cursor}` walked by keyset
cursors, and a campaign's view stays small while its invalid and suppressed recipients are
listed a page at a time."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from dispatcher import alerts
from dispatcher.delivery import suppression
from dispatcher.models import (
    AlertKind,
    Grant,
    GrantReason,
    Notification,
    SendStatus,
    Suppression,
    SuppressionReason,
    TimelineEvent,
    TimelineKind,
)
from dispatcher.runtime import Runtime
from tests.api.client import agent_client

HEADERS = {"Authorization": "Bearer test-token-123"}


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return agent_client(runtime)


def pages(
    client: TestClient, path: str, between: Callable[[], None] = lambda: None, **params: Any
) -> Iterator[dict[str, Any]]:
    """Every page of a list, following ``next_cursor``; ``between`` runs after each page."""
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = client.get(path, params=query)
        assert r.status_code == 200, r.text
        page = r.json()
        assert set(page) == {"items", "next_cursor"}
        yield page
        between()
        cursor = page["next_cursor"]
        if cursor is None:
            return


def walk(client: TestClient, path: str, **params: Any) -> list[dict[str, Any]]:
    return [item for page in pages(client, path, **params) for item in page["items"]]


def add_suppressions(rt: Runtime, emails: list[str]) -> None:
    """Entries added in this order (one statement: 10,000 take a fraction of a second)."""
    now = rt.clock.now()
    rows = [
        {
            "user_id": "agent-1",
            "email": e,
            "reason": SuppressionReason.MANUAL,
            "created_at": now,
        }
        for e in emails
    ]
    with rt.sessions.begin() as session:
        session.execute(insert(Suppression), rows)


def test_ten_thousand_suppressions_are_listed_in_full_once_each_while_more_are_added(
    runtime: Runtime, client: TestClient
) -> None:
    # Given 10,050 entries, added one after the other (all at the same clock time)
    first = [f"old{i:05}@example.org" for i in range(10_050)]
    add_suppressions(runtime, first)
    added: list[str] = []

    def meanwhile() -> None:
        # Between every two pages: new addresses, and an old one renewed (a second bounce
        # moves nothing: it keeps its place).
        batch = [f"new{len(added) + i}@example.org" for i in range(7)]
        add_suppressions(runtime, batch)
        added.extend(batch)
        with runtime.sessions.begin() as session:
            renewed = first[len(added) * 100 % len(first)]
            suppression.add(
                session, "agent-1", renewed, SuppressionReason.HARD_BOUNCE, runtime.clock.now()
            )

    # When a client walks the list 1,000 at a time while they are written
    seen = [
        s["email"]
        for page in pages(client, "/v1/users/agent-1/suppressions", meanwhile, limit=1000)
        for s in page["items"]
    ]

    # Then every entry that was there at the start comes once, newest first, none twice
    assert len(seen) == len(set(seen))
    assert [e for e in seen if e.startswith("old")] == first[::-1]
    assert set(seen) - set(first) <= set(added)
    assert len(added) == 7 * 11


def test_every_list_walks_its_entries_once_in_a_stable_order(
    runtime: Runtime, client: TestClient
) -> None:
    now = runtime.clock.now()
    with runtime.sessions.begin() as session:
        for i in range(5):
            alerts.record(session, AlertKind.POLICY_REJECTED, f"alert {i}", now, user_id="agent-1")
        session.add_all(
            TimelineEvent(
                user_id="agent-1",
                contact_id="c-1",
                kind=TimelineKind.EMAIL_SENT,
                status=SendStatus.SENT,
                subject=f"email {i}",
                source={},
                occurred_at=now,
            )
            for i in range(5)
        )
        grant = Grant(
            user_id="agent-1",
            period="x",
            seq=9,
            plan="free",
            total=1,
            reason=GrantReason.PERIOD_START,
            created_at=now,
        )
        session.add(grant)
        session.flush()
        session.add_all(
            Notification(
                user_id="agent-1",
                grant_id=grant.id,
                threshold=t,
                title=f"{t}%",
                body="",
                created_at=now,
            )
            for t in (80, 85, 90, 95, 100)
        )
    add_suppressions(runtime, [f"gone{i}@example.org" for i in range(5)])
    for i in range(5):
        suppression.remove(runtime, "agent-1", f"gone{i}@example.org", by="test", why="asked")

    lists = {
        "/v1/alerts": ("detail", [f"alert {i}" for i in range(4, -1, -1)]),
        "/v1/contacts/c-1/timeline": ("subject", [f"email {i}" for i in range(4, -1, -1)]),
        "/v1/users/agent-1/notifications": ("title", ["100%", "95%", "90%", "85%", "80%"]),
        "/v1/users/agent-1/suppression-removals": (
            "email",
            [f"gone{i}@example.org" for i in range(4, -1, -1)],
        ),
        "/v1/plans": ("name", ["free", "10k", "25k", "50k", "100k"]),
    }
    for path, (field, expected) in lists.items():
        params = {"user_id": "agent-1"} if "timeline" in path else {}
        for limit in (1, 2, 5, 1000):
            got = [item[field] for item in walk(client, path, limit=limit, **params)]
            assert got == expected, (path, limit)
        # The last page says so: no cursor to an empty page.
        assert client.get(path, params={"limit": 5, **params}).json()["next_cursor"] is None


def cursor_of(name: str, key: object) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, key]).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "!!!!",
        base64.urlsafe_b64encode(b"{}").decode(),
        cursor_of("alerts", 5),  # another list's
        cursor_of("suppressions", "5"),
        cursor_of("suppressions", 1.5),
    ],
)
def test_a_cursor_the_list_did_not_hand_out_is_a_422_problem_naming_cursor(
    client: TestClient, cursor: str
) -> None:
    r = client.get("/v1/users/agent-1/suppressions", params={"cursor": cursor})
    assert r.status_code == 422, r.text
    body = r.json()
    assert (body["code"], body["field"]) == ("invalid_field", "cursor")


def test_a_page_size_out_of_range_is_a_422_problem_naming_limit(client: TestClient) -> None:
    for path in ("/v1/alerts", "/v1/plans", "/v1/users/agent-1/suppressions"):
        for limit in (0, 1001):
            r = client.get(path, params={"limit": limit})
            assert (r.status_code, r.json()["field"]) == (422, "limit"), (path, r.text)


def campaign_body(emails: list[str]) -> dict[str, Any]:
    return {
        "user_id": "agent-1",
        "message": {"subject": "Hi", "html": "<p>Hi</p>"},
        "recipients": [{"id": f"c{i}", "email": e} for i, e in enumerate(emails)],
    }


def test_the_campaign_view_counts_what_its_endpoints_list_page_by_page(
    runtime: Runtime, client: TestClient
) -> None:
    # Given a request of 300 rows: every 7th invalid, every 11th (valid) one suppressed
    emails = ["not-an-address" if i % 7 == 0 else f"person{i}@example.org" for i in range(300)]
    bad = [i for i in range(300) if i % 7 == 0]
    blocked = [i for i in range(300) if i % 11 == 0 and i % 7 != 0]
    add_suppressions(runtime, [emails[i] for i in blocked])
    r = client.post("/v1/campaigns", json=campaign_body(emails))
    assert r.status_code == 202, r.text
    created = r.json()

    # Then the answer, and every poll, carries counts only
    view = client.get(f"/v1/campaigns/{created['id']}", params={"user_id": "agent-1"}).json()
    for answer in (created, view):
        assert (answer["invalid"], answer["suppressed"]) == (len(bad), len(blocked))
        assert answer["recipients"] == 300 - len(bad) - len(blocked)
        assert not any(isinstance(v, list) for v in answer.values())
    assert len(json.dumps(view)) < 1000

    # And the endpoints list every one of them, in request order, a page at a time
    invalid = walk(client, f"/v1/campaigns/{created['id']}/invalid", limit=7, user_id="agent-1")
    assert [i["index"] for i in invalid] == bad
    assert {(i["email"], i["field"]) for i in invalid} == {
        ("not-an-address", f"recipients[{n}].email") for n in bad
    }
    skipped = walk(client, f"/v1/campaigns/{created['id']}/suppressed", limit=4, user_id="agent-1")
    assert [(s["index"], s["email"], s["reason"]) for s in skipped] == [
        (i, emails[i], "manual") for i in blocked
    ]
    # Scoped like the view: another agent's id, or an unknown campaign, is not found
    for path in (f"/v1/campaigns/{created['id']}/invalid", "/v1/campaigns/nope/suppressed"):
        r = client.get(path, params={"user_id": "agent-2" if "nope" not in path else "agent-1"})
        assert (r.status_code, r.json()["code"]) == (404, "not_found")


def test_cancelled_recipients_are_counted_apart(runtime: Runtime, client: TestClient) -> None:
    created = client.post(
        "/v1/campaigns", json=campaign_body([f"p{i}@example.org" for i in range(12)])
    ).json()
    assert created["cancelled"] == 0
    r = client.post(f"/v1/campaigns/{created['id']}/cancel", params={"user_id": "agent-1"})
    assert r.status_code == 200, r.text
    view = client.get(f"/v1/campaigns/{created['id']}", params={"user_id": "agent-1"}).json()
    assert (view["status"], view["cancelled"], view["counts"]["failed"]) == ("cancelled", 12, 12)
    assert view["failed_by_reason"] == {"campaign_cancelled": 12}


def test_suppressions_are_newest_first_by_when_they_were_first_added(
    runtime: Runtime, client: TestClient, clock: Any
) -> None:
    add_suppressions(runtime, ["a@example.org"])
    clock.advance(timedelta(minutes=1))
    add_suppressions(runtime, ["b@example.org"])
    with runtime.sessions.begin() as session:
        suppression.add(
            session, "agent-1", "a@example.org", SuppressionReason.HARD_BOUNCE, clock.now()
        )
        ids = session.scalars(select(Suppression.id).order_by(Suppression.id)).all()
    assert len(ids) == 2
    listed = walk(client, "/v1/users/agent-1/suppressions")
    assert [(s["email"], s["reason"]) for s in listed] == [
        ("b@example.org", "manual"),
        ("a@example.org", "hard_bounce"),
    ]
