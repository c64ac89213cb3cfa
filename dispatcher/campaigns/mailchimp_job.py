"""Campaigns routed to the agent's MailChimp account: no credits; each contact's timeline
says the email went out through MailChimp (rule R11)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from redis.exceptions import RedisError
from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.campaigns import control
from dispatcher.campaigns.control import complete_if_done
from dispatcher.campaigns.mailchimp import (
    SLOT_WAIT,
    MailchimpClient,
    MailchimpOutcome,
    MailchimpRejected,
    MailchimpUnavailable,
    Member,
    send_campaign,
)
from dispatcher.delivery import lifecycle, suppression
from dispatcher.delivery.lifecycle import Outcome
from dispatcher.delivery.rendering import MessageTemplate, Rendered
from dispatcher.delivery.sandbox import RenderLimits
from dispatcher.errors import NotFound, RenderError, SendBusy
from dispatcher.models import Campaign, CampaignStatus, Send, SendStatus, User
from dispatcher.reasons import Reason
from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")

_QUEUED = (SendStatus.QUEUED,)

#: Our merge fields as MailChimp merge tags: MailChimp fills them per recipient.
MERGE_TAGS = {"first_name": "*|FNAME|*", "last_name": "*|LNAME|*", "email": "*|EMAIL|*"}


def render_for_mailchimp(c: Campaign, limits: RenderLimits) -> Rendered:
    """Render the campaign once, with merge fields turned into MailChimp merge tags."""
    context = {**MERGE_TAGS, "contact": dict(MERGE_TAGS)}
    return MessageTemplate(c.subject, c.html, c.text).render(context, limits)


def deliver_mailchimp(rt: Runtime, c: Campaign, user: User) -> CampaignStatus:
    """Sync the recipients to the agent's audience and send the campaign there, once.

    Retried on MailChimp 429/5xx/timeouts (the client is safe to repeat: it finds a campaign
    it already created or sent); a 4xx fails every recipient with MailChimp's detail.
    """
    if c.status is not CampaignStatus.RUNNING:
        return c.status
    lease = JobLease.claim(rt, c.id)
    if lease is None:
        return _status(rt, c.id)
    try:
        return _deliver_held(rt, c, user, lease)
    except (RedisError, SQLAlchemyError):
        lease.give_back_attempt()  # our own infrastructure failed, not MailChimp
        raise
    except MailchimpUnavailable as exc:
        if exc.operation == SLOT_WAIT:
            lease.give_back_attempt()  # it waited for one of the agent's connections only
        raise
    finally:
        lease.release()


def _deliver_held(rt: Runtime, c: Campaign, user: User, lease: JobLease) -> CampaignStatus:
    """The job's run once it holds the lease: sync, send, and record every recipient."""
    rows = _open_recipients(rt, c, lease)
    if not rows:
        return complete_if_done(rt, c.id)
    if not (user.mailchimp_api_key and user.mailchimp_list_id):
        detail = "the agent has no connected MailChimp account"
        return _fail_all(rt, c, lease, rows, Reason.MAILCHIMP_NOT_CONNECTED, detail)
    try:
        rendered = render_for_mailchimp(c, RenderLimits.of(rt.settings))
    except RenderError as exc:
        return _fail_all(rt, c, lease, rows, exc.reason, exc.detail)
    members = [
        Member(
            r.contact_email,
            (r.merge_fields or {}).get("first_name"),
            (r.merge_fields or {}).get("last_name"),
        )
        for r in rows
    ]
    try:
        outcome = asyncio.run(lease.hold_during(_send(rt, c, user, members, rendered, lease)))
    except MailchimpRejected as exc:
        lease.confirm()
        return _fail_all(rt, c, lease, rows, exc.reason, str(exc))
    except MailchimpUnavailable as exc:
        # Attempts are counted in SQL: waiting for a lease or for Redis uses none of them.
        last = lease.attempt > rt.settings.send_max_retries
        if last and exc.operation != SLOT_WAIT:
            lease.confirm()
            return _fail_all(rt, c, lease, rows, exc.reason, f"gave up after retries: {exc}")
        raise
    lease.confirm()
    _record_sent(rt, c, rows, outcome, rendered.subject)
    return complete_if_done(rt, c.id)


def _open_recipients(rt: Runtime, c: Campaign, lease: JobLease) -> list[Any]:
    """The recipients still to send; those unsubscribed or bounced since the campaign was
    created are settled here, never synced or sent."""
    with rt.sessions() as session:
        rows = session.execute(
            select(Send.id, Send.contact_email, Send.merge_fields).where(
                Send.campaign_id == c.id, Send.status == SendStatus.QUEUED
            )
        ).all()
        emails = (r.contact_email for r in rows)
        blocked = suppression.active(session, c.user_id, emails, rt.clock.now())
    if not blocked:
        return list(rows)
    skipped = [r for r in rows if suppression.normalize(r.contact_email) in blocked]
    skip = lease.failure(
        Reason.SUPPRESSED, "the address is on the agent's suppression list; not sent"
    )
    lifecycle.settle(rt, [Outcome(r.id, *skip) for r in skipped], _QUEUED, campaign=c)
    return [r for r in rows if suppression.normalize(r.contact_email) not in blocked]


