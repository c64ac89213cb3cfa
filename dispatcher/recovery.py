"""Handing committed rows to the broker, and sweeping up rows the broker never took."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dispatcher import keys
from dispatcher.campaigns.control import enqueue as enqueue_campaign
from dispatcher.campaigns.control import open_chunks
from dispatcher.delivery import feedback, lifecycle
from dispatcher.delivery.lifecycle import OPEN_STATUSES, stale_after
from dispatcher.delivery.publish import publish_outcome
from dispatcher.delivery.smartplan import expire_reservation
from dispatcher.delivery.system_mail import enqueue_system_emails
from dispatcher.errors import QueueUnavailable
from dispatcher.models import Campaign, CampaignStatus, Send, SendKind, SendStatus, SystemEmail
from dispatcher.ports import DeferredToOutbox
from dispatcher.runtime import Runtime
from dispatcher.sends import enqueue as enqueue_send

log = logging.getLogger(__name__)

#: Rows younger than this are left to the request that created them.
SWEEP_GRACE = timedelta(seconds=60)


def sweep(rt: Runtime, limit: int = 1000) -> tuple[int, int, int]:
    """Enqueue the sends, system emails and running campaigns that were stored but never
    handed to the broker (it was down, or the producer could not reach it).

    Returns how many of each were enqueued. Work enqueued twice is harmless: delivery is
    idempotent.
    """
    cutoff = rt.clock.now() - SWEEP_GRACE
    with rt.reads() as session:
        # Campaign recipients belong to their campaign's chunks (or MailChimp job), not here.
        send_ids = _stranded(
            session,
            Send,
            (Send.status == SendStatus.QUEUED) & (Send.kind == SendKind.SMARTPLAN),
            cutoff,
            limit,
        )
        email_ids = _stranded(
            session, SystemEmail, SystemEmail.status == SendStatus.QUEUED, cutoff, limit
        )
        campaign_ids = _stranded(
            session, Campaign, Campaign.status == CampaignStatus.RUNNING, cutoff, limit
        )
        now = rt.clock.now()
        # Long waits parked by the workers (a rate limit's hour, a halted relay) that are due.
        send_ids += session.scalars(
            select(Send.id)
            .where(
                Send.kind == SendKind.SMARTPLAN,
                Send.status.in_((SendStatus.QUEUED, SendStatus.RESERVED)),
                Send.retry_at <= now,
            )
            .limit(limit)
        ).all()
        campaign_ids += session.scalars(
            select(Campaign.id)
            .where(Campaign.status == CampaignStatus.RUNNING, Campaign.retry_at <= now)
            .limit(limit)
        ).all()
    sends = 0
    for send_id in send_ids:
        try:
            enqueue_send(rt, rt.queue, send_id)
        except (DeferredToOutbox, QueueUnavailable) as exc:
            log.warning("outbox sweep could not enqueue send %s: %s", send_id, exc)
            break
        sends += 1
    send_ids = send_ids[:sends]  # only those the broker took are unparked
    enqueue_system_emails(rt, email_ids)
    for campaign_id in campaign_ids:
        enqueue_campaign(rt, campaign_id, open_chunks(rt, campaign_id))
    _unpark(rt, send_ids, campaign_ids)
    if send_ids or email_ids or campaign_ids:
        log.info(
            "outbox sweep enqueued sends=%d system_emails=%d campaigns=%d",
            sends,
            len(email_ids),
            len(campaign_ids),
        )
    return sends, len(email_ids), len(campaign_ids)


def park_send(rt: Runtime, send_id: str, seconds: float) -> None:
    """Store a wait too long for the broker's countdown; :func:`sweep` enqueues the send again
    when it is due. Its credit stays held until then (the hold is extended to cover it)."""
    due = rt.clock.now() + timedelta(seconds=seconds)
    lifecycle.park(rt, send_id, due)
    log.info("send %s parked until %s", send_id, due.isoformat(timespec="seconds"))


def park_campaign(rt: Runtime, campaign_id: str, seconds: float) -> None:
    """Store a wait too long for the broker's countdown for a campaign's chunks."""
    due = rt.clock.now() + timedelta(seconds=seconds)
    with rt.sessions.begin() as session:
        session.execute(
            update(Campaign)
            .where(Campaign.id == campaign_id)
            .values(retry_at=due, updated_at=rt.clock.now())
        )
    log.info("campaign %s parked until %s", campaign_id, due.isoformat(timespec="seconds"))


def park_system_email(rt: Runtime, email_id: str, seconds: float) -> None:
    """A system email whose retry the broker did not take goes back to the outbox: marked as
    never enqueued, so the next :func:`sweep` hands it to the broker again (its short wait,
    ``seconds``, is not kept: the sweep runs every minute)."""
    with rt.sessions.begin() as session:
        session.execute(
            update(SystemEmail)
            .where(SystemEmail.id == email_id, SystemEmail.status == SendStatus.QUEUED)
            .values(enqueued_at=None)
        )
    log.info("system email %s left to the outbox sweep (%.0fs wait not kept)", email_id, seconds)


def _unpark(rt: Runtime, send_ids: Sequence[str], campaign_ids: Sequence[str]) -> None:
    """Clear the due waits of the work just enqueued again; with none, nothing is written (a
    sweep that found nothing takes no writer: on SQLite it would hold up every other one)."""
    now = rt.clock.now()
    if not send_ids and not campaign_ids:
        return
    with rt.sessions.begin() as session:
        if send_ids:
            session.execute(
                update(Send)
                .where(Send.id.in_(list(send_ids)), Send.retry_at <= now)
                .values(retry_at=None)
            )
        if campaign_ids:
            session.execute(
                update(Campaign)
                .where(Campaign.id.in_(list(campaign_ids)), Campaign.retry_at <= now)
                .values(retry_at=None)
            )


#: After Redis lost its data, SmartPlan outcomes finished this recently are published again
#: (the stream, and any entries the engine had not read yet, went with it).
REPUBLISH_WINDOW = timedelta(days=7)
#: Outcomes are left to the worker that recorded them for this long before the sweep helps.
PUBLISH_GRACE = timedelta(seconds=30)


def republish_outcomes(rt: Runtime, limit: int = 2000) -> int:
    """Publish SmartPlan step outcomes the stream may not hold: those recorded but never
    published (a crash between the two), and, when Redis lost its data (its epoch marker is
    gone), every outcome of the last :data:`REPUBLISH_WINDOW` again; the same for the bounce
    and complaint entries reported after them. Consumers dedupe on
    ``send_id`` (delivery is at least once). Returns how many were published."""
    now = rt.clock.now()
    terminal = (SendStatus.SENT, SendStatus.FAILED, SendStatus.UNKNOWN)
    epoch = f"{rt.settings.outcome_stream}:epoch"
    if not rt.redis.exists(epoch):
        with rt.sessions.begin() as session:
            flagged = session.execute(
                update(Send)
                .where(
                    Send.kind == SendKind.SMARTPLAN,
                    Send.status.in_(terminal),
                    Send.outcome_published.is_(True),
                    Send.finished_at >= now - REPUBLISH_WINDOW,
                )
                .values(outcome_published=False)
            )
            feedback.mark_unpublished(session, now - REPUBLISH_WINDOW)
        # Set after flagging: should this process die in between, the next sweep flags again.
        rt.redis.set(epoch, now.isoformat())
        count = getattr(flagged, "rowcount", 0)
        if count:
            log.warning("the outcome stream was lost with Redis: republishing %d outcomes", count)
    with rt.reads() as session:
        ids = session.scalars(
            select(Send.id)
            .where(
                Send.kind == SendKind.SMARTPLAN,
                Send.status.in_(terminal),
                Send.outcome_published.is_(False),
                Send.finished_at < now - PUBLISH_GRACE,
            )
            .order_by(Send.finished_at.desc())  # the newest are the likeliest unread
            .limit(limit)
        ).all()
    for send_id in ids:
        publish_outcome(rt, send_id)
    # Bounces and complaints reported after a SmartPlan send's outcome: their own entries.
    return len(ids) + feedback.publish_pending(rt, now - PUBLISH_GRACE, limit)


def expire_reservations(rt: Runtime, limit: int = 1000) -> int:
    """Give back the credits of SmartPlan sends stuck in ``reserved`` past their hold, that
    even the stale-work sweep's new task did not move (see
    :func:`dispatcher.delivery.smartplan.expire_reservation`, fenced on the lease); returns how
    many. Run it before :func:`recover_stale` in a sweep."""
    now = rt.clock.now()
    with rt.reads() as session:
        stuck = session.execute(
            select(Send.id, Send.lease_until)
            .where(
                Send.kind == SendKind.SMARTPLAN,
                Send.status == SendStatus.RESERVED,
                Send.lease_until < now,
                # Only once :func:`recover_stale` enqueued it again after the last worker
                # touched it, and no worker took that task for a whole stale period: a send
                # that is merely late (a backlog, beat down for a while) is left alone.
                Send.enqueued_at > Send.updated_at,
                Send.enqueued_at < now - stale_after(rt),
            )
            .limit(limit)
        ).all()
    expired = sum(
        1
        for send_id, lease in stuck
        if lease is not None and expire_reservation(rt, send_id, lease)
    )
    if expired:
        log.warning("credits returned for %d sends stuck in reserved", expired)
    return expired


def _stranded(session: Session, model: Any, open_: Any, cutoff: datetime, limit: int) -> list[str]:
    """Ids of rows still open, never enqueued, and older than the sweep's grace."""
    return list(
        session.scalars(
            select(model.id)
            .where(open_, model.enqueued_at.is_(None), model.created_at < cutoff)
            .limit(limit)
        ).all()
    )


