"""SmartPlan sends end to end: HTTP API -> Redis broker -> real Celery worker -> real SMTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devstack.devsmtp import DevSMTPServer
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery.outcomes import OutcomeStream
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from dispatcher.settings import Settings
from tests.crashkit import Stack, crash_settings
from tests.helpers import (
    ON_BOTH_BROKERS,
    make_user,
    seed_used_credits,
    send_request,
    statuses,
    timeline_rows,
    wait_for,
)
from workers.app import SEND_SMARTPLAN_TASK, SMARTPLAN


def send_body(n: int, user: str = "agent-1", step: str = "step-1") -> dict[str, Any]:
    return {
        "user_id": user,
        "contact": {
            "id": f"contact-{n}",
            "email": f"contact{n}@example.org",
            "fields": {"first_name": f"Pat{n}"},
        },
        "smartplan": {"plan_id": "plan-7", "run_id": f"run-{n}", "step_id": step},
        "message": {"subject": "Hi {{ first_name }}", "html": "<p>Hello {{ first_name }}</p>"},
    }


def remaining(rt: Runtime, user: str = "agent-1") -> int:
    return credits(rt, user).remaining


def all_terminal(rt: Runtime, user: str, count: int) -> bool:
    s = statuses(rt, user)
    return sum(s.get(k, 0) for k in ("sent", "failed", "unknown")) == count


@ON_BOTH_BROKERS
def test_two_credits_left_and_four_smartplan_sends(
    runtime: Runtime,
    smtp_server: DevSMTPServer,
    api_client: Any,
    worker: Any,
    retries: list[str],
) -> None:
    # Given a user with 2 credits left this month
    make_user(runtime)
    seed_used_credits(runtime, "agent-1", runtime.settings.free_plan_credits - 2)
    stream = OutcomeStream(runtime.redis, runtime.settings.outcome_stream)
    stream.ensure_group("smartplan-engine")

    # When a SmartPlan posts 4 sends
    for n in range(4):
        assert api_client.post("/v1/sends", json=send_body(n)).status_code == 202
    wait_for(lambda: all_terminal(runtime, "agent-1", 4), what="4 terminal sends")

    # Then exactly 2 messages reach contacts, the timeline holds 2 sent and 2 quota failures
    to_contacts = [m for m in smtp_server.messages if m.rcpt_tos[0].startswith("contact")]
    assert len(to_contacts) == 2
    assert statuses(runtime, "agent-1") == {"sent": 2, "failed": 2}
    events = timeline_rows(runtime, "agent-1")
    assert sorted((e.kind.value, e.reason) for e in events) == [
        ("email_failed", "quota_exhausted"),
        ("email_failed", "quota_exhausted"),
        ("email_sent", None),
        ("email_sent", None),
    ]
    for e in events:
        api = api_client.get(
            f"/v1/contacts/{e.contact_id}/timeline", params={"user_id": "agent-1"}
        ).json()
        assert [x["kind"] for x in api["items"]] == [e.kind.value]
        assert api["next_cursor"] is None
    # and 4 step outcomes are published to the SmartPlan engine's group
    wait_for(lambda: runtime.redis.xlen(runtime.settings.outcome_stream) == 4)
    outcomes = [o for _, o in stream.read("smartplan-engine", "engine-1", count=10)]
    assert sorted((o.status, o.reason) for o in outcomes) == [
        ("failed", "quota_exhausted"),
        ("failed", "quota_exhausted"),
        ("sent", None),
        ("sent", None),
    ]
    for o in outcomes:
        assert (
            api_client.get(f"/v1/sends/{o.send_id}", params={"user_id": "agent-1"}).json()["status"]
            == o.status
        )
    assert sorted(o.run_id for o in outcomes) == [f"run-{n}" for n in range(4)]
    assert {o.step_id for o in outcomes} == {"step-1"}
    # and no send was retried, and no credit is left
    assert not set(retries) & {o.send_id for o in outcomes}
    assert remaining(runtime) == 0
    # and the agent was told at 100%, after the 95% notice (one for the jump past 80..95)
    # unless the send reaching 100% was recorded first (then "limit reached" says it all)
    limit = "Command Email limit reached: sends are now failing"

    def notices() -> list[str]:
        return [
            m.parsed()["Subject"]
            for m in smtp_server.messages
            if m.rcpt_tos == ("agent-1@kw.example.com",)
        ]

    wait_for(lambda: limit in notices(), what="the limit notice")
    assert notices() in (
        ["You have used 95% of your Command Email sends this month", limit],
        [limit],
    )


def test_the_same_step_posted_twice_sends_one_message_for_one_credit(
    runtime: Runtime,
    smtp_server: DevSMTPServer,
    api_client: Any,
    worker: Any,
) -> None:
    make_user(runtime)
    first = api_client.post("/v1/sends", json=send_body(1))
    second = api_client.post("/v1/sends", json=send_body(1))
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["id"] == second.json()["id"]
    assert (first.json()["duplicate"], second.json()["duplicate"]) == (False, True)
    wait_for(lambda: all_terminal(runtime, "agent-1", 1))
    assert len(smtp_server.messages) == 1
    assert remaining(runtime) == runtime.settings.free_plan_credits - 1


def test_a_task_delivered_twice_sends_one_message_for_one_credit(
    runtime: Runtime,
    smtp_server: DevSMTPServer,
    api_client: Any,
    celery_app: Any,
    worker: Any,
) -> None:
    make_user(runtime)
    send_id = api_client.post("/v1/sends", json=send_body(1)).json()["id"]
    # The broker hands the same task out again (e.g. after a visibility timeout), twice over.
    for _ in range(2):
        celery_app.send_task(SEND_SMARTPLAN_TASK, args=[send_id], queue=SMARTPLAN)
    wait_for(lambda: all_terminal(runtime, "agent-1", 1))
    wait_for(lambda: runtime.redis.llen(SMARTPLAN) == 0, what="queue drained")
    # Give the duplicates time to run to completion after the first finished.
    wait_for(lambda: runtime.redis.xlen(runtime.settings.outcome_stream) >= 1)
    import time

    time.sleep(1.0)
    assert len(smtp_server.messages) == 1
    assert len({m.message_id for m in smtp_server.messages}) == 1
    assert remaining(runtime) == runtime.settings.free_plan_credits - 1
    assert len(timeline_rows(runtime, "agent-1")) == 1
    assert runtime.redis.xlen(runtime.settings.outcome_stream) == 1


@ON_BOTH_BROKERS
def test_a_deferred_send_is_retried_by_the_worker_and_sent_once(
    runtime: Runtime,
    smtp_server: DevSMTPServer,
    api_client: Any,
    worker: Any,
    retries: list[str],
) -> None:
    make_user(runtime)
    answers = iter(["451 4.3.0 greylisted", "421 4.7.0 try later"])
    smtp_server.handler.fault = lambda stage, _r: next(answers, None) if stage == "data" else None
    send_id = api_client.post("/v1/sends", json=send_body(1)).json()["id"]
    wait_for(lambda: all_terminal(runtime, "agent-1", 1))
    body = api_client.get(f"/v1/sends/{send_id}", params={"user_id": "agent-1"}).json()
    assert (body["status"], body["attempts"]) == ("sent", 3)
    assert retries == [send_id, send_id]
    assert len(smtp_server.messages) == 1
    assert remaining(runtime) == runtime.settings.free_plan_credits - 1


def test_a_send_deferred_past_its_retries_fails_and_returns_the_credit(
    runtime: Runtime,
    smtp_server: DevSMTPServer,
    api_client: Any,
    worker: Any,
) -> None:
    make_user(runtime)
    smtp_server.handler.fault = lambda stage, _r: "451 4.3.0 later" if stage == "data" else None
    send_id = api_client.post("/v1/sends", json=send_body(1)).json()["id"]
    wait_for(lambda: all_terminal(runtime, "agent-1", 1))
    body = api_client.get(f"/v1/sends/{send_id}", params={"user_id": "agent-1"}).json()
    assert (body["status"], body["reason"]) == ("failed", "retries_exhausted")
    assert body["attempts"] == runtime.settings.send_max_retries + 1
    assert smtp_server.messages == []
    assert remaining(runtime) == runtime.settings.free_plan_credits


def test_the_python_producer_api_enqueues_for_the_workers(
    runtime: Runtime, smtp_server: DevSMTPServer, worker: Any
) -> None:
    from dispatcher.sends import SendRequest
    from workers.producer import connect

    producer = connect(runtime.settings)
    try:
        producer.upsert_user("agent-py", communications_email="py@agents.example.com")
        req = SendRequest(
            user_id="agent-py",
            contact_id="c-9",
            contact_email="c9@example.org",
            smartplan_id="p",
            run_id="r",
            step_id="s",
            template="smartplan-check-in",
            merge_fields={"first_name": "Lee"},
        )
        result = producer.submit_send(req)
        assert producer.submit_send(req) == type(result)(result.send_id, created=False)
        wait_for(lambda: producer.get_send(result.send_id).status == "sent")
        [event] = producer.timeline("agent-py", "c-9").items
        assert (event.kind, event.subject) == ("email_sent", "Checking in, Lee")
        [got] = smtp_server.messages
        assert got.parsed()["Reply-To"] == "py@agents.example.com"  # sent as the platform
    finally:
        producer.runtime.close()


def test_a_send_the_broker_did_not_take_is_enqueued_when_the_request_is_repeated(
    runtime: Runtime, smtp_server: DevSMTPServer, api_client: Any, worker: Any
) -> None:
    from fastapi.testclient import TestClient

    from dispatcher.api.app import create_api
    from tests.conftest import free_port
    from workers.app import create_app
    from workers.queue import CeleryTaskQueue

    make_user(runtime)
    dead = create_app(
        runtime.settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0"), runtime
    )
    dead.conf.broker_transport_options = {"max_retries": 0}
    dead.conf.task_publish_retry = False
    down = TestClient(
        create_api(runtime, CeleryTaskQueue(dead)),
        headers={"Authorization": "Bearer test-token-123"},
    )
    # Given the broker is down when the SmartPlan posts
    r = down.post("/v1/sends", json=send_body(1))
    assert r.status_code == 503 and r.json()["code"] == "queue_unavailable"
    assert statuses(runtime, "agent-1") == {"queued": 1}
    # When the producer repeats the request once the broker is back
    again = api_client.post("/v1/sends", json=send_body(1))
    assert again.status_code == 202 and again.json()["duplicate"] is True
    # Then the send is delivered, once
    wait_for(lambda: all_terminal(runtime, "agent-1", 1))
    assert len(smtp_server.messages) == 1
    # and a further repeat enqueues nothing
    api_client.post("/v1/sends", json=send_body(1))
    assert runtime.redis.llen(SMARTPLAN) == 0


def test_a_send_waits_out_a_quota_redis_outage_and_is_sent_once(
    runtime: Runtime,
    make_runtime: Any,
    smtp_server: DevSMTPServer,
    tmp_path: Any,
    retries: list[str],
) -> None:
    import shutil
    import subprocess

    from celery.contrib.testing.worker import start_worker

    from tests.conftest import free_port
    from workers.app import create_app

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server to start a second Redis")
    # Given workers whose quota store (a second Redis) is down while the broker is up
    port = free_port()
    quota_rt = make_runtime(redis_url=f"redis://127.0.0.1:{port}/0")
    app = create_app(runtime.settings, quota_rt)
    make_user(runtime)
    send_id = submit_send(runtime, InlineQueue(), send_request()).send_id
    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        shutdown_timeout=30,
        loglevel="WARNING",
    ):
        app.send_task(SEND_SMARTPLAN_TASK, args=[send_id], queue=SMARTPLAN)
        wait_for(lambda: len(retries) >= 2, what="retries while Redis is down")
        assert statuses(runtime, "agent-1") == {"queued": 1}
        # When it comes back (empty: the grant is rebuilt from SQL)
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            # Then the send goes out once, with one credit
            wait_for(lambda: all_terminal(runtime, "agent-1", 1), timeout=30)
            assert statuses(runtime, "agent-1") == {"sent": 1}
            assert len(smtp_server.messages) == 1
            assert credits(quota_rt, "agent-1").used == 1
        finally:
            server.terminate()
            server.wait(10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_reuses_its_smtp_connections_and_quits_them_when_it_stops(
    settings: Settings, smtp_server: DevSMTPServer, tmp_path: Path
) -> None:
    """``worker_smartplan`` as the Procfile runs it (threads pool): its threads share the
    process's connections, and SIGTERM (a warm shutdown) QUITs them."""
    with Stack(crash_settings(settings), tmp_path) as stack:
        make_user(stack.rt)
        worker = stack.workers.start(SMARTPLAN, pool="threads", concurrency=2)
        stack.workers.wait_ready(1, timeout=60)
        for n in range(12):
            submit_send(stack.rt, stack.rt.queue, send_request(n=n))
        wait_for(lambda: all_terminal(stack.rt, "agent-1", 12), timeout=60)
        assert statuses(stack.rt, "agent-1") == {"sent": 12}
        peers = set(smtp_server.handler.mail_peers)
        assert 1 <= len(peers) <= 2  # two threads: at most one connection each
        assert smtp_server.handler.quits == 0
        worker.stop()  # SIGTERM, then wait for it to exit
        assert worker.returncode() == 0
    assert smtp_server.handler.quits == len(peers)
    assert len(smtp_server.messages) == 12
