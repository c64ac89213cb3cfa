"""Poison messages: an item whose handling keeps failing for an unforeseen cause reaches a
terminal outcome after SEND_MAX_RETRIES instead of looping; a campaign recipient whose message
cannot be built fails alone. Run through a real Celery worker, SMTP server and Redis.

The trigger is real: a lone UTF-16 surrogate in a merge field (what a JavaScript client sends
when it cuts an emoji in half) renders into the message and makes building the message's bytes
raise ``UnicodeEncodeError``. Submissions refuse it now (the text policy), so it is written to
the stored row after submission, as a row stored before that policy holds it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from devstack.devsmtp import DevSMTPServer
from dispatcher import alerts
from dispatcher.campaigns import control, create
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery.outcomes import OutcomeStream
from dispatcher.models import Send, SendStatus
from dispatcher.ports import OutboxOnly
from dispatcher.runtime import Runtime
from dispatcher.sends import submit_send
from tests.helpers import (
    campaign_request,
    make_user,
    send_request,
    statuses,
    timeline_rows,
    wait_for,
)
from workers.queue import CeleryTaskQueue

BROKEN = "Pat \ud83d"  # half an emoji


def _break(runtime: Runtime, *where: Any) -> None:
    """Give the stored sends matching ``where`` the broken merge field."""
    with runtime.sessions.begin() as session:
        session.execute(update(Send).where(*where).values(merge_fields={"first_name": BROKEN}))


def test_a_smartplan_send_that_cannot_be_built_fails_as_internal_error_after_its_budget(
    runtime: Runtime, celery_app: Any, worker: Any, retries: list[str]
) -> None:
    # Given a send whose message cannot be built (SEND_MAX_RETRIES is 3 in the tests)
    make_user(runtime)
    stream = OutcomeStream(runtime.redis, runtime.settings.outcome_stream)
    stream.ensure_group("engine")
    send_id = submit_send(runtime, OutboxOnly(), send_request()).send_id
    _break(runtime, Send.id == send_id)
    CeleryTaskQueue(celery_app).enqueue_send(send_id)

    # When the worker has run it: after the budget it is failed, not retried forever
    wait_for(lambda: statuses(runtime, "agent-1") == {"failed": 1}, what="a terminal outcome")
    with runtime.sessions() as session:
        from_db = session.execute(select(Send.status, Send.reason).where(Send.id == send_id)).one()
    assert (from_db.status, from_db.reason) == (SendStatus.FAILED, "internal_error")
    assert retries.count(send_id) == runtime.settings.send_max_retries

    # Then its credit is back (given back right after the outcome's commit), its timeline says
    # why, its outcome is on the stream
    wait_for(lambda: credits(runtime, "agent-1").used == 0, what="the credit back")
    [event] = timeline_rows(runtime, "agent-1")
    assert (event.kind.value, event.reason) == ("email_failed", "internal_error")
    assert "UnicodeEncodeError" in (event.detail or "")
    wait_for(lambda: runtime.redis.xlen(runtime.settings.outcome_stream) == 1)
    [(_, outcome)] = stream.read("engine", "e1")
    assert (outcome.send_id, outcome.status, outcome.reason) == (
        send_id,
        "failed",
        "internal_error",
    )

    # and an alert names it, once
    def raised() -> list[Any]:
        return [a for a in alerts.recent(runtime).items if a.kind == "internal_error"]

    wait_for(lambda: len(raised()) == 1, what="the alert")
    assert send_id in raised()[0].detail


def test_a_campaign_recipient_that_cannot_be_built_fails_alone_and_the_campaign_completes(
    runtime: Runtime, celery_app: Any, worker: Any, smtp_server: DevSMTPServer
) -> None:
    # Given a 300-recipient campaign where one recipient's message cannot be built
    make_user(runtime)
    request = campaign_request(300)
    view, chunks = create.create(runtime, request)
    _break(runtime, Send.campaign_id == view.id, Send.contact_id == "c137")
    control.enqueue(runtime, view.id, chunks, CeleryTaskQueue(celery_app))

    # When the workers have run it
    def finished() -> bool:
        return control.view(runtime, view.id).status == "completed"

    wait_for(finished, timeout=60, what="the campaign completed")

    # Then 299 were delivered, the one failed alone with its credit back
    done = control.view(runtime, view.id)
    assert done.counts["sent"] == 299 and done.failed_by_reason == {"internal_error": 1}
    assert len(smtp_server.messages) == 299
    assert "person137@example.org" not in {m.rcpt_tos[0] for m in smtp_server.messages}
    assert credits(runtime, "agent-1").used == 299
    failed = [e for e in timeline_rows(runtime, "agent-1") if e.reason == "internal_error"]
    assert [e.contact_id for e in failed] == ["c137"]
