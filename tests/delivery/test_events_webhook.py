"""The events webhook: every timeline event POSTed to a real HTTP receiver, signed, in order,
at least once, through a receiver that fails its first tries."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from dispatcher import alerts
from dispatcher.clock import FrozenClock
from dispatcher.delivery import events_webhook as webhooks
from dispatcher.delivery import smartplan as delivery
from dispatcher.delivery import suppression, unsubscribe
from dispatcher.models import (
    AlertKind,
    EventCursor,
    SendStatus,
    SuppressionReason,
    TimelineEvent,
    TimelineKind,
)
from dispatcher.ports import InlineQueue
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import make_user, send_request

SECRET = "webhook-secret-of-at-least-32-characters"


class Receiver:
    """A CRM's webhook endpoint on loopback: records each POST; answers ``fail_first`` of
    them with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 500 if len(outer.posts) < outer.fail_first else 204
                outer.posts.append((dict(self.headers.items()), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/command-email"

    def accepted_events(self) -> list[dict[str, Any]]:
        return [
            e for _, body, code in self.posts if code == 204 for e in json.loads(body)["events"]
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


def _runtime(make_runtime: Callable[..., Runtime], url: str) -> Runtime:
    return make_runtime(events_webhook_url=url, events_webhook_secret=SECRET)


def test_events_reach_the_receiver_signed_in_order_through_failures(
    make_runtime: Callable[..., Runtime], clock: FrozenClock, receiver: Receiver
) -> None:
    rt = _runtime(make_runtime, receiver.url)
    make_user(rt)
    with rt.sessions.begin() as session:
        suppression.add(
            session, "agent-1", "contact3@example.org", SuppressionReason.MANUAL, clock.now()
        )
    ids = [
        submit_send(rt, InlineQueue(), send_request(n=n, run_id=f"r{n}")).send_id for n in (1, 2, 3)
    ]
    assert [delivery.deliver(rt, i) for i in ids] == [
        SendStatus.SENT,
        SendStatus.SENT,
        SendStatus.FAILED,
    ]
    unsubscribe.unsubscribe(rt, unsubscribe.token_for(rt.settings, ids[0]))
    unsubscribe.unsubscribe(rt, unsubscribe.token_for(rt.settings, ids[0]))  # once on the timeline

    # The receiver fails twice: each failure waits (backoff), nothing is lost or skipped.
    assert webhooks.push(rt).stopped == "failed"
    assert webhooks.push(rt).stopped == "retry_later"
    clock.advance(timedelta(minutes=11))
    assert webhooks.push(rt).stopped == "failed"
    clock.advance(timedelta(minutes=11))
    done = webhooks.push(rt)
    assert (done.stopped, done.delivered, done.posts) == ("caught_up", 4, 1)
    assert webhooks.push(rt).stopped == "caught_up"  # nothing new, nothing POSTed
    assert len(receiver.posts) == 3

    for headers, body, _ in receiver.posts:
        received_at = float(headers[webhooks.TIMESTAMP_HEADER])  # signed at the test's clock
        assert webhooks.verify(SECRET, headers, body, now=received_at + 2)
        assert not webhooks.verify("another-secret-of-at-least-32-chars!", headers, body)
        assert not webhooks.verify(SECRET, headers, body, now=received_at + 3600)  # replayed
        assert not webhooks.verify(SECRET, headers, body + b" ", now=received_at)
    events = receiver.accepted_events()
    assert [(e["type"], e["send_id"]) for e in events] == [
        ("sent", ids[0]),
        ("sent", ids[1]),
        ("failed", ids[2]),
        ("unsubscribed", ids[0]),
    ]
    assert events[2]["reason"] == "suppressed"
    assert events[3]["source"]["type"] == "smartplan" and events[3]["contact_id"] == "contact-1"
    assert len({e["id"] for e in events}) == 4
    # What the failed POSTs carried came again, whole, in the one that was accepted.
    first = json.loads(receiver.posts[0][1])["events"]
    assert first == events


def test_a_missing_id_is_waited_for_then_passed(
    make_runtime: Callable[..., Runtime], clock: FrozenClock
) -> None:
    r = Receiver()
    try:
        rt = _runtime(make_runtime, r.url)
        make_user(rt)
        send_id = submit_send(rt, InlineQueue(), send_request()).send_id
        delivery.deliver(rt, send_id)
        assert webhooks.push(rt).delivered == 1
        with rt.sessions.begin() as session:
            last = session.scalar(select(func.max(TimelineEvent.id)))
            assert last is not None
            # id last+1 is taken by a transaction not committed yet (or rolled back).
            session.execute(
                insert(TimelineEvent).values(
                    id=last + 2,
                    user_id="agent-1",
                    contact_id="contact-1",
                    send_id=send_id,
                    kind=TimelineKind.UNSUBSCRIBED,
                    status=SendStatus.SENT,
                    source={},
                    occurred_at=clock.now(),
                )
            )
        assert webhooks.push(rt).stopped == "waiting_for_gap"
        clock.advance(webhooks.GAP_WAIT / 2)
        assert webhooks.push(rt).stopped == "waiting_for_gap"
        clock.advance(webhooks.GAP_WAIT)
        assert webhooks.push(rt).delivered == 1
        assert [e["id"] for e in r.accepted_events()][-1] == f"evt_{last + 2}"
    finally:
        r.close()


def test_a_receiver_failing_for_long_raises_an_alert(
    make_runtime: Callable[..., Runtime], clock: FrozenClock
) -> None:
    r = Receiver(fail_first=100)
    try:
        rt = _runtime(make_runtime, r.url)
        make_user(rt)
        delivery.deliver(rt, submit_send(rt, InlineQueue(), send_request()).send_id)
        for _ in range(webhooks.ALERT_AFTER):
            assert webhooks.push(rt).stopped == "failed"
            clock.advance(timedelta(minutes=11))
        with rt.sessions() as session:
            cursor = session.get(EventCursor, webhooks.CURSOR)
            assert cursor is not None and cursor.last_id == 0
            assert cursor.failures == webhooks.ALERT_AFTER and cursor.detail == "answered 500"
        kinds = [a.kind for a in alerts.recent(rt).items]
        assert kinds == [AlertKind.EVENTS_WEBHOOK_FAILING.value]
    finally:
        r.close()