def _record_sent(
    rt: Runtime, c: Campaign, rows: Sequence[Any], outcome: MailchimpOutcome, subject: str
) -> None:
    """Each recipient's outcome once MailChimp sent the campaign: sent, or refused."""
    refused = {e.email.lower(): e.error for e in outcome.errors}
    detail = f"sent through MailChimp (campaign {outcome.campaign_id})"

    def refusal(error: str) -> tuple[SendStatus, str, str]:
        if outcome.already_sent:
            # An earlier run sent the campaign; the audience has changed since (say the
            # contact unsubscribed in MailChimp): whether it reached this contact is not known.
            return (
                SendStatus.UNKNOWN,
                Reason.AMBIGUOUS_DELIVERY,
                f"the campaign had gone out through MailChimp before this contact was found "
                f"refused ({error}); it may have been sent",
            )
        return SendStatus.FAILED, Reason.MAILCHIMP_REFUSED, error

    outcomes = [
        Outcome(r.id, *refusal(refused[r.contact_email.lower()]), subject)
        if r.contact_email.lower() in refused
        else Outcome(r.id, SendStatus.SENT, None, detail, subject)
        for r in rows
    ]
    lifecycle.settle(rt, outcomes, _QUEUED, campaign=c)
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


async def _send(
    rt: Runtime,
    c: Campaign,
    user: User,
    members: list[Member],
    rendered: Rendered,
    lease: JobLease | None = None,
) -> MailchimpOutcome:
    assert user.mailchimp_api_key and user.mailchimp_list_id
    sender = user.sender_address or rt.settings.mail_from_address
    api_key = rt.sealer.open(user.mailchimp_api_key)
    async with MailchimpClient.from_settings(rt.settings, api_key, rt.redis) as client:
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
            before_send=None if lease is None else _marking(lease),
        )


def _marking(lease: JobLease) -> Callable[[], Awaitable[None]]:
    async def mark() -> None:
        await asyncio.to_thread(lease.sending)

    return mark


# --------------------------------------------------------------------------- the job's lease


def _lease_length(rt: Runtime) -> timedelta:
    """How long a MailChimp job's lease lasts unrenewed (``SEND_LEASE_SECONDS``)."""
    return timedelta(seconds=rt.settings.send_lease_seconds)


