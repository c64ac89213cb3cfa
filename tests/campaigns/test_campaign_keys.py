"""A campaign request repeated with its idempotency key (a producer retrying after a timeout)
answers with the first campaign: one campaign, one email per recipient, one credit each."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any

from sqlalchemy import func, select, update

from devstack.devsmtp import DevSMTPServer
from dispatcher.campaigns import create
from dispatcher.credits.subscriptions import credits
from dispatcher.models import Campaign
from dispatcher.runtime import Runtime
from tests.helpers import campaign_request, make_user, wait_for

N = 40


def body(
    key: str | None, n: int = N, subject: str = "Open house, {{ first_name }}"
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "user_id": "agent-1",
        "message": {"subject": subject, "html": "<p>Hi {{ first_name }}</p>"},
        "recipients": [
            {"id": f"c{i}", "email": f"person{i}@example.org", "fields": {"first_name": f"P{i}"}}
            for i in range(n)
        ],
    }
    if key is not None:
        out["idempotency_key"] = key
    return out


def campaign_count(rt: Runtime) -> int:
    with rt.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Campaign)) or 0)


def test_a_repeated_request_answers_with_the_first_campaign_and_sends_once(
    runtime: Runtime, api_client: Any, smtp_server: DevSMTPServer, worker: Any
) -> None:
    make_user(runtime)
    first = api_client.post("/v1/campaigns", json=body("crm-blast-0042"))
    assert first.status_code == 202 and first.json()["replayed"] is False
    again = api_client.post("/v1/campaigns", json=body("crm-blast-0042"))
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["replayed"] is True

    cid = first.json()["id"]
    wait_for(
        lambda: (
            api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()["status"]
            == "completed"
        )
    )
    # A repeat after it finished still answers with it, and starts nothing.
    assert api_client.post("/v1/campaigns", json=body("crm-blast-0042")).json()["id"] == cid
    assert campaign_count(runtime) == 1
    assert len(smtp_server.messages) == N
    assert max(Counter(m.rcpt_tos[0] for m in smtp_server.messages).values()) == 1
    assert credits(runtime, "agent-1").used == N
    # Without a key, the same body is a new campaign (the producer did not ask otherwise).
    assert api_client.post("/v1/campaigns", json=body(None)).json()["id"] != cid


def test_a_key_reused_for_another_request_is_refused_and_changes_nothing(
    runtime: Runtime, api_client: Any
) -> None:
    make_user(runtime)
    cid = api_client.post("/v1/campaigns", json=body("crm-blast-7")).json()["id"]
    used = credits(runtime, "agent-1").used

    for other in (body("crm-blast-7", subject="Price cut!"), body("crm-blast-7", n=N + 1)):
        refused = api_client.post("/v1/campaigns", json=other)
        assert refused.status_code == 409
        assert refused.json()["field"] == "idempotency_key"
        assert cid in refused.json()["detail"]
    assert campaign_count(runtime) == 1
    assert credits(runtime, "agent-1").used == used
    # Keys are the agent's own: another agent may use the same one.
    make_user(runtime, "agent-2")
    other_agent = body("crm-blast-7") | {"user_id": "agent-2"}
    assert api_client.post("/v1/campaigns", json=other_agent).status_code == 202
    # A malformed key is named.
    bad = api_client.post("/v1/campaigns", json=body("no spaces allowed"))
    assert bad.status_code == 422 and bad.json()["field"] == "idempotency_key"


def test_racing_repeats_make_one_campaign_and_take_its_credits_once(make_runtime: Any) -> None:
    racers = 8
    runtimes: list[Runtime] = [make_runtime() for _ in range(racers)]
    make_user(runtimes[0])
    request = campaign_request(N)
    for round_ in range(3):
        keyed = replace(request, idempotency_key=f"crm-blast-race-{round_}")
        start = threading.Barrier(racers)
        with ThreadPoolExecutor(racers) as pool:
            ids = list(pool.map(partial(create_at, start, keyed), runtimes))
        assert len(set(ids)) == 1
    assert campaign_count(runtimes[0]) == 3
    assert credits(runtimes[0], "agent-1").used == 3 * N


def create_at(start: threading.Barrier, request: create.CampaignRequest, rt: Runtime) -> str:
    """Create the campaign as soon as every racer is ready, repeating the request while the
    first one is still being accepted (as a client told 409 request_in_progress does); its id."""
    start.wait()
    while True:
        try:
            return create.create(rt, request)[0].id
        except create.RequestInProgress:
            time.sleep(0.05)


def test_a_repeat_while_the_first_request_reserves_is_told_to_come_back(
    runtime: Runtime, api_client: Any
) -> None:
    make_user(runtime)
    first = api_client.post("/v1/campaigns", json=body("crm-blast-9")).json()
    # As if the first request were still between storing its campaign and taking the credits.
    with runtime.sessions.begin() as session:
        session.execute(
            update(Campaign).where(Campaign.id == first["id"]).values(status="reserving")
        )
    r = api_client.post("/v1/campaigns", json=body("crm-blast-9"))
    assert r.status_code == 409 and r.json()["code"] == "request_in_progress"
    assert r.headers["Retry-After"] == "2" and first["id"] in r.json()["detail"]


def test_contact_ids_sent_as_numbers_or_strings_are_the_same_request(runtime: Runtime) -> None:
    make_user(runtime)

    def request(contact_id: Any) -> create.CampaignRequest:
        return create.CampaignRequest(
            user_id="agent-1",
            provider="command_email",
            subject="Hi",
            html="<p>Hi</p>",
            recipients=[create.Recipient(contact_id, "pat@example.org", {})],
            idempotency_key="crm-blast-num",
        )

    made, chunks = create.create(runtime, request(5))
    again, none = create.create(runtime, request("5"))
    assert again.id == made.id and again.replayed and chunks and not none
