"""Single POST /v1/sends that arrive at the same moment are stored in one transaction and
enqueued as one batch task (group commit, :class:`dispatcher.sends.Submissions`), each request
keeping its own answer: its id, its duplicate, its 404 or 422. End to end through the real
broker, a real worker and a real SMTP server; an outage answers every request of the group."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from devstack.devsmtp import DevSMTPServer
from dispatcher import metrics
from dispatcher.api.app import create_api
from dispatcher.credits.subscriptions import credits
from dispatcher.errors import QueueUnavailable
from dispatcher.models import Send
from dispatcher.runtime import Runtime
from tests.api.test_batch import step
from tests.helpers import make_user, statuses, wait_for
from workers.queue import CeleryTaskQueue

HEADERS = {"Authorization": "Bearer test-token-123"}


class _FirstHeld(CeleryTaskQueue):
    """The real broker, with the first single send's publish held until ``behind`` more sends
    wait behind it in the API's group; ``down`` makes every later publish fail as a broker
    outage does."""

    def __init__(self, app: Any, behind: int, down: bool = False) -> None:
        super().__init__(app)
        self.behind = behind
        self.down = down
        self.waiting: Callable[[], int] = lambda: 0
        self.held = True

    def enqueue_send(self, send_id: str) -> None:
        if self.held:
            self.held = False
            wait_for(lambda: self.waiting() >= self.behind, what=f"{self.behind} sends waiting")
        elif self.down:
            raise QueueUnavailable("ConnectionError: the broker is down")
        super().enqueue_send(send_id)

    def enqueue_sends(self, send_ids: Any) -> None:
        if self.down:
            raise QueueUnavailable("ConnectionError: the broker is down")
        super().enqueue_sends(send_ids)


def _client(rt: Runtime, queue: _FirstHeld) -> TestClient:
    client = TestClient(create_api(rt, queue), headers=HEADERS)
    queue.waiting = lambda: client.app.state.producer.singles.waiting  # type: ignore[attr-defined]
    return client


def _post_at_once(client: TestClient, queue: _FirstHeld, bodies: list[dict[str, Any]]) -> list[Any]:
    """POST each body from its own thread, the others once the first one's publish is held;
    the answers."""
    answers: list[Any] = [None] * len(bodies)

    def post(i: int) -> None:
        answers[i] = client.post("/v1/sends", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    threads[0].start()
    wait_for(lambda: not queue.held, what="the first send held at its publish")
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return answers


def _group_sizes() -> tuple[float, float]:
    samples = {s.name: s.value for m in metrics.SUBMIT_GROUP_SENDS.collect() for s in m.samples}
    return samples["dispatcher_submit_group_sends_count"], samples[
        "dispatcher_submit_group_sends_sum"
    ]


def test_single_sends_arriving_together_are_stored_and_enqueued_as_one_group(
    runtime: Runtime, celery_app: Any, worker: Any, smtp_server: DevSMTPServer
) -> None:
    # Given an agent, and 17 single sends posted at once while the first one's publish is held
    # until 15 others wait behind it: 12 new ones, one posted twice, one for an unknown agent,
    # and one invalid (refused before it ever waits)
    make_user(runtime)
    queue = _FirstHeld(celery_app, behind=15)
    client = _client(runtime, queue)
    bodies = [
        step(0),
        *[step(n) for n in range(1, 13)],
        step(13),
        step(13),
        step(14, user="nobody"),
        step(15, contact={"id": "contact-15", "email": "not-an-address"}),
    ]
    before = _group_sizes()

    answers = _post_at_once(client, queue, bodies)

    # Then each request got its own answer, as alone
    codes = [a.status_code for a in answers]
    assert codes == [202] * 15 + [404, 422], [a.text for a in answers]
    assert answers[15].json()["code"] == "not_found"
    assert answers[16].json()["field"] == "contact.email"
    accepted = [a.json() for a in answers[:15]]
    assert accepted[13]["id"] == accepted[14]["id"]  # one send for the key posted twice
    assert sorted(x["duplicate"] for x in accepted[13:15]) == [False, True]
    ids = {x["id"] for x in accepted}
    assert len(ids) == 14
    # ...the first alone, the 15 behind it (the unknown agent's included) as one group
    count, total = _group_sizes()
    assert (count - before[0], total - before[1]) == (2, 16)
    # ...and every stored send reaches its contact once, one credit each
    wait_for(lambda: statuses(runtime, "agent-1").get("sent") == 14, what="14 sends sent")
    with runtime.sessions() as session:
        assert set(session.scalars(select(Send.id))) == ids
        assert all(session.scalars(select(Send.enqueued_at.is_not(None))))
    received = Counter(r for m in smtp_server.messages for r in m.rcpt_tos)
    assert received == {f"contact{n}@example.org": 1 for n in range(14)}
    assert credits(runtime, "agent-1").used == 14


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_broker_outage_answers_every_request_of_the_group_and_a_repeat_enqueues_them(
    runtime: Runtime, celery_app: Any, worker: Any, smtp_server: DevSMTPServer
) -> None:
    # Given 6 single sends posted at once, the broker failing once the first is published
    make_user(runtime)
    queue = _FirstHeld(celery_app, behind=5, down=True)
    client = _client(runtime, queue)
    bodies = [step(n) for n in range(6)]

    answers = _post_at_once(client, queue, bodies)

    # Then the first is accepted and the 5 grouped behind it are each told the queue is down
    assert answers[0].status_code == 202
    assert [a.status_code for a in answers[1:]] == [503] * 5
    assert {a.json()["code"] for a in answers[1:]} == {"queue_unavailable"}
    assert all(a.headers.get("retry-after") for a in answers[1:])
    # ...stored, but never taken by the broker
    with runtime.sessions() as session:
        rows = session.execute(select(Send.contact_id, Send.enqueued_at)).all()
    assert sorted(c for c, e in rows if e is None) == [f"contact-{n}" for n in range(1, 6)]

    # When the broker is back and each request is repeated (one at a time)
    queue.down = False
    again = [client.post("/v1/sends", json=body) for body in bodies[1:]]

    # Then each gets the send first stored for it, and every contact gets one message
    assert [a.status_code for a in again] == [202] * 5
    assert all(a.json()["duplicate"] for a in again)
    wait_for(lambda: statuses(runtime, "agent-1").get("sent") == 6, what="6 sends sent")
    received = Counter(r for m in smtp_server.messages for r in m.rcpt_tos)
    assert received == {f"contact{n}@example.org": 1 for n in range(6)}
    assert credits(runtime, "agent-1").used == 6
