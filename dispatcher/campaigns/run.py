"""A campaign's work item (``"<campaign id>:<chunk>"``) routed to its driver: a Command Email
chunk or the MailChimp job; and what happens when an item keeps failing for no known reason."""

from __future__ import annotations

import logging

from sqlalchemy import select

from dispatcher import alerts
from dispatcher.campaigns import chunks, compact, control, mailchimp_job
from dispatcher.campaigns.control import complete_if_done
from dispatcher.delivery import lifecycle
from dispatcher.delivery.lifecycle import OPEN_STATUSES, Outcome
from dispatcher.errors import NotFound, RenderError
from dispatcher.models import AlertKind, Campaign, CampaignStatus, Provider, Send, SendStatus, User
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


def parse(item: str) -> tuple[str, int]:
    """The campaign id and chunk number of a work item."""
    campaign_id, _, chunk = item.rpartition(":")
    return campaign_id, int(chunk)


def deliver(rt: Runtime, item: str) -> CampaignStatus:
    """Run one work item of a campaign; returns the campaign's status afterwards (see
    :func:`dispatcher.campaigns.chunks.deliver_chunk` for what it raises)."""
    campaign_id, chunk = parse(item)
    c, user = _load(rt, campaign_id)
    if c.provider is Provider.MAILCHIMP:
        return mailchimp_job.deliver_mailchimp(rt, c, user)
    if c.status is CampaignStatus.RESERVING:
        # Accepted compactly: the first chunk task writes the sends and hands out the rest.
        if compact.finish(rt, c.id):
            control.enqueue(rt, c.id, [k for k in range(c.chunks) if k != chunk])
        c, user = _load(rt, campaign_id)
    if c.status is not CampaignStatus.RUNNING:
        return c.status
    if user.sender_address is None:
        raise RenderError("the user has no platform or communications email to send from")
    return chunks.deliver_chunk(rt, c, chunk, user)


def _load(rt: Runtime, campaign_id: str) -> tuple[Campaign, User]:
    with rt.reads() as session:
        c = session.get(Campaign, campaign_id)
        if c is None:
            raise NotFound("campaign", campaign_id)
        user = session.get(User, c.user_id)
        if user is None:
            raise NotFound("user", c.user_id)
        session.expunge_all()
    return c, user


def give_up(rt: Runtime, item: str, reason: str, detail: str) -> CampaignStatus:
    """A work item that cannot go on (a permanent error escaped it, or its handling kept
    failing for an unforeseen cause ``SEND_MAX_RETRIES`` times: ``internal_error``): its open
    recipients are settled instead of looping. Those not started fail with ``reason`` and
    their credits back; those caught mid-conversation (or, for
    MailChimp, after MailChimp was asked to send) are ``unknown``, never resent. The campaign
    completes (a MailChimp job's campaign fails) and an alert is raised."""
    campaign_id, chunk = parse(item)
    c, _ = _load(rt, campaign_id)
    why = f"handling kept failing: {detail}" if reason == Reason.INTERNAL_ERROR else detail
    with rt.sessions() as session:
        query = select(Send.id, Send.status).where(
            Send.campaign_id == campaign_id, Send.status.in_(OPEN_STATUSES)
        )
        if c.provider is Provider.COMMAND_EMAIL:
            query = query.where(Send.chunk == chunk)
        rows = session.execute(query).all()
    may_have_gone = c.send_attempted_at is not None
    unsent = [r.id for r in rows if r.status is not SendStatus.SENDING and not may_have_gone]
    not_started = set(unsent)
    started = [r.id for r in rows if r.id not in not_started]
    failed = reason
    lifecycle.settle(
        rt,
        [Outcome(i, SendStatus.FAILED, failed, why) for i in unsent],
        OPEN_STATUSES,
        campaign=c,
    )
    lifecycle.settle(
        rt,
        [Outcome(i, SendStatus.UNKNOWN, failed, why) for i in started],
        OPEN_STATUSES,
        campaign=c,
    )
    if c.provider is Provider.MAILCHIMP:
        control.fail(rt, campaign_id, why)
    if reason == Reason.INTERNAL_ERROR:
        with rt.sessions.begin() as session:
            alerts.record(
                session,
                AlertKind.INTERNAL_ERROR,
                f"campaign {campaign_id} item {chunk} gave up after repeated unforeseen errors "
                f"({len(rows)} recipients settled): {detail}",
                rt.clock.now(),
                user_id=c.user_id,
                campaign_id=campaign_id,
            )
    log.error("campaign %s item %d gave up: %s", campaign_id, chunk, detail)
    return complete_if_done(rt, campaign_id)
