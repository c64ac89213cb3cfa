"""MailChimp Marketing API v3: sync recipients to an agent's audience, then create and send one
campaign to exactly them, retrying what MailChimp asks us to retry and never sending twice."""

from __future__ import annotations

from dispatcher.campaigns.mailchimp.account import (
    MAX_CONNECTIONS,
    datacenter_url,
    key_fingerprint,
    mailchimp_semaphore,
)
from dispatcher.campaigns.mailchimp.client import BATCH_SIZE, PAGE_SIZE, SLOT_WAIT, MailchimpClient
from dispatcher.campaigns.mailchimp.errors import (
    FieldError,
    MailchimpAuthFailed,
    MailchimpRejected,
    MailchimpUnavailable,
)
from dispatcher.campaigns.mailchimp.send import send_campaign
from dispatcher.campaigns.mailchimp.values import (
    SENT_STATUSES,
    Campaign,
    MailchimpOutcome,
    Member,
    MemberError,
    Segment,
    UpsertResult,
)

__all__ = [
    "BATCH_SIZE",
    "MAX_CONNECTIONS",
    "PAGE_SIZE",
    "SENT_STATUSES",
    "SLOT_WAIT",
    "Campaign",
    "FieldError",
    "MailchimpAuthFailed",
    "MailchimpClient",
    "MailchimpOutcome",
    "MailchimpRejected",
    "MailchimpUnavailable",
    "Member",
    "MemberError",
    "Segment",
    "UpsertResult",
    "datacenter_url",
    "key_fingerprint",
    "mailchimp_semaphore",
    "send_campaign",
]
