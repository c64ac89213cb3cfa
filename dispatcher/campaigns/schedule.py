"""Scheduled campaigns: started by beat once their ``send_at`` is due, and edited or cancelled
until then.

Which month pays: the month (in the agent's zone, rule R2) the campaign is sent in. A campaign
accepted for a time in the current month reserves its credits at acceptance, all or nothing,
and holds them while it waits. One accepted for a later month holds none: when beat starts it,
its credits are reserved all or nothing from the grant of the month it then starts in; when
that balance is short, it fails whole (every recipient ``failed`` ``quota_exhausted``, nothing
sent, nothing charged). Should a campaign holding this month's credits start only after the
month ended (beat was down across the month end), those credits go back to their month and
the new month's are reserved instead. So a credit of one month never pays for a send of
another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from redis.exceptions import RedisError
from sqlalchemy import select

from dispatcher import validation
from dispatcher.campaigns import control, create, sendtime
from dispatcher.campaigns.control import CampaignStateError, CampaignView
from dispatcher.credits.grants import campaign_key, grant_ref
from dispatcher.credits.periods import period_at
from dispatcher.credits.quota import GrantRef
from dispatcher.credits.subscriptions import ensure_current
from dispatcher.delivery import lifecycle
from dispatcher.delivery.rendering import MessageTemplate
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.models import Campaign, CampaignStatus, Provider, Send, SendStatus, User
from dispatcher.ports import TaskQueue
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


def start_due(rt: Runtime, limit: int = 200, queue: TaskQueue | None = None) -> int:
    """Start every scheduled campaign whose ``send_at`` has come (beat, every
    ``SCHEDULE_SWEEP_SECONDS``); returns how many this call started. Two sweeps at once, or a
    sweep delivered twice, start each campaign once (:func:`control.begin_scheduled`)."""
    now = rt.clock.now()
    with rt.sessions() as session:
        due = session.scalars(
            select(Campaign.id)
            .where(Campaign.status == CampaignStatus.SCHEDULED, Campaign.send_at <= now)
            .order_by(Campaign.send_at)
            .limit(limit)
        ).all()
    return sum(1 for campaign_id in due if start(rt, campaign_id, queue))


def start(rt: Runtime, campaign_id: str, queue: TaskQueue | None = None) -> bool:
    """Start one due scheduled campaign and hand its chunks (or MailChimp job) to the workers;
    False when another caller started it first, it is not due, or its credits were short."""
    with rt.sessions() as session:
        c = session.get(Campaign, campaign_id)
        if c is None or c.status is not CampaignStatus.SCHEDULED:
            return False
        session.expunge(c)
    now = rt.clock.now()
    user, grant = ensure_current(rt, c.user_id)
    if c.provider is Provider.MAILCHIMP or c.period == grant.period:
        # It needs no credits, or holds this month's: it runs.
        with rt.sessions.begin() as session:
            if not control.begin_scheduled(session, c.id, now, CampaignStatus.RUNNING):
                return False
    elif not _take_credits(rt, c, user, grant, now):
        return False
    control.enqueue(rt, c.id, create.work_items(c.provider, c.chunks), queue)
    assert c.send_at is not None
    log.info(
        "scheduled campaign started id=%s send_at=%s after=%.1fs",
        c.id,
        c.send_at.isoformat(),
        (now - c.send_at).total_seconds(),
    )
    return True


def _take_credits(rt: Runtime, c: Campaign, user: User, grant: GrantRef, now: datetime) -> bool:
    """Reserve a due campaign's credits from ``grant`` (the month it starts in), all or
    nothing, and start it; True once it runs. Credits it held of an earlier month go back."""
    earlier = grant_ref(c.user_id, c.period, c.grant_seq, user.timezone)
    rt.quota.ensure(grant)
    held: list[str] = []
    with rt.sessions.begin() as session:
        if not control.begin_scheduled(
            session,
            c.id,
            now,
            CampaignStatus.RESERVING,
            period=grant.period,
            grant_seq=grant.seq,
        ):
            return False
        if earlier is not None:
            held = list(
                session.scalars(
                    select(Send.idempotency_key).where(
                        Send.campaign_id == c.id, Send.status == SendStatus.RESERVED
                    )
                ).all()
            )
        size = lifecycle.claim_campaign(session, c.id, grant, now)
    key = campaign_key(c.id)
    try:
        if earlier is not None:
            # Its month ended before it started: that month's credits go back to it, part by
            # part (a rebuild of that grant holds them per recipient, not under one key).
            rt.quota.refund_parts(earlier, key, held)
        reservation = rt.quota.reserve(grant, key, size)
    except RedisError:
        with rt.sessions.begin() as session:
            control.back_to_scheduled(session, c.id, rt.clock.now())
        raise
    if not reservation.granted:
        short = create.InsufficientCredits(size, reservation.remaining, reservation.total)
        control.refuse_start(rt, c.id, f"not started: {short}")
        log.warning(
            "scheduled campaign refused id=%s needed=%d remaining=%d",
            c.id,
            size,
            reservation.remaining,
        )
        return False
    try:
        create.reserved(rt, c.id, grant, reservation)
    except CampaignStateError:
        log.warning("scheduled campaign %s was failed by the reserving sweep", c.id)
        return False
    return True


@dataclass(frozen=True)
class Edit:
    """What an edit of a scheduled campaign changes; None leaves a value as it is."""

    send_at: str | datetime | None = None
    subject: str | None = None
    html: str | None = None
    text: str | None = None
    name: str | None = None


def edit(rt: Runtime, campaign_id: str, change: Edit, user_id: str | None = None) -> CampaignView:
    """Change a campaign that has not started: its ``send_at``, subject, bodies or name.
    Refused with :class:`CampaignStateError` once it started (or was cancelled), and with
    :class:`InvalidInput` naming the field for a bad value. A campaign holding this month's
    credits stays in this month (moving it would make them pay for another month's send:
    cancel it, which gives every credit back, and create it again); one holding none may move
    to any time, its credits being taken when it starts."""
    with rt.sessions() as session:
        c = session.get(Campaign, campaign_id)
        if c is None or (user_id is not None and c.user_id != user_id):
            raise NotFound("campaign", campaign_id)
        if c.status is not CampaignStatus.SCHEDULED:
            raise CampaignStateError(campaign_id, c.status.value, "be changed once it has started")
        tz = session.scalar(select(User.timezone).where(User.id == c.user_id)) or "UTC"
        session.expunge(c)
    found = validation.Findings()
    given = None if change.send_at is None else found.check(sendtime.parse, change.send_at)
    subject, html, text = create.message_fields(
        rt,
        found,
        c.subject if change.subject is None else change.subject,
        c.html if change.html is None else change.html,
        c.text if change.text is None else change.text,
    )
    if change.name is not None:
        found.check(validation.header_text, "name", change.name, max_len=validation.NAME_MAX)
    found.done()
    values: dict[str, object] = {}
    if given is not None:
        now = rt.clock.now()
        when = sendtime.resolve(given, tz, now, rt.settings.schedule_max_days)
        moved_to = period_at(when, tz).id
        if c.period is not None and moved_to != c.period:
            raise InvalidInput(
                sendtime.FIELD,
                f"{when.isoformat()} falls in {moved_to}, but the campaign holds {c.period}'s "
                "credits, which cannot pay for a send in another month; cancel it (every "
                "credit comes back) and create it again",
            )
        values["send_at"] = when
    tpl = MessageTemplate(subject=subject or "", html=html or "", text=text)
    tpl.check("message")
    values.update(subject=tpl.subject, html=tpl.html, text=tpl.text)
    if change.name is not None:
        values["name"] = change.name
    with rt.sessions.begin() as session:
        control.edit_scheduled(session, campaign_id, user_id, rt.clock.now(), **values)
    changed = [name for name, value in vars(change).items() if value is not None]
    log.info("scheduled campaign edited id=%s fields=%s", campaign_id, ",".join(changed))
    return control.view(rt, campaign_id)
