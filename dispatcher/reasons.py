"""Every reason the dispatcher records or raises, in one enumeration (the README lists them)."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a send failed, was left unknown, or is waiting; stored by value."""

    # Terminal reasons of a failed send (credit back, except quota_exhausted: none was taken).
    QUOTA_EXHAUSTED = "quota_exhausted"  # no credit left in the grant: never retried (R4)
    RETRIES_EXHAUSTED = "retries_exhausted"  # deferred too many times
    SUPPRESSED = "suppressed"  # the address is on the agent's suppression list
    RENDER_ERROR = "render_error"  # the agent's template failed to compile or render
    HARD_BOUNCE = "hard_bounce"  # the address does not exist (suppressed from now on)
    POLICY_REJECTED = "policy_rejected"  # refused for content or reputation
    SMTP_REJECTED = "smtp_rejected"  # any other permanent SMTP refusal
    RESERVATION_EXPIRED = "reservation_expired"  # no worker sent it while its credit was held
    CAMPAIGN_CANCELLED = "campaign_cancelled"
    CAMPAIGN_NOT_STARTED = "campaign_not_started"  # its credits were never reserved
    MAILCHIMP_NOT_CONNECTED = "mailchimp_not_connected"
    MAILCHIMP_REFUSED = "mailchimp_refused"  # MailChimp refused the contact
    MAILCHIMP_REJECTED = "mailchimp_rejected"  # MailChimp refused the request (4xx)
    MAILCHIMP_AUTH_FAILED = "mailchimp_auth_failed"
    MAILCHIMP_UNAVAILABLE = "mailchimp_unavailable"  # 429/5xx/timeouts until retries ran out
    #: Handling kept failing for an unforeseen cause: terminal after SEND_MAX_RETRIES.
    INTERNAL_ERROR = "internal_error"

    # Terminal reasons of an unknown outcome (credit kept, never resent).
    AMBIGUOUS_DELIVERY = "ambiguous_delivery"  # the connection was lost after DATA
    WORKER_LOST = "worker_lost_during_smtp"  # the worker died mid-conversation

    # Transient: the item waits and is tried again.
    SMTP_DEFERRED = "smtp_deferred"  # 4xx
    CONNECT_FAILED = "connect_failed"
    SMTP_CONNECT_REFUSED = "smtp_connect_refused"
    SMTP_LOGIN_REFUSED = "smtp_login_refused"
    CONNECTION_LOST = "connection_lost"
    RELAY_HALTED = "relay_halted"  # ops or an auth failure stopped sending
    RATE_LIMITED = "rate_limited"  # the relay's shared rate limit is used up
    GUARD_UNAVAILABLE = "guard_unavailable"  # Redis could not say whether to send
    CHUNK_YIELD = "chunk_yield"  # a chunk's task ran out of time or its worker is stopping
    POLICY_STOP = "policy_stop"  # the relay refused a message of the batch on policy grounds
    QUEUE_UNAVAILABLE = "queue_unavailable"
    SEND_BUSY = "send_busy"  # another worker holds the lease
    EARLIER_NOTICE_PENDING = "earlier_notice_pending"  # a lower usage notice goes out first
    SEMAPHORE_TIMEOUT = "semaphore_timeout"  # no MailChimp connection slot came free in time
