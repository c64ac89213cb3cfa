"""Template bombs through the real stack: HTTP API -> broker -> real Celery worker (threads
pool, where Celery enforces no time limit) -> real SMTP. The bomb's send fails alone."""

from __future__ import annotations

from typing import Any

import pytest

from devstack.devsmtp import DevSMTPServer
from dispatcher.credits.subscriptions import credits
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tests.helpers import make_user, statuses, timeline_rows, wait_for

CPU_BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
RECURSION_BOMB = (
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}"
)
OUTPUT_BOMB = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.with_overrides(template_render_seconds=0.5, campaign_chunk_size=50)


def send_body(n: int, html: str) -> dict[str, Any]:
    return {
        "user_id": "agent-1",
        "contact": {
            "id": f"contact-{n}",
            "email": f"contact{n}@example.org",
            "fields": {"first_name": f"Pat{n}"},
        },
        "smartplan": {"plan_id": "plan-7", "run_id": f"run-{n}", "step_id": "step-1"},
        "message": {"subject": "Hi {{ first_name }}", "html": html},
    }


def test_template_bombs_fail_their_own_sends_while_the_worker_keeps_sending(
    runtime: Runtime, smtp_server: DevSMTPServer, api_client: Any, worker: Any
) -> None:
    # Given an agent, and a worker with 4 threads
    make_user(runtime)
    before = credits(runtime, "agent-1").remaining

    # When three bombs are posted among eight ordinary sends
    bombs = {0: CPU_BOMB, 4: RECURSION_BOMB, 8: OUTPUT_BOMB}
    ids = {}
    for n in range(11):
        html = bombs.get(n, "<p>Hello {{ first_name }}</p>")
        answer = api_client.post("/v1/sends", json=send_body(n, html))
        assert answer.status_code == 202
        ids[n] = answer.json()["id"]

    def all_done() -> bool:
        s = statuses(runtime, "agent-1")
        return s.get("sent", 0) + s.get("failed", 0) == 11

    wait_for(all_done, timeout=60, what="11 terminal sends")

    # Then each bomb failed render_error with its credit back, and every other send was sent
    for n, send_id in ids.items():
        view = api_client.get(f"/v1/sends/{send_id}", params={"user_id": "agent-1"}).json()
        if n in bombs:
            assert (view["status"], view["reason"]) == ("failed", "render_error"), view
            assert "exceeded its limits" in view["detail"]
        else:
            assert view["status"] == "sent", view
    got = sorted(m.rcpt_tos[0] for m in smtp_server.messages if m.rcpt_tos[0].startswith("c"))
    assert got == sorted(f"contact{n}@example.org" for n in range(11) if n not in bombs)
    assert credits(runtime, "agent-1").remaining == before - 8
    failed = [e for e in timeline_rows(runtime, "agent-1") if e.reason == "render_error"]
    assert sorted(e.contact_id for e in failed) == ["contact-0", "contact-4", "contact-8"]


def test_a_recipient_whose_merge_field_blows_up_the_template_fails_alone(
    runtime: Runtime, smtp_server: DevSMTPServer, api_client: Any, worker: Any
) -> None:
    # Given a campaign whose template loops as often as a merge field says, squared
    make_user(runtime)
    html = (
        "<p>Hi {{ first_name }}</p>"
        "{% for i in range(rows|int) %}{% for j in range(rows|int) %}{% endfor %}{% endfor %}"
    )
    people = [
        {"id": f"c{i}", "email": f"person{i}@example.org", "fields": {"first_name": f"P{i}"}}
        for i in range(120)
    ]
    for person in people:
        person["fields"]["rows"] = 100_000 if person["id"] == "c7" else 3
    body = {
        "user_id": "agent-1",
        "message": {"subject": "Listings for {{ first_name }}", "html": html},
        "recipients": people,
    }

    # When it is sent
    cid = api_client.post("/v1/campaigns", json=body).json()["id"]

    def finished() -> bool:
        return bool(
            api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()["status"]
            == "completed"
        )

    wait_for(finished, timeout=60, what="the campaign completed")

    # Then only that recipient failed, with its credit back; the other 119 were sent
    final = api_client.get(f"/v1/campaigns/{cid}", params={"user_id": "agent-1"}).json()
    assert final["failed_by_reason"] == {"render_error": 1}
    assert final["counts"]["sent"] == 119
    got = {m.rcpt_tos[0] for m in smtp_server.messages if m.rcpt_tos[0].startswith("person")}
    assert len(got) == 119 and "person7@example.org" not in got
    assert credits(runtime, "agent-1").used == 119
