"""POST /v1/sends/batch: many SmartPlan sends in one request, each answered as POST /v1/sends
would answer it alone; a refused send refuses only itself; replays and repeats send nothing
twice. End to end through the real broker, a real worker and a real SMTP server."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher.api.app import create_api
from dispatcher.credits.subscriptions import credits
from dispatcher.models import Send
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import SubmitResult, submit_batch
from dispatcher.settings import ApiClient
from tests.conftest import free_port
from tests.helpers import make_user, send_request, statuses, wait_for
from workers.app import SMARTPLAN, create_app
from workers.queue import CeleryTaskQueue

#: A client that may send for agent-1 only.
CRM = ApiClient(
    "crm", "crm-token-0001", frozenset({"smartplan:send", "read"}), frozenset({"agent-1"})
)


def step(n: int, user: str = "agent-1", **changes: Any) -> dict[str, Any]:
    """One send of a batch: contact ``n`` of ``user``, run ``run-<n>``."""
    body: dict[str, Any] = {
        "user_id": user,
        "contact": {
            "id": f"contact-{n}",
            "email": f"contact{n}@example.org",
            "fields": {"first_name": f"Pat{n}"},
        },
        "smartplan": {"plan_id": "plan-7", "run_id": f"run-{n}", "step_id": "step-1"},
        "message": {"subject": "Hi {{ first_name }}", "html": "<p>Hello {{ first_name }}</p>"},
    }
    body.update(changes)
    return body


@pytest.fixture
def runtime(make_runtime: Callable[..., Runtime]) -> Runtime:
    rt = make_runtime(api_clients=(CRM,))
    for user in ("agent-1", "agent-2"):
        make_user(rt, user)
    return rt


@pytest.fixture
def queue() -> InlineQueue:
    return InlineQueue()


@pytest.fixture
def inline(runtime: Runtime, queue: InlineQueue) -> TestClient:
    """The API over a queue that records what it is handed (no worker)."""
    return TestClient(
        create_api(runtime, queue), headers={"Authorization": "Bearer test-token-123"}
    )


def received(smtp_server: DevSMTPServer) -> Counter[str]:
    """How many messages each recipient got."""
    return Counter(r for m in smtp_server.messages for r in m.rcpt_tos)


def terminal(rt: Runtime, user: str, count: int) -> bool:
    s = statuses(rt, user)
    return sum(s.get(k, 0) for k in ("sent", "failed", "unknown")) == count


def stored(rt: Runtime) -> dict[str, Any]:
    """Every send row by id."""
    with rt.sessions() as session:
        return {s.id: s for s in session.scalars(select(Send))}


def test_bad_sends_are_refused_alone_and_the_rest_are_delivered(
    runtime: Runtime, celery_app: Any, worker: Any, smtp_server: DevSMTPServer
) -> None:
    crm = TestClient(
        create_api(runtime, CeleryTaskQueue(celery_app)),
        headers={"Authorization": f"Bearer {CRM.token}"},
    )
    missing_id = step(2)
    del missing_id["contact"]["id"]
    batch = [
        step(0),
        step(1, contact={"id": "contact-1", "email": "not-an-address"}),
        missing_id,
        step(3, user="nobody"),
        step(4, user="agent-2"),  # exists, but this client may not act for agent-2
        step(5, surprise=1),
        "not an object",
        step(7),
    ]
    r = crm.post("/v1/sends/batch", json={"sends": batch})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(range(len(batch)))
    assert [x["status_code"] for x in results] == [202, 422, 422, 404, 404, 422, 422, 202]
    for x in (results[0], results[7]):
        assert set(x) == {"index", "status_code", "id", "status", "duplicate"}
        assert x["status"] == "queued" and x["duplicate"] is False
    fields = [x["error"]["field"] for x in results if x["status_code"] == 422]
    assert fields == [
        "sends[1].contact.email",
        "sends[2].contact.id",
        "sends[5].surprise",
        "sends[6]",
    ]
    for x in results[1:7]:
        assert set(x) == {"index", "status_code", "error"}
        assert {"code", "detail", "field"} <= set(x["error"])
    assert results[3]["error"]["code"] == results[4]["error"]["code"] == "not_found"

    # Each refusal is what the send alone would have got, its field named inside the batch
    for n in (1, 2, 5):
        alone = crm.post("/v1/sends", json=batch[n])
        assert alone.status_code == 422
        assert results[n]["error"]["code"] == alone.json()["code"] == "invalid_field"
        assert results[n]["error"]["field"] == f"sends[{n}].{alone.json()['field']}"
        assert results[n]["error"]["detail"] == f"sends[{n}].{alone.json()['detail']}"
    assert crm.post("/v1/sends", json=batch[4]).status_code == 404

    # Only the two good sends were stored, and both reach their contacts, once
    wait_for(lambda: terminal(runtime, "agent-1", 2), what="2 terminal sends")
    assert statuses(runtime, "agent-1") == {"sent": 2}
    assert statuses(runtime, "agent-2") == {}
    assert set(stored(runtime)) == {results[0]["id"], results[7]["id"]}
    assert received(smtp_server) == {"contact0@example.org": 1, "contact7@example.org": 1}


def test_the_same_batch_again_answers_the_first_ids_and_sends_nothing_twice(
    runtime: Runtime, api_client: TestClient, worker: Any, smtp_server: DevSMTPServer
) -> None:
    batch = {"sends": [step(n) for n in range(3)]}
    first = api_client.post("/v1/sends/batch", json=batch).json()["results"]
    wait_for(lambda: terminal(runtime, "agent-1", 3), what="3 terminal sends")

    again = api_client.post("/v1/sends/batch", json=batch).json()["results"]

    assert [x["id"] for x in again] == [x["id"] for x in first]
    assert [x["duplicate"] for x in first] == [False] * 3
    assert [x["duplicate"] for x in again] == [True] * 3
    assert [x["status"] for x in again] == ["sent"] * 3  # where each send is now
    assert runtime.redis.llen(SMARTPLAN) == 0  # nothing was enqueued again
    assert len(stored(runtime)) == 3
    assert received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(3)}
    assert len({m.message_id for m in smtp_server.messages}) == 3
    assert credits(runtime, "agent-1").used == 3


def test_a_replay_enqueues_nothing_a_single_send_already_stored(
    runtime: Runtime, inline: TestClient, queue: InlineQueue
) -> None:
    single = inline.post("/v1/sends", json=step(1)).json()
    results = inline.post("/v1/sends/batch", json={"sends": [step(0), step(1)]}).json()["results"]
    assert results[1]["id"] == single["id"] and results[1]["duplicate"] is True
    again = inline.post("/v1/sends/batch", json={"sends": [step(0), step(1)]}).json()["results"]
    assert [x["id"] for x in again] == [x["id"] for x in results]
    assert sorted(queue.enqueued) == sorted([single["id"], results[0]["id"]])  # each once


def test_a_repeat_inside_one_batch_is_a_duplicate_of_the_first(
    runtime: Runtime, inline: TestClient, queue: InlineQueue
) -> None:
    # The same run + step + contact twice (the message may differ: the key is what counts)
    repeat = step(0, message={"subject": "Other", "html": "<p>Other</p>"})
    r = inline.post("/v1/sends/batch", json={"sends": [step(0), step(1), repeat]})
    results = r.json()["results"]
    assert [x["status_code"] for x in results] == [202, 202, 202]
    assert results[2]["id"] == results[0]["id"]
    assert [x["duplicate"] for x in results] == [False, False, True]
    assert len(stored(runtime)) == 2
    assert queue.enqueued == [results[0]["id"], results[1]["id"]]


def test_sends_sharing_a_bad_message_are_each_refused_naming_it(
    runtime: Runtime, inline: TestClient, queue: InlineQueue
) -> None:
    bad = {"subject": "Hi {{ first_name ", "html": "<p>Hello</p>"}
    batch = [step(0, message=bad), step(1), step(2, message=bad)]
    results = inline.post("/v1/sends/batch", json={"sends": batch}).json()["results"]
    assert [x["status_code"] for x in results] == [422, 202, 422]
    assert results[0]["error"]["field"] == "sends[0].message.subject"
    assert results[2]["error"]["field"] == "sends[2].message.subject"
    assert queue.enqueued == [results[1]["id"]]


def test_each_agent_of_a_mixed_batch_pays_for_its_own_sends(
    runtime: Runtime, api_client: TestClient, worker: Any, smtp_server: DevSMTPServer
) -> None:
    users = ["agent-1", "agent-2", "agent-1", "agent-2", "agent-1"]
    batch = [step(n, user=u) for n, u in enumerate(users)]
    r = api_client.post("/v1/sends/batch", json={"sends": batch})
    assert [x["status_code"] for x in r.json()["results"]] == [202] * 5
    wait_for(lambda: terminal(runtime, "agent-1", 3) and terminal(runtime, "agent-2", 2))
    assert statuses(runtime, "agent-1") == {"sent": 3}
    assert statuses(runtime, "agent-2") == {"sent": 2}
    free = runtime.settings.free_plan_credits
    assert (credits(runtime, "agent-1").used, credits(runtime, "agent-1").remaining) == (
        3,
        free - 3,
    )
    assert (credits(runtime, "agent-2").used, credits(runtime, "agent-2").remaining) == (
        2,
        free - 2,
    )
    assert received(smtp_server) == {f"contact{n}@example.org": 1 for n in range(5)}


def test_a_batch_carries_one_to_a_thousand_sends(
    runtime: Runtime, inline: TestClient, queue: InlineQueue
) -> None:
    for body in ({"sends": []}, {"sends": [step(n) for n in range(1001)]}):
        r = inline.post("/v1/sends/batch", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "invalid_field" and r.json()["field"] == "sends"
    for body in ({"send": [step(0)]}, {"sends": step(0)}, [step(0)], {"sends": [step(0)], "x": 1}):
        r = inline.post("/v1/sends/batch", json=body)
        assert r.status_code == 422 and r.json()["code"] == "invalid_field", r.text
    assert queue.enqueued == [] and stored(runtime) == {}

    r = inline.post("/v1/sends/batch", json={"sends": [step(n) for n in range(1000)]})
    results = r.json()["results"]
    assert [x["status_code"] for x in results] == [202] * 1000
    assert len(stored(runtime)) == 1000
    assert queue.enqueued == [x["id"] for x in results]


def test_a_batch_the_broker_did_not_take_is_queued_by_its_replay(
    runtime: Runtime, api_client: TestClient, worker: Any, smtp_server: DevSMTPServer
) -> None:
    dead = create_app(
        runtime.settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0"), runtime
    )
    dead.conf.broker_transport_options = {"max_retries": 0}
    dead.conf.task_publish_retry = False
    down = TestClient(
        create_api(runtime, CeleryTaskQueue(dead)),
        headers={"Authorization": "Bearer test-token-123"},
    )
    batch = {"sends": [step(0), step(1, user="nobody"), step(2)]}
    # Given the broker is down when the batch is posted
    r = down.post("/v1/sends/batch", json=batch)
    assert r.status_code == 503 and r.json()["code"] == "queue_unavailable"
    rows = stored(runtime)
    assert len(rows) == 2 and all(s.enqueued_at is None for s in rows.values())
    # When the producer repeats it once the broker is back
    again = api_client.post("/v1/sends/batch", json=batch).json()["results"]
    # Then the stored sends are answered as duplicates, queued and delivered once
    assert [x["status_code"] for x in again] == [202, 404, 202]
    assert {again[0]["id"], again[2]["id"]} == set(rows)
    assert again[0]["duplicate"] is again[2]["duplicate"] is True
    wait_for(lambda: terminal(runtime, "agent-1", 2), what="2 terminal sends")
    assert received(smtp_server) == {"contact0@example.org": 1, "contact2@example.org": 1}
    assert all(s.enqueued_at is not None for s in stored(runtime).values())


def test_racing_submissions_of_one_batch_store_each_send_once(runtime: Runtime) -> None:
    # Given four producers submitting the same 50 steps at the same moment
    requests = [send_request(n=n) for n in range(50)]
    queue = InlineQueue()
    answers: list[list[Any]] = []
    start = threading.Barrier(4)

    def submit() -> None:
        start.wait()
        answers.append(submit_batch(runtime, queue, requests))

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every one got the same id for each step, and each step was stored once
    assert len(answers) == 4
    assert all(isinstance(a, SubmitResult) for run in answers for a in run)
    ids = [[a.send_id for a in run] for run in answers]
    assert ids[1:] == ids[:1] * 3
    assert sum(a.created for run in answers for a in run) == 50
    assert len(stored(runtime)) == 50
    assert set(queue.enqueued) == set(ids[0])
