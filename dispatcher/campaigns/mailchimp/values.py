"""The values a MailChimp send works with: members, segments, campaigns and the outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Campaign statuses meaning the send action has been taken (a repeat would be refused).
SENT_STATUSES = frozenset({"sending", "sent", "schedule"})


@dataclass(frozen=True)
class Member:
    """A recipient to put in the audience: email and optional first and last name."""

    email: str
    first_name: str | None = None
    last_name: str | None = None

    def payload(self) -> dict[str, Any]:
        """The batch-subscribe item: new members subscribe, existing ones keep their status."""
        item: dict[str, Any] = {"email_address": self.email, "status_if_new": "subscribed"}
        merge = {
            tag: value
            for tag, value in (("FNAME", self.first_name), ("LNAME", self.last_name))
            if value
        }
        if merge:
            item["merge_fields"] = merge
        return item


@dataclass(frozen=True)
class MemberError:
    """A recipient MailChimp refused or will not mail, with its reason."""

    email: str
    error: str
    code: str = ""


@dataclass(frozen=True)
class UpsertResult:
    """What the batch subscribe calls reported."""

    errors: tuple[MemberError, ...]
    statuses: Mapping[str, str]  # lower-cased email -> status in the audience after the call
    created: int
    updated: int


@dataclass(frozen=True)
class Segment:
    """A static segment (MailChimp's ids of segments are integers)."""

    id: int
    name: str
    member_count: int
    errors: tuple[MemberError, ...] = ()  # emails MailChimp would not add to it

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Segment:
        return cls(int(data["id"]), str(data.get("name", "")), int(data.get("member_count") or 0))


@dataclass(frozen=True)
class Campaign:
    """The fields of a MailChimp campaign the dispatcher looks at."""

    id: str
    status: str
    title: str
    list_id: str
    segment_id: int | None
    emails_sent: int

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Campaign:
        recipients = data.get("recipients") or {}
        segment = (recipients.get("segment_opts") or {}).get("saved_segment_id")
        return cls(
            id=str(data["id"]),
            status=str(data.get("status", "")),
            title=str((data.get("settings") or {}).get("title", "")),
            list_id=str(recipients.get("list_id", "")),
            segment_id=int(segment) if segment is not None else None,
            emails_sent=int(data.get("emails_sent") or 0),
        )

    @property
    def went(self) -> bool:
        """True once the send action was taken."""
        return self.status in SENT_STATUSES


@dataclass(frozen=True)
class MailchimpOutcome:
    """The result of :func:`send_campaign`.

    ``recipients`` went into the campaign's segment (handed to MailChimp); ``errors`` are the
    recipients that will not get the email, with MailChimp's reason. ``campaign_id`` is None
    when no recipient was left to send to. ``already_sent``: an earlier run had sent it.
    """

    campaign_id: str | None
    segment_id: int | None
    status: str
    recipients: tuple[str, ...]
    errors: tuple[MemberError, ...]
    already_sent: bool = False
