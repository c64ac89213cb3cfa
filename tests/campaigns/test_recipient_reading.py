"""A campaign's recipients are read once, a batch at a time (dispatcher.campaigns.recipients):
the request's rows are never all held as objects, and what the reading finds (invalid and
suppressed rows with their indexes, missing merge fields, the digest a replay is matched by)
is the same whether the agent's suppression list is read whole or looked up batch by batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select

from dispatcher.campaigns import control, create, recipients
from dispatcher.credits.subscriptions import credits
from dispatcher.delivery import suppression
from dispatcher.errors import InvalidInput
from dispatcher.models import Campaign, ExclusionKind, Send
from dispatcher.runtime import Runtime
from tests.helpers import campaign_request, make_user


class Counted(dict[str, Any]):
    """A request row that counts how many rows exist at once."""

    alive = 0
    most = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        Counted.alive += 1
        Counted.most = max(Counted.most, Counted.alive)

    def __del__(self) -> None:
        Counted.alive -= 1


def generated(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield Counted({"id": f"c{i}", "email": f"p{i}@example.org", "fields": {"first_name": "P"}})


@pytest.mark.parametrize("compact_from", [3000, 0], ids=["compact", "rows"])
def test_a_campaigns_rows_are_held_a_batch_at_a_time(
    make_runtime: Any, monkeypatch: pytest.MonkeyPatch, compact_from: int
) -> None:
    rt: Runtime = make_runtime(campaign_compact_from=compact_from)
    make_user(rt)
    monkeypatch.setattr(recipients, "BATCH", 500)
    Counted.alive = Counted.most = 0
    n = 8 * recipients.BATCH + 7
    view, _ = create.create(rt, replace(campaign_request(0), recipients=generated(n)))
    assert view.recipients == n
    # The batch being read, and the next one being gathered: never the whole request.
    assert 0 < Counted.most <= 2 * recipients.BATCH + 1, Counted.most
    assert Counted.alive == 0
    with rt.sessions() as session:
        written = session.scalar(select(func.count()).select_from(Send))
        packed = session.scalar(select(Campaign.pending_recipients))
    if compact_from:
        assert written == 0 and packed is not None
        assert sum(len(part) for part in recipients.chunks(packed)) == n
    else:
        assert written == n and packed is None


def mixed_request(n: int, key: str) -> create.CampaignRequest:
    """``n`` rows over several batches: every 97th invalid, every 101st without first_name,
    every 89th suppressed (see :func:`suppress_some`)."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"c{i}", "email": f"p{i}@example.org"}
        if i % 97 == 5:
            row["email"] = "not an address"
        if i % 101 != 3:
            row["fields"] = {"first_name": f"P{i}"}
        rows.append(row)
    return replace(campaign_request(0), recipients=rows, idempotency_key=key)


def suppress_some(rt: Runtime, n: int) -> set[int]:
    rows = {i for i in range(n) if i % 89 == 7 and i % 97 != 5}
    for i in rows:
        suppression.suppress(rt, "agent-1", f"P{i}@Example.org")
    return rows


@pytest.mark.parametrize("preload", [recipients.PRELOAD, 10], ids=["list-read-whole", "looked-up"])
def test_invalid_suppressed_and_missing_are_found_across_batches(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, preload: int
) -> None:
    rt = runtime
    make_user(rt)
    n = 2 * recipients.BATCH + 500
    blocked = suppress_some(rt, n)
    monkeypatch.setattr(recipients, "PRELOAD", preload)
    view, _ = create.create(rt, mixed_request(n, "mixed-1"))
    invalid = [i for i in range(n) if i % 97 == 5]
    missing = [i for i in range(n) if i % 101 == 3 and i % 97 != 5 and i not in blocked]
    assert (view.invalid, view.suppressed) == (len(invalid), len(blocked))
    assert view.recipients == n - len(invalid) - len(blocked)
    assert view.missing_fields == {"first_name": len(missing)}
    assert credits(rt, "agent-1").used == view.recipients
    listed = control.excluded(rt, view.id, ExclusionKind.SUPPRESSED, limit=500).items
    assert [e.index for e in listed] == sorted(blocked)
    listed = control.excluded(rt, view.id, ExclusionKind.INVALID, limit=500).items
    assert [e.index for e in listed] == invalid
    # The same request again is matched by its digest, however the list was read.
    monkeypatch.setattr(recipients, "PRELOAD", recipients.PRELOAD if preload == 10 else 10)
    again, _ = create.create(rt, mixed_request(n, "mixed-1"))
    assert again.replayed and again.id == view.id
    assert credits(rt, "agent-1").used == view.recipients


def test_the_limit_counts_every_row_and_nothing_is_kept(make_runtime: Any) -> None:
    rt: Runtime = make_runtime(max_campaign_recipients=3000)
    make_user(rt)
    with pytest.raises(InvalidInput, match="lists 4,500; the limit is 3,000"):
        create.create(rt, replace(campaign_request(0), recipients=generated(4500)))
    with rt.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Campaign)) == 0
    assert credits(rt, "agent-1").used == 0
