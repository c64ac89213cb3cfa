"""Campaigns routed to the agent's MailChimp account: no credits; each contact's timeline
says the email went out through MailChimp (rule R11)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update

from dispatcher import suppression
from dispatcher.campaign_delivery import Outcome, complete_if_done, settle
from dispatcher.errors import RenderError
from dispatcher.mailchimp import (
    MailchimpClient,
    MailchimpOutcome,
    MailchimpRejected,
    MailchimpUnavailable,
    Member,
    send_campaign,
)
from dispatcher.models import Campaign, CampaignStatus, Send, SendStatus, User
from dispatcher.rendering import MessageTemplate, Rendered
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

#: Our merge fields as MailChimp merge tags: MailChimp fills them per recipient.
MERGE_TAGS = {"first_name": "*|FNAME|*", "last_name": "*|LNAME|*", "email": "*|EMAIL|*"}


def render_for_mailchimp(c: Campaign) -> Rendered:
    """Render the campaign once, with merge fields turned into MailChimp merge tags."""
    context = {**MERGE_TAGS, "contact": dict(MERGE_TAGS)}
    return MessageTemplate(c.subject, c.html, c.text).render(context)


def deliver_mailchimp(
    rt: Runtime, c: Campaign, user: User, *, final_attempt: bool = False
) -> CampaignStatus:
    """Sync the recipients to the agent's audience and send the campaign there, once.

    Retried on MailChimp 429/5xx/timeouts (the client is safe to repeat: it finds a campaign
    it already created or sent); a 4xx fails every recipient with MailChimp's detail.
    """
    if c.status is not CampaignStatus.RUNNING:
        return c.status
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.id, Send.contact_email, Send.merge_fields).where(
                Send.campaign_id == c.id, Send.status == SendStatus.QUEUED
            )
        ).all()
    with rt.sessions() as session:
        # Unsubscribed or bounced since the campaign was created: never synced or sent.
        blocked = suppression.active(
            session, c.user_id, (r.contact_email for r in rows), rt.clock.now()
        )
    if blocked:
        skipped = [r for r in rows if suppression.normalize(r.contact_email) in blocked]
        settle(
            rt,
            c,
            [
                (
                    r.id,
                    SendStatus.FAILED,
                    suppression.SUPPRESSED,
                    "the address is on the agent's suppression list; not sent",
                    None,
                    False,
                )
                for r in skipped
            ],
            expect=(SendStatus.QUEUED,),
        )
        rows = [r for r in rows if suppression.normalize(r.contact_email) not in blocked]
    if not rows:
        return complete_if_done(rt, c.id)
    if not (user.mailchimp_api_key and user.mailchimp_list_id):
        return _fail_all(
            rt, c, rows, "mailchimp_not_connected", "the agent has no connected MailChimp account"
        )
    try:
        rendered = render_for_mailchimp(c)
    except RenderError as exc:
        return _fail_all(rt, c, rows, exc.reason, exc.detail)
    members = [
        Member(
            r.contact_email,
            (r.merge_fields or {}).get("first_name"),
            (r.merge_fields or {}).get("last_name"),
        )
        for r in rows
    ]
    try:
        outcome = asyncio.run(_send(rt, c, user, members, rendered))
    except MailchimpRejected as exc:
        return _fail_all(rt, c, rows, exc.reason, str(exc))
    except MailchimpUnavailable as exc:
        if final_attempt:
            return _fail_all(rt, c, rows, exc.reason, f"gave up after retries: {exc}")
        raise
    refused = {e.email.lower(): e.error for e in outcome.errors}
    detail = f"sent through MailChimp (campaign {outcome.campaign_id})"
    outcomes: list[Outcome] = [
        (
            r.id,
            SendStatus.FAILED,
            "mailchimp_refused",
            refused[r.contact_email.lower()],
            rendered.subject,
            False,
        )
        if r.contact_email.lower() in refused
        else (r.id, SendStatus.SENT, None, detail, rendered.subject, False)
        for r in rows
    ]
    settle(rt, c, outcomes, expect=(SendStatus.QUEUED,))
    with rt.sessions.begin() as session:
        session.execute(
            update(Campaign)
            .where(Campaign.id == c.id)
            .values(provider_campaign_id=outcome.campaign_id, detail=detail)
        )
    log.info(
        "mailchimp campaign sent id=%s recipients=%d refused=%d",
        c.id,
        len(outcome.recipients),
        len(refused),
    )
    return complete_if_done(rt, c.id)


async def _send(
    rt: Runtime, c: Campaign, user: User, members: list[Member], rendered: Rendered
) -> MailchimpOutcome:
    assert user.mailchimp_api_key and user.mailchimp_list_id
    sender = user.sender_address or rt.settings.mail_from_address
    async with MailchimpClient.from_settings(
        rt.settings, user.mailchimp_api_key, rt.redis
    ) as client:
        return await send_campaign(
            client,
            list_id=user.mailchimp_list_id,
            title=f"ced-campaign-{c.id}",
            recipients=members,
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            from_name=c.from_name or sender.partition("@")[0],
            reply_to=c.reply_to or sender,
        )


def _fail_all(
    rt: Runtime, c: Campaign, rows: Sequence[Any], reason: str, detail: str
) -> CampaignStatus:
    ids = [r.id for r in rows]
    settle(
        rt,
        c,
        [(i, SendStatus.FAILED, reason, detail, None, False) for i in ids],
        expect=(SendStatus.QUEUED,),
    )
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        session.execute(
            update(Campaign)
            .where(Campaign.id == c.id, Campaign.status == CampaignStatus.RUNNING)
            .values(status=CampaignStatus.FAILED, detail=detail, finished_at=now, updated_at=now)
        )
    log.warning("mailchimp campaign failed id=%s reason=%s", c.id, reason)
    return CampaignStatus.FAILED
