"""Accepting a campaign writes its recipients in bulk (COPY on PostgreSQL, the driver's
executemany on SQLite), a chunk at a time, from the request's rows as they are: what is stored
must be exactly what the ORM would have stored, whatever shape the rows were given in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from dispatcher.campaigns import compact as compact_campaigns
from dispatcher.campaigns import control, create
from dispatcher.credits.ledger import snapshot
from dispatcher.credits.subscriptions import credits, ensure_current
from dispatcher.delivery.message import message_id_for
from dispatcher.models import Campaign, Send, SendKind, SendStatus
from dispatcher.runtime import Runtime
from tests.helpers import campaign_request, make_user, seed_used_credits


@pytest.mark.parametrize("compact", [False, True], ids=["rows", "compact"])
@pytest.mark.parametrize("shape", ["objects", "mappings"])
def test_bulk_written_recipients_read_back_as_the_orm_stores_them(
    make_runtime: Callable[..., Runtime], shape: str, compact: bool
) -> None:
    # Given a request (as Recipient objects, or as the API's parsed mappings) whose rows are
    # plain, need normalising (a number as id, spaces around an address), carry non-ASCII
    # merge fields, or are invalid, over chunks of 3; stored as sends before the answer, or
    # (compact) packed on the campaign until its first chunk task writes the sends
    rt = make_runtime(campaign_chunk_size=3, campaign_compact_from=1 if compact else 0)
    make_user(rt)
    given: list[tuple[Any, str, dict[str, Any] | None]] = [
        ("c0", "person0@example.org", {"first_name": "Zoë", "n": 3, "ok": True, "x": None}),
        (7, "  person1@example.org ", None),
        ("c2", "not an address", {}),
        ("c3", "person3@example.org", {"note": "line one\nline two"}),
        ("c4", "person4@example.org", {}),
        ("c0", "again@example.org", {}),  # listed twice
        ("c6", "person6@example.org", {"first_name": "P6"}),
    ]
    rows: list[Any] = [
        create.Recipient(c, e, f or {})
        if shape == "objects"
        else {"id": c, "email": e, **({} if f is None else {"fields": f})}
        for c, e, f in given
    ]
    view, chunks = create.create(rt, campaign_request(0, recipients=rows))
    if compact:
        assert view.status == "reserving"
        with rt.sessions() as session:
            assert session.scalars(select(Send.id)).all() == []
        assert chunks == [0]  # its first chunk task writes the sends, then hands out the rest
        assert compact_campaigns.finish(rt, view.id)
        chunks = control.open_chunks(rt, view.id)

    # Then every valid recipient has one queued send with what the ORM reads back as given
    with rt.sessions() as session:
        sends = session.scalars(
            select(Send).where(Send.campaign_id == view.id).order_by(Send.chunk, Send.contact_id)
        ).all()
        campaign = session.get(Campaign, view.id)
        assert campaign is not None
        period, seq = campaign.period, campaign.grant_seq
    assert view.recipients == 5 and view.invalid == 2 and chunks == [0, 1]
    assert [(s.contact_id, s.contact_email, s.merge_fields, s.chunk) for s in sends] == [
        ("7", "person1@example.org", {}, 0),
        ("c0", "person0@example.org", {"first_name": "Zoë", "n": 3, "ok": True, "x": None}, 0),
        ("c3", "person3@example.org", {"note": "line one\nline two"}, 0),
        ("c4", "person4@example.org", {}, 1),
        ("c6", "person6@example.org", {"first_name": "P6"}, 1),
    ]
    for s in sends:
        key = create.recipient_key(view.id, s.contact_id)
        assert s.idempotency_key == key
        assert s.message_id == message_id_for(key, rt.settings.message_id_domain)
        assert s.kind is SendKind.CAMPAIGN and s.status is SendStatus.RESERVED
        assert (s.period, s.grant_seq) == (period, seq) and s.period is not None
        assert s.attempts == 0 and s.outcome_published is True and s.refund_due is False
        assert s.created_at == rt.clock.now() and s.created_at.tzinfo is not None
        assert s.subject == "" and s.html == "" and s.lease_until is None
    assert len({s.id for s in sends}) == 5


def test_recipients_are_written_one_chunk_at_a_time(
    make_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a campaign of 25 recipients in chunks of 4, and a count of the rows each write holds
    rt = make_runtime(campaign_chunk_size=4)
    make_user(rt)
    writes: list[int] = []
    bulk_writer = create.bulk_writer

    def counting(*args: Any) -> Callable[[list[tuple[Any, ...]]], None]:
        write = bulk_writer(*args)

        def counted(rows: list[tuple[Any, ...]]) -> None:
            writes.append(len(rows))
            write(rows)

        return counted

    monkeypatch.setattr(create, "bulk_writer", counting)

    # When it is accepted
    view, chunks = create.create(rt, campaign_request(25))

    # Then no write held more than one chunk's rows, and every recipient was written once
    assert writes == [4, 4, 4, 4, 4, 4, 1]
    assert len(chunks) == 7 and view.recipients == 25
    with rt.sessions() as session:
        keys = session.scalars(select(Send.idempotency_key).where(Send.campaign_id == view.id))
        assert len(set(keys)) == 25


def test_recipients_lacking_an_unguarded_merge_field_are_counted_in_the_view(
    make_runtime: Callable[..., Runtime],
) -> None:
    """A field the message uses with no default shows empty in a copy: never silently, the
    campaign's view counts who lacks it; guarded fields and international addresses pass."""
    rt = make_runtime()
    make_user(rt)
    rows = [
        create.Recipient("c0", "ann@bücher.example", {"first_name": "Ann", "city": "Austin"}),
        create.Recipient("c1", "bo@example.org", {"first_name": "", "city": "Waco"}),
        create.Recipient("c2", "cy@example.org", {}),
    ]
    req = campaign_request(
        0,
        recipients=rows,
        subject="Homes in {{ city }}",
        html="<p>Hi {{ first_name }}, {{ price|default('ask me') }} {{ contact.zip or '' }}</p>",
        reply_to="Agent@Bücher.example",
    )
    view, _ = create.create(rt, req)
    assert view.missing_fields == {"city": 1, "first_name": 2}
    with rt.sessions() as session:
        campaign = session.get(Campaign, view.id)
        assert campaign is not None and campaign.reply_to == "Agent@xn--bcher-kva.example"
        emails = session.scalars(select(Send.contact_email).where(Send.campaign_id == view.id))
        assert "ann@xn--bcher-kva.example" in set(emails)
    guarded = campaign_request(
        0,
        recipients=rows[2:],
        subject="Open house, {{ first_name|default('neighbour') }}",
        html="<p>Hi {% if first_name %}{{ first_name }}{% else %}there{% endif %}</p>",
    )
    assert create.create(rt, guarded)[0].missing_fields == {}


