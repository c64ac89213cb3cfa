"""SQL tables: users, sends (one row per send, the credit ledger) and timeline events."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored by value, as a plain string column, so migrations stay portable.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        validate_strings=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class SendStatus(enum.StrEnum):
    """Where a send is in its life; the last three are terminal."""

    QUEUED = "queued"  # stored and enqueued, no credit yet
    RESERVED = "reserved"  # credit taken, SMTP conversation not started
    SENDING = "sending"  # a worker holds the lease and talks SMTP
    SENT = "sent"
    FAILED = "failed"
    UNKNOWN = "unknown"  # outcome ambiguous: credit kept, never resent

    @property
    def terminal(self) -> bool:
        return self in (SendStatus.SENT, SendStatus.FAILED, SendStatus.UNKNOWN)


#: Statuses whose credit stays taken: the SQL side of the quota ledger.
CHARGED_STATUSES = (SendStatus.RESERVED, SendStatus.SENDING, SendStatus.SENT, SendStatus.UNKNOWN)


class SendKind(enum.StrEnum):
    SMARTPLAN = "smartplan"
    CAMPAIGN = "campaign"
    #: Usage recorded from outside the dispatcher (``dispatcher demo``'s earlier sends): it
    #: takes credits of its grant like a send, but was never sent here, so the outcome counts
    #: operators read (``dispatcher status``) leave it out.
    IMPORTED = "imported"


class Provider(enum.StrEnum):
    COMMAND_EMAIL = "command_email"  # our SMTP path; one credit per recipient
    MAILCHIMP = "mailchimp"  # the agent's MailChimp account; no credits


class CampaignStatus(enum.StrEnum):
    #: Recipients stored (as send rows, or compactly on the campaign row until its first chunk
    #: task writes their rows: see ``Campaign.pending_recipients``), credits being reserved.
    RESERVING = "reserving"
    #: Waiting for its ``send_at``; credits held only when that falls in the current period.
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (CampaignStatus.CANCELLED, CampaignStatus.COMPLETED, CampaignStatus.FAILED)


class GrantReason(enum.StrEnum):
    PERIOD_START = "period_start"  # a new period (first period, or renewal)
    UPGRADE = "upgrade"
    CANCEL = "cancel"


class OrderKind(enum.StrEnum):
    UPGRADE = "upgrade"
    RENEWAL = "renewal"


class SystemEmailKind(enum.StrEnum):
    USAGE_NOTICE = "usage_notice"
    RECEIPT = "receipt"


class SuppressionReason(enum.StrEnum):
    HARD_BOUNCE = "hard_bounce"  # the relay said the address does not exist
    UNSUBSCRIBE = "unsubscribe"  # the contact asked (one-click or the link)
    MANUAL = "manual"  # the agent or ops added it
    SOFT_BOUNCE = "soft_bounce"  # SOFT_BOUNCE_LIMIT temporary failures reported after delivery
    COMPLAINT = "complaint"  # the contact reported the email as spam (a feedback report)


class AlertKind(enum.StrEnum):
    POLICY_REJECTED = "policy_rejected"  # the relay refused content or reputation: campaign paused
    SMTP_AUTH_FAILED = "smtp_auth_failed"  # the relay refused our credentials: sending stopped
    INTERNAL_ERROR = "internal_error"  # an item kept failing for an unforeseen cause: gave up
    EVENTS_WEBHOOK_FAILING = "events_webhook_failing"  # the CRM's receiver keeps refusing


class TimelineKind(enum.StrEnum):
    EMAIL_SENT = "email_sent"
    EMAIL_FAILED = "email_failed"
    EMAIL_UNKNOWN = "email_unknown"
    UNSUBSCRIBED = "unsubscribed"  # the contact unsubscribed from one of the agent's emails
    OPENED = "opened"  # the tracking pixel was loaded (TRACK_OPENS)
    CLICKED = "clicked"  # a tracked link was followed (TRACK_CLICKS); detail: its target
    #: Reported after the relay took the email (a DSN or a relay's webhook): the send's terminal
    #: outcome stays what it was; this event refers to it.
    EMAIL_BOUNCED = "email_bounced"
    EMAIL_COMPLAINED = "email_complained"


class FeedbackKind(enum.StrEnum):
    """What a report about an email already sent says."""

    HARD_BOUNCE = "hard_bounce"  # permanent failure (DSN 5.x.x): the address is suppressed
    SOFT_BOUNCE = "soft_bounce"  # temporary failure (4.x.x, delayed): counted
    COMPLAINT = "complaint"  # the contact marked it as spam: suppressed

    @property
    def timeline_kind(self) -> TimelineKind:
        if self is FeedbackKind.COMPLAINT:
            return TimelineKind.EMAIL_COMPLAINED
        return TimelineKind.EMAIL_BOUNCED


class User(Base):
    """An agent: the owner of credits and the sender of emails."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    platform_email: Mapped[str | None] = mapped_column(String(254))
    communications_email: Mapped[str | None] = mapped_column(String(254))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    plan: Mapped[str] = mapped_column(String(64), default="free")
    mailchimp_api_key: Mapped[str | None] = mapped_column(String(512))  # sealed: sealing.py
    mailchimp_list_id: Mapped[str | None] = mapped_column(String(64))
    #: Shown in the footer of the agent's mail (CAN-SPAM, CASL); a campaign needs one.
    postal_address: Mapped[str | None] = mapped_column(String(300))
    pending_plan: Mapped[str | None] = mapped_column(String(64))  # a downgrade, at next period
    period: Mapped[str | None] = mapped_column(String(16))  # period of the current grant
    grant_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    period_end: Mapped[datetime | None] = mapped_column(index=True)  # when renewal is due (UTC)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    @property
    def billing_address(self) -> str | None:
        """Where receipts and notices go: the platform mailbox, else the communications one."""
        return self.platform_email or self.communications_email

    @property
    def sender_address(self) -> str | None:
        """The address mail is sent from: the platform mailbox, else the communications one."""
        return self.platform_email or self.communications_email


