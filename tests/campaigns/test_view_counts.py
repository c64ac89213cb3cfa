"""A campaign's view counts its sends; a count that was slow is reused for a while by the views
of a running campaign only (the agent's page polls every second), never once it has finished.
The view and a chunk's status check read without waiting for the database's writer."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import update

from dispatcher.campaigns import control, create
from dispatcher.models import Campaign, CampaignStatus, Send, SendStatus
from dispatcher.runtime import Runtime
from tests.helpers import campaign_request, make_user


def deliver(rt: Runtime, campaign_id: str, n: int) -> None:
    """``n`` of the campaign's recipients sent, as a chunk's run settles them."""
    with rt.sessions.begin() as session:
        ids = [
            s.id
            for s in session.query(Send)
            .filter(Send.campaign_id == campaign_id, Send.status == SendStatus.RESERVED)
            .limit(n)
        ]
        session.execute(update(Send).where(Send.id.in_(ids)).values(status=SendStatus.SENT))


def set_status(rt: Runtime, campaign_id: str, status: CampaignStatus) -> None:
    with rt.sessions.begin() as session:
        session.execute(update(Campaign).where(Campaign.id == campaign_id).values(status=status))


def test_counts_are_fresh_when_they_are_quick_to_read(runtime: Runtime) -> None:
    make_user(runtime)
    c, _ = create.create(runtime, campaign_request(6))
    assert control.view(runtime, c.id).counts["reserved"] == 6
    deliver(runtime, c.id, 2)
    assert control.view(runtime, c.id).done == 2
    deliver(runtime, c.id, 1)
    assert control.view(runtime, c.id).done == 3


@pytest.mark.parametrize(
    "then", [CampaignStatus.COMPLETED, CampaignStatus.PAUSED, CampaignStatus.CANCELLED]
)
def test_a_slow_count_is_reused_only_while_the_campaign_runs(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, then: CampaignStatus
) -> None:
    make_user(runtime)
    c, _ = create.create(runtime, campaign_request(6))
    monkeypatch.setattr(control, "COUNTS_SLOW", 0.0)  # every count is "slow"
    monkeypatch.setattr(control, "COUNTS_REUSE", 1e9)
    assert control.view(runtime, c.id).done == 0
    deliver(runtime, c.id, 4)
    seen = control.view(runtime, c.id)
    assert (seen.status, seen.done, seen.counts["reserved"]) == ("running", 0, 6)
    set_status(runtime, c.id, then)
    seen = control.view(runtime, c.id)
    assert (seen.status, seen.done, seen.counts["sent"]) == (then.value, 4, 4)
    # Running again: counted afresh, the stale counts were dropped.
    set_status(runtime, c.id, CampaignStatus.RUNNING)
    deliver(runtime, c.id, 1)
    assert control.view(runtime, c.id).done == 5


def test_the_check_after_each_chunk_reads_from_the_last_chunk_down(runtime: Runtime) -> None:
    """``complete_if_done`` asks whether any recipient is open after every chunk: on
    PostgreSQL the plan walks the (campaign, chunk, status) index backwards and stops at the
    first open one, never sorting the campaign's open recipients (which made the check cost
    0.86 s per chunk at 1,000,000 recipients)."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("the plan in question is PostgreSQL's (SQLite walks the index either way)")
    make_user(runtime)
    earlier, _ = create.create(runtime, campaign_request(300))
    deliver(runtime, earlier.id, 300)
    with runtime.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE sends")
    # Written after the statistics were taken, as a large campaign's sends are (the planner
    # expects a handful of rows for it).
    c, _ = create.create(runtime, campaign_request(50))
    query = control.open_probe(c.id).compile(
        dialect=runtime.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    with runtime.engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {query}"))
    assert "Backward" in plan and "Sort" not in plan, plan
    assert control.complete_if_done(runtime, c.id) is CampaignStatus.RUNNING


def test_status_and_view_read_the_last_commit_while_a_write_is_under_way(runtime: Runtime) -> None:
    """A chunk asks the campaign's status before each batch and the agent's page polls its
    view: neither waits for a write under way in another thread (on SQLite every write
    transaction holds the one writer), and both see the last commit. On PostgreSQL readers
    never wait for writers either."""
    make_user(runtime)
    c, _ = create.create(runtime, campaign_request(6))
    deliver(runtime, c.id, 2)
    writing, reads_done = threading.Event(), threading.Event()
    held_through_reads: list[bool] = []

    def pause_uncommitted() -> None:
        with runtime.sessions.begin() as session:
            session.execute(
                update(Campaign).where(Campaign.id == c.id).values(status=CampaignStatus.PAUSED)
            )
            writing.set()
            held_through_reads.append(reads_done.wait(10))

    writer = threading.Thread(target=pause_uncommitted)
    writer.start()
    assert writing.wait(10)
    status = control.status_of(runtime, c.id)
    seen = control.view(runtime, c.id)
    reads_done.set()
    writer.join(10)
    assert held_through_reads == [True]  # the write was still open when both reads ended
    assert status is CampaignStatus.RUNNING
    assert (seen.status, seen.done) == ("running", 2)
    assert control.status_of(runtime, c.id) is CampaignStatus.PAUSED
