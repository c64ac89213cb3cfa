"""Handing committed rows to the broker, and sweeping up rows the broker never took."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import select, update

from dispatcher.errors import QueueUnavailable
from dispatcher.models import Campaign, CampaignStatus, Send, SendStatus, SystemEmail
from dispatcher.ports import DeferredToOutbox
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Rows younger than this are left to the request that created them.
SWEEP_GRACE = timedelta(seconds=60)


def enqueue_system_emails(rt: Runtime, email_ids: Iterable[str]) -> None:
    """Enqueue committed system emails; one the broker refuses waits for the sweep."""
    for email_id in email_ids:
        try:
            rt.queue.enqueue_system_email(email_id)
        except DeferredToOutbox:
            continue
        except QueueUnavailable as exc:
            log.warning("system email %s left for the outbox sweep: %s", email_id, exc.detail)
            continue
        with rt.sessions.begin() as session:
            session.execute(
                update(SystemEmail)
                .where(SystemEmail.id == email_id)
                .values(enqueued_at=rt.clock.now())
            )


def sweep(rt: Runtime, limit: int = 1000) -> tuple[int, int]:
    """Enqueue queued sends and system emails that were never handed to the broker.

    Returns how many of each were enqueued. A row enqueued twice is harmless: delivery is
    idempotent.
    """
    cutoff = rt.clock.now() - SWEEP_GRACE
    with rt.sessions() as session:
        send_ids = session.scalars(
            select(Send.id)
            .where(
                Send.status == SendStatus.QUEUED,
                Send.enqueued_at.is_(None),
                Send.created_at < cutoff,
            )
            .limit(limit)
        ).all()
        email_ids = session.scalars(
            select(SystemEmail.id)
            .where(
                SystemEmail.status == SendStatus.QUEUED,
                SystemEmail.enqueued_at.is_(None),
                SystemEmail.created_at < cutoff,
            )
            .limit(limit)
        ).all()
    sent = 0
    for send_id in send_ids:
        try:
            rt.queue.enqueue_send(send_id)
        except (DeferredToOutbox, QueueUnavailable) as exc:
            log.warning("outbox sweep could not enqueue send %s: %s", send_id, exc)
            break
        with rt.sessions.begin() as session:
            session.execute(
                update(Send).where(Send.id == send_id).values(enqueued_at=rt.clock.now())
            )
        sent += 1
    enqueue_system_emails(rt, email_ids)
    with rt.sessions() as session:
        campaign_ids = session.scalars(
            select(Campaign.id)
            .where(
                Campaign.status == CampaignStatus.RUNNING,
                Campaign.enqueued_at.is_(None),
                Campaign.updated_at < cutoff,
            )
            .limit(limit)
        ).all()
    for campaign_id in campaign_ids:
        # Imported here: campaigns builds on this module.
        from dispatcher.campaigns import enqueue, open_chunks

        enqueue(rt, campaign_id, open_chunks(rt, campaign_id))
    if send_ids or email_ids:
        log.info("outbox sweep enqueued sends=%d system_emails=%d", sent, len(email_ids))
    return sent, len(email_ids)