def recover_stale(rt: Runtime, limit: int = 1000) -> tuple[int, int, int]:
    """Enqueue again open work whose task message was lost (Redis, the broker, lost its data):
    SmartPlan sends and system emails not finished and untouched for :func:`stale_after`, and
    running campaigns none of whose recipients moved for as long. Delivery is idempotent, and
    a send caught mid-conversation is settled by its lease, so this never sends twice."""
    work = _open_work(rt, rt.clock.now() - stale_after(rt), limit)
    _enqueue_again(rt, *work)
    if any(work):
        log.warning(
            "stale work enqueued again sends=%d system_emails=%d campaigns=%d",
            *(len(ids) for ids in work),
        )
    return len(work[0]), len(work[1]), len(work[2])


def recover_lost(rt: Runtime, limit: int = 10_000) -> tuple[int, int, int]:
    """When Redis has lost its data (its epoch marker is gone), the task messages of all open
    work went with it: enqueue every open send, system email and running campaign again now,
    rather than after :func:`stale_after`. Beat runs this every minute, so lost work is back
    within a minute of the loss. Returns what was enqueued ((0, 0, 0) while the marker is
    there). The marker is set only once everything was handed to the broker, so a sweep that
    dies or finds the broker away leaves it to the next one."""
    marker = keys.epoch()
    if rt.redis.exists(marker):
        return 0, 0, 0
    now = rt.clock.now()
    work = _open_work(rt, now + timedelta(seconds=1), limit)  # everything open, however fresh
    if _enqueue_again(rt, *work):
        rt.redis.set(marker, now.isoformat())
    if any(work):
        log.warning(
            "Redis lost its data: open work enqueued again sends=%d system_emails=%d campaigns=%d",
            *(len(ids) for ids in work),
        )
    return len(work[0]), len(work[1]), len(work[2])