@pytest.mark.parametrize("size", [30, 45])
def test_redis_lost_while_a_campaign_reserves_counts_its_stored_recipients_once(
    make_runtime: Callable[..., Runtime], monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # Given an agent with 50 credits of which 10 are used, and Redis losing its data after a
    # campaign of ``size`` recipients was stored (its rows ``reserved``, the campaign still
    # ``reserving``) and before its credits were asked for
    rt = make_runtime(free_plan_credits=50)
    make_user(rt)
    _, grant = ensure_current(rt, "agent-1")
    seed_used_credits(rt, "agent-1", 10)
    rt.redis.flushall()
    seen: list[Any] = []
    reserve = rt.quota.reserve

    def lost_first(*args: Any, **kwargs: Any) -> Any:
        with rt.sessions() as session:
            stored = session.scalars(select(Send.status).where(Send.kind == SendKind.CAMPAIGN))
            seen.append((set(stored), snapshot(session, grant)))
        rt.redis.flushall()
        return reserve(*args, **kwargs)

    monkeypatch.setattr(rt.quota, "reserve", lost_first)

    # When it is accepted (or refused)
    fits = size <= 40
    if fits:
        view, _ = create.create(rt, campaign_request(size))
    else:
        with pytest.raises(create.InsufficientCredits):
            create.create(rt, campaign_request(size))

    # Then the ledger read in that moment counted the recipients once, pending under the
    # campaign's key, and the reservation took them once (or, refused, left nothing behind)
    ((statuses_then, snap),) = seen
    assert statuses_then == {SendStatus.RESERVED}
    assert len(snap.charged_keys) == 10 and [n for _, n in snap.pending] == [size]
    assert [key.startswith("campaign|") for key, _ in snap.pending] == [True]
    used = 10 + size if fits else 10
    assert credits(rt, "agent-1").used == used
    # ...and the ledger agrees once the campaign runs (or is gone)
    rt.redis.flushall()
    assert credits(rt, "agent-1").used == used
    with rt.sessions() as session:
        rows = session.scalars(select(Send.status).where(Send.kind == SendKind.CAMPAIGN)).all()
    assert rows == ([SendStatus.RESERVED] * size if fits else [])
    if fits:
        assert view.status == "running"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_large_page_cache_of_a_bulk_write_is_given_back_with_its_connection(
    make_runtime: Callable[..., Runtime],
) -> None:
    # Given one pooled SQLite connection (SQLite's default page cache, 2 MiB)
    rt = make_runtime(database_pool_size=1)
    make_user(rt)

    def cache_sizes() -> list[int]:
        with rt.engine.connect() as conn:
            return [conn.exec_driver_sql("PRAGMA cache_size").scalar_one()]

    assert cache_sizes() == [-2000]
    # When a campaign's recipients are written with a large one
    view, _ = create.create(rt, campaign_request(50))

    # Then they were all written, and the connection went back to the pool with the default
    assert view.recipients == 50
    assert cache_sizes() == [-2000]
