"""Campaigns routed to the agent's MailChimp account (no credits)."""

from __future__ import annotations

from dispatcher.errors import PermanentError
from dispatcher.models import Campaign, CampaignStatus, User
from dispatcher.runtime import Runtime


def deliver_mailchimp(
    rt: Runtime, c: Campaign, user: User, *, final_attempt: bool = False
) -> CampaignStatus:
    """Sync the recipients to the agent's audience and send the campaign there."""
    raise PermanentError("mailchimp_unavailable", "MailChimp routing is not built yet")