class Send(Base):
    """One email to one recipient, with its idempotency key, status and credit period."""

    __tablename__ = "sends"
    __table_args__ = (
        Index("ix_sends_user_period_status", "user_id", "period", "status"),
        Index("ix_sends_campaign_chunk_status", "campaign_id", "chunk", "status"),
        # The beat's sweeps: stuck reservations, and outcomes still to publish.
        Index("ix_sends_kind_status_lease", "kind", "status", "lease_until"),
        Index("ix_sends_published_finished", "outcome_published", "finished_at"),
        # ix_sends_retry_at and ix_sends_refund_due, partial, follow the class.
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(400), unique=True)
    kind: Mapped[SendKind] = mapped_column(_enum(SendKind, "send_kind"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=False)
    contact_id: Mapped[str] = mapped_column(String(128))
    contact_email: Mapped[str] = mapped_column(String(254))
    merge_fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    smartplan_id: Mapped[str | None] = mapped_column(String(128))
    run_id: Mapped[str | None] = mapped_column(String(128))
    step_id: Mapped[str | None] = mapped_column(String(128))
    campaign_id: Mapped[str | None] = mapped_column(String(36))
    chunk: Mapped[int | None] = mapped_column(Integer)  # a campaign's unit of work
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    from_name: Mapped[str | None] = mapped_column(String(200))
    reply_to: Mapped[str | None] = mapped_column(String(254))
    status: Mapped[SendStatus] = mapped_column(_enum(SendStatus, "send_status"))
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    period: Mapped[str | None] = mapped_column(String(16))
    grant_seq: Mapped[int | None] = mapped_column(Integer)
    #: Indexed: a relay's webhook names the email by it.
    message_id: Mapped[str] = mapped_column(String(200), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: While ``sending``: the conversation's lease. While ``reserved``: how long the credit
    #: may be held without progress before the sweeper returns it.
    lease_until: Mapped[datetime | None]
    #: A wait too long for the broker's countdown: the beat sweep enqueues it again then.
    retry_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]  # set once the broker took the task
    outcome_published: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Failed with its credit to come back, and Redis has not confirmed the refund yet (set
    #: with the outcome, cleared once Redis gave the credit back; the beat retries the rest).
    refund_due: Mapped[bool] = mapped_column(Boolean, server_default=false())
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


#: The two sweeps' indexes hold only the rows they look for (a parked send, a refund still
#: due): the other sends, nearly all, cost them nothing when stored or moved on (every state
#: change sets ``updated_at``). A query uses them when its WHERE has the same condition.
SEND_PARKED = Send.retry_at.is_not(None)
SEND_REFUND_DUE = Send.refund_due.is_(True)
Index("ix_sends_retry_at", Send.retry_at, sqlite_where=SEND_PARKED, postgresql_where=SEND_PARKED)
Index(
    "ix_sends_refund_due",
    Send.updated_at,
    sqlite_where=SEND_REFUND_DUE,
    postgresql_where=SEND_REFUND_DUE,
)


class TimelineEvent(Base):
    """Something that happened with a contact, as the agent sees it in the CRM."""

    __tablename__ = "timeline_events"
    __table_args__ = (Index("ix_timeline_user_contact", "user_id", "contact_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    contact_id: Mapped[str] = mapped_column(String(128))
    send_id: Mapped[str | None] = mapped_column(ForeignKey("sends.id"))
    kind: Mapped[TimelineKind] = mapped_column(_enum(TimelineKind, "timeline_kind"))
    status: Mapped[SendStatus] = mapped_column(_enum(SendStatus, "send_status"))
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    source: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[datetime]


class FeedbackEvent(Base):
    """A bounce or complaint reported for one send after the relay took it: at most one of
    each kind per send (a report delivered twice is recorded once)."""

    __tablename__ = "feedback_events"
    __table_args__ = (
        UniqueConstraint("send_id", "kind"),
        # Soft bounces of one address of one agent are counted here.
        Index("ix_feedback_events_user_email_kind", "user_id", "email", "kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    send_id: Mapped[str] = mapped_column(ForeignKey("sends.id"))
    email: Mapped[str] = mapped_column(String(254))  # lower-cased
    kind: Mapped[FeedbackKind] = mapped_column(_enum(FeedbackKind, "feedback_kind"))
    #: Where the report came from: ``dsn``, ``arf``, ``ses``, ``sendgrid``, ``postmark``,
    #: ``mailgun``.
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(64))  # e.g. 5.1.1, or abuse
    detail: Mapped[str | None] = mapped_column(Text)
    #: A SmartPlan send's event is on the outcome stream (at least once).
    outcome_published: Mapped[bool] = mapped_column(Boolean, server_default=false())
    occurred_at: Mapped[datetime]


class Grant(Base):
    """Credits given to a user for (the rest of) a period: at its start, or by an upgrade or a
    cancel. Reservations come from the latest grant; thresholds count against its total."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("user_id", "period", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    period: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer)
    plan: Mapped[str] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(Integer)
    reason: Mapped[GrantReason] = mapped_column(_enum(GrantReason, "grant_reason"))
    notified: Mapped[int] = mapped_column(Integer, default=0)  # highest threshold notified
    created_at: Mapped[datetime]


class Order(Base):
    """A charge for a plan: an upgrade now, or a renewal at a period start."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[OrderKind] = mapped_column(_enum(OrderKind, "order_kind"))
    plan: Mapped[str] = mapped_column(String(64))
    amount_cents: Mapped[int] = mapped_column(Integer)
    credits: Mapped[int] = mapped_column(Integer)
    recurring_cents: Mapped[int] = mapped_column(Integer)
    period: Mapped[str] = mapped_column(String(16))
    # "<user>:<period>" for renewals: a period can never be charged twice.
    renewal_key: Mapped[str | None] = mapped_column(String(160), unique=True)
    charge_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]


class Notification(Base):
    """An in-app usage notification; one per threshold per grant."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("grant_id", "threshold"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"))
    threshold: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    read_at: Mapped[datetime | None]


class SystemEmail(Base):
    """An email of ours to an agent (usage notice, receipt): costs no credit."""

    __tablename__ = "system_emails"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[SystemEmailKind] = mapped_column(_enum(SystemEmailKind, "system_email_kind"))
    notification_id: Mapped[int | None] = mapped_column(ForeignKey("notifications.id"))
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id"))
    to_address: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[SendStatus] = mapped_column(_enum(SendStatus, "send_status"))
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class Campaign(Base):
    """One email to many contacts of one agent, through Command Email or MailChimp."""

    __tablename__ = "campaigns"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        # The beat's start of scheduled campaigns: those due, by status and time.
        Index("ix_campaigns_status_send_at", "status", "send_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    provider: Mapped[Provider] = mapped_column(_enum(Provider, "campaign_provider"))
    status: Mapped[CampaignStatus] = mapped_column(_enum(CampaignStatus, "campaign_status"))
    name: Mapped[str | None] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    from_name: Mapped[str | None] = mapped_column(String(200))
    reply_to: Mapped[str | None] = mapped_column(String(254))
    recipients: Mapped[int] = mapped_column(Integer)  # valid recipients (one send each)
    #: How many recipients were refused as invalid and how many were on the agent's
    #: suppression list when the campaign was created (never charged); each one is a
    #: :class:`CampaignExclusion`.
    invalid_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    suppressed_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Recipients lacking a merge field the message uses without a default, per field (their
    #: copy shows it empty); None when none does.
    missing_fields: Mapped[dict[str, Any] | None]
    chunks: Mapped[int] = mapped_column(Integer)
    period: Mapped[str | None] = mapped_column(String(16))
    grant_seq: Mapped[int | None] = mapped_column(Integer)
    provider_campaign_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    #: A wait too long for the broker's countdown: the beat sweep enqueues the chunks then.
    retry_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    #: A MailChimp campaign's job: held by the run talking to MailChimp (renewed while it
    #: runs), so a redelivered or re-enqueued job never runs alongside it.
    lease_until: Mapped[datetime | None]
    #: When a MailChimp job first asked MailChimp to send: from then on a failure is ambiguous.
    send_attempted_at: Mapped[datetime | None]
    #: Runs of a MailChimp campaign's job (each claim of the lease): its retry budget.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The producer's key for the request that created it (unique per agent), and a digest of
    #: that request: a repeat answers with this campaign, a different request is refused.
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    request_digest: Mapped[str | None] = mapped_column(String(64))
    #: When a scheduled campaign is to start (UTC); None for one started at once.
    send_at: Mapped[datetime | None]
    #: A large campaign's valid recipients as accepted, compressed, until their send rows are
    #: written (``reserving``; None once they are, and for a campaign stored with its rows).
    #: Never loaded with the row: read only by the task that writes the sends.
    pending_recipients: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    #: How many chunks of ``pending_recipients`` are written as sends already (each chunk's
    #: sends and this count move in one transaction; the ledger counts the packed recipients
    #: as one number until all are written, and ignores those rows until then).
    packed_written: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: When a compact campaign's credits were granted (the request that created it then
    #: answered): from then on it is a worker's to start. None for other campaigns.
    reserved_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class ExclusionKind(enum.StrEnum):
    INVALID = "invalid"  # the request's row was not a valid recipient
    SUPPRESSED = "suppressed"  # the address was on the agent's suppression list


class CampaignExclusion(Base):
    """A recipient of a campaign request that gets no send: invalid, or suppressed. One row
    each, so a page of them reads only its rows."""

    __tablename__ = "campaign_exclusions"

    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    kind: Mapped[ExclusionKind] = mapped_column(
        _enum(ExclusionKind, "exclusion_kind"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # order within its kind
    #: The recipient's position in the request (None for suppressed recipients of campaigns
    #: created before it was kept).
    row: Mapped[int | None] = mapped_column(Integer)
    contact_id: Mapped[str] = mapped_column(Text)
    email: Mapped[str] = mapped_column(Text)
    field: Mapped[str | None] = mapped_column(Text)  # the field at fault (invalid only)
    reason: Mapped[str] = mapped_column(Text)


class Suppression(Base):
    """An address one agent must not email (rule: checked before any credit is reserved)."""

    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("user_id", "email"),
        # A user's list is read newest first by id, a page at a time.
        Index("ix_suppressions_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    email: Mapped[str] = mapped_column(String(254))  # lower-cased
    reason: Mapped[SuppressionReason] = mapped_column(
        _enum(SuppressionReason, "suppression_reason")
    )
    contact_id: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime | None]  # None: until removed
    created_at: Mapped[datetime]


class SuppressionRemoval(Base):
    """The record of an address taken off an agent's suppression list: who, when, why, and
    the entry as it was (an unsubscribe undone must be accountable)."""

    __tablename__ = "suppression_removals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    reason: Mapped[str] = mapped_column(String(32))  # the removed entry's reason
    suppressed_at: Mapped[datetime]
    removed_by: Mapped[str] = mapped_column(String(128))  # "token:<fingerprint>", "cli:<user>"
    why: Mapped[str] = mapped_column(Text)
    removed_at: Mapped[datetime]


class Alert(Base):
    """Something ops (and the agent, where it is theirs) must look at."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[AlertKind] = mapped_column(_enum(AlertKind, "alert_kind"))
    user_id: Mapped[str | None] = mapped_column(String(128), index=True)
    campaign_id: Mapped[str | None] = mapped_column(String(36))
    relay: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class EventCursor(Base):
    """How far a consumer of the timeline has got: the events webhook delivers every event
    after ``last_id`` (in id order, gaps waited for; see ``delivery/events_webhook.py``)."""

    __tablename__ = "event_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    #: Failed POSTs in a row; the next is not tried before ``retry_at``.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    retry_at: Mapped[datetime | None]
    #: Since when the next id has been missing (a transaction not yet committed, or rolled
    #: back): after ``GAP_WAIT`` it is taken as rolled back and passed.
    gap_since: Mapped[datetime | None]
    detail: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]
