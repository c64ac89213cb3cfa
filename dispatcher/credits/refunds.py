"""Credits of failed sends given back: durable although Redis is a second store.

The transaction that records a failure whose credit comes back also sets ``sends.refund_due``.
Right after the commit the credit is given back in Redis and the flag cleared; when Redis
fails at that moment (or the process dies), the beat's sweep finds the flag and gives the
credit back then. Refunds are once per idempotency key in Redis, so making one twice is
harmless, and a grant Redis lost is rebuilt from SQL, which no longer counts the key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import Select, select, update

from dispatcher.credits.grants import campaign_key, grant_of
from dispatcher.models import SEND_REFUND_DUE, Campaign, Send
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: The sweep leaves a refund this long to the request that recorded the failure.
RETRY_AFTER = timedelta(seconds=30)

_BATCH = 500
#: What a refund needs to know of a send.
COLUMNS = (
    Send.id,
    Send.idempotency_key,
    Send.campaign_id,
    Send.user_id,
    Send.period,
    Send.grant_seq,
)


def give_back(rt: Runtime, send_ids: Sequence[str]) -> int:
    """Give back the credits of those of ``send_ids`` whose refund is due, and clear their
    flags; returns how many credits came back. A Redis error is logged, not raised: the
    outcomes are recorded and the flags stay set, so the refund sweep makes the refunds (a
    cancel answered 500 for a cancellation that took effect would help nobody)."""
    rows: list[Any] = []
    with rt.reads() as session:
        for start in range(0, len(send_ids), _BATCH):
            rows += session.execute(
                select(*COLUMNS).where(
                    Send.id.in_(send_ids[start : start + _BATCH]), SEND_REFUND_DUE
                )
            ).all()
    return give_back_rows(rt, rows)


def give_back_rows(rt: Runtime, rows: Sequence[Any]) -> int:
    """:func:`give_back` for rows already read (each with the columns of :data:`COLUMNS`)
    whose refund is due: the transaction that settled them returns them."""
    try:
        return _make(rt, rows)
    except RedisError as exc:
        log.warning(
            "refunds of %d sends left to the refund sweep: %s: %s",
            len(rows),
            type(exc).__name__,
            exc,
        )
        return 0


def retry_due(rt: Runtime, limit: int = 1000) -> int:
    """The sweep: give back credits whose refund is due since before :data:`RETRY_AFTER`
    (Redis failed, or the process died, right after the failure was recorded). Returns how
    many sends were settled."""
    cutoff = rt.clock.now() - RETRY_AFTER
    with rt.reads() as session:
        rows = list(session.execute(due_since(cutoff, limit)).all())
    if not rows:
        return 0
    back = _make(rt, rows)
    log.warning("refunds left over after failures made: sends=%d credits_back=%d", len(rows), back)
    return len(rows)


def due_since(cutoff: datetime, limit: int) -> Select[*tuple[Any, ...]]:
    """The sweep's query: up to ``limit`` sends whose refund is due since before ``cutoff``,
    oldest first. Its WHERE names :data:`~dispatcher.models.SEND_REFUND_DUE`, the condition of
    the partial index ``ix_sends_refund_due``, so only those sends are read."""
    return (
        select(*COLUMNS)
        .where(SEND_REFUND_DUE, Send.updated_at < cutoff)
        .order_by(Send.updated_at)
        .limit(limit)
    )


def _make(rt: Runtime, rows: Iterable[Any]) -> int:
    """Refund ``rows`` grant by grant (a campaign's part by part), clearing each group's flags
    once Redis took it."""
    back = 0

    def grant_key(r: Any) -> tuple[str, str, str, int]:
        return (r.campaign_id or "", r.user_id, r.period or "", r.grant_seq or 0)

    for (campaign_id, user_id, _period, _seq), group in groupby(
        sorted(rows, key=grant_key), key=grant_key
    ):
        items = list(group)
        keys = [r.idempotency_key for r in items]
        if campaign_id:
            back += _campaign(rt, campaign_id, keys)
        else:
            grant = grant_of(rt.reads, user_id, items[0].period, items[0].grant_seq)
            if grant is not None:
                back += sum(rt.quota.refund(grant, key) for key in keys)
        made(rt, [r.id for r in items])
    return back


def _campaign(rt: Runtime, campaign_id: str, keys: list[str]) -> int:
    with rt.reads() as session:
        c = session.get(Campaign, campaign_id)
        if c is not None:
            session.expunge(c)
    grant = None if c is None else grant_of(rt.reads, c.user_id, c.period, c.grant_seq)
    if grant is None:
        return 0  # nothing was reserved for it (a MailChimp campaign, or it never started)
    return rt.quota.refund_parts(grant, campaign_key(campaign_id), keys)


def made(rt: Runtime, send_ids: Sequence[str]) -> None:
    """Clear the flags of refunds Redis has taken."""
    with rt.sessions.begin() as session:
        for start in range(0, len(send_ids), _BATCH):
            session.execute(
                update(Send)
                .where(Send.id.in_(send_ids[start : start + _BATCH]))
                .values(refund_due=False)
            )
