"""MailChimp's refusals and failures, as the dispatcher's permanent and transient errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dispatcher.errors import PermanentError, TransientError
from dispatcher.reasons import Reason


@dataclass(frozen=True)
class FieldError:
    """One entry of the ``errors`` array of a MailChimp validation problem."""

    field: str
    message: str


class MailchimpRejected(PermanentError):
    """MailChimp refused the request (4xx other than 429): repeating it cannot help.

    Carries MailChimp's problem document: ``status``, ``title``, ``detail``, ``errors``
    (field-level validation messages) and ``instance`` (MailChimp's id of the failure).
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str = "",
        errors: Sequence[FieldError] = (),
        instance: str = "",
        operation: str = "",
        reason: str = Reason.MAILCHIMP_REJECTED,
    ) -> None:
        super().__init__(reason, detail, status)
        self.status = status
        self.title = title
        self.errors = tuple(errors)
        self.instance = instance
        self.operation = operation
        fields = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        self.args = (f"{reason}: {detail}" + (f" ({fields})" if fields else ""),)


class MailchimpAuthFailed(MailchimpRejected):
    """The API key is malformed, revoked or not allowed (401/403): the agent must reconnect."""

    def __init__(self, detail: str, **problem: Any) -> None:
        super().__init__(detail, reason=Reason.MAILCHIMP_AUTH_FAILED, **problem)


class MailchimpUnavailable(TransientError):
    """MailChimp was throttling, failing or unreachable through every retry; try again later.

    ``retry_after`` is set when MailChimp asked for a longer pause than we wait in process.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        operation: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(Reason.MAILCHIMP_UNAVAILABLE, detail, status)
        self.status = status
        self.operation = operation
        self.retry_after = retry_after


class _Retry(Exception):
    """One attempt failed in a way worth repeating. ``ambiguous``: it may have taken effect."""

    def __init__(
        self, detail: str, *, status: int | None, ambiguous: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.ambiguous = ambiguous
        self.retry_after = retry_after