class JobLease:
    """A MailChimp job's hold on its campaign (``campaigns.lease_until``), fenced on the
    expiry this run wrote: only the run holding it talks to MailChimp or records outcomes.
    Each claim counts one attempt of the job (``campaigns.attempts``)."""

    def __init__(
        self, rt: Runtime, campaign_id: str, until: datetime, attempt: int, may_have_gone: bool
    ) -> None:
        self.rt = rt
        self.campaign_id = campaign_id
        self.until = until
        self.attempt = attempt
        #: A run (this or an earlier one) asked MailChimp to send: a failure is ambiguous.
        self.may_have_gone = may_have_gone

    @property
    def length(self) -> timedelta:
        return _lease_length(self.rt)

    @classmethod
    def claim(cls, rt: Runtime, campaign_id: str) -> JobLease | None:
        """Take the lease; None when the campaign is no longer running. Raises
        :class:`SendBusy` while another run holds it."""
        now = rt.clock.now()
        until = now + _lease_length(rt)
        with rt.sessions.begin() as session:
            won = session.execute(
                update(Campaign)
                .where(
                    Campaign.id == campaign_id,
                    Campaign.status == CampaignStatus.RUNNING,
                    or_(Campaign.lease_until.is_(None), Campaign.lease_until <= now),
                )
                .values(lease_until=until, updated_at=now, attempts=Campaign.attempts + 1)
                .returning(Campaign.attempts, Campaign.send_attempted_at)
            ).first()
            if won is not None:
                return cls(rt, campaign_id, until, int(won[0]), won[1] is not None)
            row = session.execute(
                select(Campaign.status, Campaign.lease_until).where(Campaign.id == campaign_id)
            ).one()
        if row.status is not CampaignStatus.RUNNING or row.lease_until is None:
            return None
        log.info("mailchimp job id=%s is held by another run; stepping back", campaign_id)
        raise SendBusy(campaign_id, (row.lease_until - now).total_seconds() + 1)

    def renew(self) -> bool:
        """Extend the lease if it is still ours; false when another run took it over."""
        now = self.rt.clock.now()
        until = now + self.length
        with self.rt.sessions.begin() as session:
            kept = session.execute(
                update(Campaign)
                .where(
                    Campaign.id == self.campaign_id,
                    Campaign.lease_until == self.until,
                    # A campaign cancelled meanwhile (its lease had run out) is not renewed.
                    Campaign.status == CampaignStatus.RUNNING,
                )
                .values(lease_until=until, updated_at=now)
            )
        if cast(CursorResult[Any], kept).rowcount != 1:
            return False
        self.until = until
        return True

    def confirm(self) -> None:
        """Before recording outcomes: raise :class:`SendBusy` unless the lease is still ours
        (a run that stalled past it must leave the recording to the run that took over)."""
        if not self.renew():
            log.error("mailchimp job id=%s lost its lease; not recording", self.campaign_id)
            raise SendBusy(self.campaign_id, self.length.total_seconds() / 3)

    def sending(self) -> None:
        """Record that MailChimp is being asked to send (from now on a failure is ambiguous)."""
        self.may_have_gone = True
        with self.rt.sessions.begin() as session:
            session.execute(
                update(Campaign)
                .where(Campaign.id == self.campaign_id, Campaign.send_attempted_at.is_(None))
                .values(send_attempted_at=self.rt.clock.now())
            )

    def failure(self, reason: str, detail: str) -> tuple[SendStatus, str, str]:
        """The outcome of a recipient this run could not send: failed, or ``unknown`` once a
        send was asked for (the campaign may have reached them)."""
        if self.may_have_gone:
            return (
                SendStatus.UNKNOWN,
                Reason.AMBIGUOUS_DELIVERY,
                f"{detail}; MailChimp had been asked to send the campaign before, so it may "
                "have reached this contact",
            )
        return SendStatus.FAILED, reason, detail

    def give_back_attempt(self) -> None:
        """Uncount this run (it never got an answer from MailChimp); best effort."""
        try:
            with self.rt.sessions.begin() as session:
                session.execute(
                    update(Campaign)
                    .where(Campaign.id == self.campaign_id, Campaign.lease_until == self.until)
                    .values(attempts=Campaign.attempts - 1)
                )
        except SQLAlchemyError as exc:
            log.warning("mailchimp job id=%s attempt not given back: %s", self.campaign_id, exc)

    def release(self) -> None:
        with self.rt.sessions.begin() as session:
            session.execute(
                update(Campaign)
                .where(Campaign.id == self.campaign_id, Campaign.lease_until == self.until)
                .values(lease_until=None)
            )

    async def hold_during(self, work: Awaitable[T]) -> T:
        """Await ``work`` while renewing the lease every third of its length. A renewal the
        database could not make is tried again at the next tick; once the lease is lost, or
        a renewal does not come back while a third of the lease is still left, the work is
        cancelled and :class:`SendBusy` raised (a run that cannot prove it holds the lease
        must stop before another run may take it)."""
        every = self.length.total_seconds() / 3
        margin = min(every, 5.0)  # stop this long before the lease would run out

        async def keep() -> None:
            pause = every
            while True:
                await asyncio.sleep(pause)
                budget = (self.until - self.rt.clock.now()).total_seconds() - margin
                if budget <= 0:
                    return  # renewals kept failing: the lease is about to run out
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
                    # cancellation that ends this keeper.
                    async with asyncio.timeout(budget):
                        renewed = await asyncio.to_thread(self.renew)
                except TimeoutError:
                    log.error("mailchimp job id=%s lease renewal hung", self.campaign_id)
                    return
                except SQLAlchemyError as exc:
                    log.warning(
                        "mailchimp job id=%s lease not renewed (%s); trying again",
                        self.campaign_id,
                        exc,
                    )
                    pause = min(every, margin)
                    continue
                if not renewed:
                    return
                pause = every

        job = asyncio.ensure_future(work)
        keeper = asyncio.ensure_future(keep())
        try:
            await asyncio.wait({job, keeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            keeper.cancel()
            await asyncio.wait({keeper})  # a cancellation of this task still propagates
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            log.error("mailchimp job id=%s lost its lease mid-run; stopped", self.campaign_id)
            raise SendBusy(self.campaign_id, every)
        return job.result()


def _status(rt: Runtime, campaign_id: str) -> CampaignStatus:
    with rt.sessions() as session:
        status = session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))
    if status is None:
        raise NotFound("campaign", campaign_id)
    return status


def _fail_all(
    rt: Runtime, c: Campaign, lease: JobLease, rows: Sequence[Any], reason: str, detail: str
) -> CampaignStatus:
    outcome = lease.failure(reason, detail)
    lifecycle.settle(rt, [Outcome(r.id, *outcome) for r in rows], _QUEUED, campaign=c)
    control.fail(rt, c.id, detail)
    log.warning("mailchimp campaign failed id=%s reason=%s", c.id, reason)
    return CampaignStatus.FAILED
