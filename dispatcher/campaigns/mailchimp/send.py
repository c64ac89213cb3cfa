"""The whole MailChimp send: upsert, segment, create, fill and send one campaign, once."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace

from dispatcher.campaigns.mailchimp.client import MailchimpClient
from dispatcher.campaigns.mailchimp.errors import MailchimpRejected
from dispatcher.campaigns.mailchimp.values import MailchimpOutcome, Member, MemberError, Segment
from dispatcher.errors import InvalidInput

log = logging.getLogger(__name__)


async def send_campaign(
    client: MailchimpClient,
    *,
    list_id: str,
    title: str,
    recipients: Sequence[Member],
    subject: str,
    html: str,
    text: str | None,
    from_name: str,
    reply_to: str,
    segment_name: str | None = None,
    before_send: Callable[[], Awaitable[None]] | None = None,
) -> MailchimpOutcome:
    """Upsert the recipients, put the ones MailChimp will mail in a static segment, create the
    campaign to it, set its content and send it.

    ``title`` names the campaign and (by default) the segment and must be unique per campaign
    of ours (e.g. derived from our campaign id): it is how a run repeated after a crash or a
    redelivery finds what an earlier run made, so the campaign is created and sent at most once.
    ``before_send`` is awaited just before the send action is asked for. Raises
    :class:`MailchimpRejected` (never retry) or :class:`MailchimpUnavailable` (retry the whole
    call later; it is safe).
    """
    members = _dedupe(recipients)
    if not members:
        raise InvalidInput("recipients", "a MailChimp campaign needs at least one recipient")
    name = segment_name or title
    log.info("mailchimp campaign %r: %d recipients for list %s", title, len(members), list_id)

    deliverable, errors = await _sync(client, list_id, members)
    log.info("mailchimp campaign %r: %d deliverable, %d not", title, len(deliverable), len(errors))

    # Before anything else: an earlier run may have sent it already (then the audience as it
    # is now need not be the audience it went to).
    existing = await client.find_campaign(list_id, title)
    if existing is not None and existing.went:
        log.info("mailchimp campaign %r: already sent as %s", title, existing.id)
        return MailchimpOutcome(
            existing.id,
            existing.segment_id,
            existing.status,
            tuple(deliverable),
            tuple(errors),
            already_sent=True,
        )
    if not deliverable:
        return MailchimpOutcome(None, None, "not_sent", (), tuple(errors))
    if existing is not None and existing.status != "save":
        raise MailchimpRejected(
            f"campaign {existing.id} is {existing.status!r} in MailChimp and cannot be sent",
            operation="send_campaign",
        )

    segment = await _segment(client, list_id, name, deliverable)
    if segment.errors:
        lost = {e.email.lower() for e in segment.errors}
        errors.extend(segment.errors)
        deliverable = [e for e in deliverable if e.lower() not in lost]

    campaign = existing or await client.create_campaign(
        list_id=list_id,
        segment_id=segment.id,
        title=title,
        subject=subject,
        from_name=from_name,
        reply_to=reply_to,
    )
    await client.set_content(campaign.id, html, text)
    if before_send is not None:
        await before_send()  # e.g. record that from now on the campaign may have gone out
    status = await client.send(campaign.id)
    return MailchimpOutcome(campaign.id, segment.id, status, tuple(deliverable), tuple(errors))


async def _sync(
    client: MailchimpClient, list_id: str, members: Sequence[Member]
) -> tuple[list[str], list[MemberError]]:
    """Upsert the members into the audience; the addresses MailChimp will mail, and why the
    others will not be (refused, or unsubscribed/cleaned in the audience)."""
    upsert = await client.upsert_members(list_id, members)
    errors = list(upsert.errors)
    refused = {e.email.lower() for e in errors}
    deliverable: list[str] = []
    for m in members:
        status = upsert.statuses.get(m.email.lower(), "subscribed")
        if m.email.lower() in refused:
            continue
        if status != "subscribed":
            errors.append(
                MemberError(m.email, f"the contact is {status} in the MailChimp audience", status)
            )
            continue
        deliverable.append(m.email)
    return deliverable, errors


async def _segment(
    client: MailchimpClient, list_id: str, name: str, deliverable: list[str]
) -> Segment:
    """The static segment of the deliverable members: made now, or completed when an earlier
    run made it but may have stopped half way through adding members."""
    segment = await client.find_segment(list_id, name)
    if segment is None:
        return await client.create_static_segment(list_id, name, deliverable)
    if segment.member_count != len(deliverable):
        added = await client.add_segment_members(list_id, segment.id, deliverable)
        return Segment(segment.id, name, len(deliverable) - len(added), added)
    return segment


def _dedupe(recipients: Iterable[Member]) -> list[Member]:
    """First occurrence of each address; MailChimp compares addresses without case."""
    seen: set[str] = set()
    out: list[Member] = []
    for m in recipients:
        email = m.email.strip()
        if email and email.lower() not in seen:
            seen.add(email.lower())
            out.append(replace(m, email=email))
    return out