def _open_work(rt: Runtime, cutoff: datetime, limit: int) -> tuple[list[str], list[str], list[str]]:
    """Ids of open SmartPlan sends, system emails and running campaigns untouched since
    ``cutoff`` (and not parked for later, nor held by a running MailChimp job)."""
    now = rt.clock.now()
    with rt.reads() as session:
        send_ids = list(
            session.scalars(
                select(Send.id)
                .where(
                    Send.kind == SendKind.SMARTPLAN,
                    Send.status.in_(OPEN_STATUSES),
                    Send.updated_at < cutoff,
                    # Once per stale period, not every sweep.
                    or_(Send.enqueued_at.is_(None), Send.enqueued_at < cutoff),
                    or_(Send.retry_at.is_(None), Send.retry_at <= now),
                )
                .limit(limit)
            ).all()
        )
        email_ids = list(
            session.scalars(
                select(SystemEmail.id)
                .where(SystemEmail.status.in_(OPEN_STATUSES), SystemEmail.created_at < cutoff)
                .limit(limit)
            ).all()
        )
        running = session.scalars(
            select(Campaign.id)
            .where(
                Campaign.status == CampaignStatus.RUNNING,
                Campaign.updated_at < cutoff,
                # A MailChimp job's run renews its lease (and updated_at) while it works.
                or_(Campaign.lease_until.is_(None), Campaign.lease_until < now),
                or_(Campaign.retry_at.is_(None), Campaign.retry_at <= now),
            )
            .limit(limit)
        ).all()
        campaign_ids = [
            cid
            for cid in running
            if (
                session.scalar(select(func.max(Send.updated_at)).where(Send.campaign_id == cid))
                or cutoff
            )
            <= cutoff
        ]
    return send_ids, email_ids, campaign_ids


def _enqueue_again(
    rt: Runtime, send_ids: list[str], email_ids: list[str], campaign_ids: list[str]
) -> bool:
    """Hand open work to the broker again; False when the broker did not take all of it."""
    try:
        for send_id in send_ids:
            enqueue_send(rt, rt.queue, send_id)  # records when, so once per stale period
        for email_id in email_ids:
            rt.queue.enqueue_system_email(email_id)
        for campaign_id in campaign_ids:
            enqueue_campaign(rt, campaign_id, open_chunks(rt, campaign_id))
    except (DeferredToOutbox, QueueUnavailable) as exc:
        log.warning("open work could not be enqueued again: %s", exc)
        return False
    return True
