"""The dispatcher's error tree: one root, retryable and permanent branches kept apart."""

from __future__ import annotations

from collections.abc import Sequence

from dispatcher.reasons import Reason


class DispatcherError(Exception):
    """Root of every error the dispatcher raises on purpose."""


class ConfigError(DispatcherError):
    """A configuration variable is missing, unknown or invalid."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class SchemaNotReady(DispatcherError):
    """The database is not migrated to the revision the code needs (the release process has
    not run, or is still running)."""

    def __init__(self, current: str | None, head: str, waited: float) -> None:
        super().__init__(
            f"the database is at revision {current or '(none: not migrated)'} after waiting "
            f"{waited:.0f}s, and this code needs {head}: run `dispatcher db upgrade` (the "
            "Procfile's release process)"
        )
        self.current = current
        self.head = head


class InvalidInput(DispatcherError, ValueError):
    """A producer sent something we cannot accept; nothing was stored or enqueued.

    ``field`` and ``problem`` name the first bad field; ``others`` the rest found with it."""

    def __init__(self, field: str, problem: str, *, others: Sequence[InvalidInput] = ()) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.others = tuple(others)

    @property
    def all(self) -> tuple[InvalidInput, ...]:
        """This refusal and the others found with it, first to last."""
        return (InvalidInput(self.field, self.problem), *self.others)


class NotFound(DispatcherError, LookupError):
    """A referenced user, send or other resource does not exist."""

    def __init__(self, resource: str, identifier: str) -> None:
        super().__init__(f"{resource} {identifier!r} not found")
        self.resource = resource
        self.identifier = identifier


class TransientError(DispatcherError):
    """Something that may succeed if tried again later (SMTP 4xx, timeouts, connect errors).

    ``retry_after`` (seconds), when set, is the earliest a retry may come: a server that said
    when to come back, a lease that runs out, a rate limit's window."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.code = code
        self.retry_after = retry_after


class PermanentError(DispatcherError):
    """Something that will fail the same way every time; never retried."""

    def __init__(self, reason: str, detail: str = "", code: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.code = code


class RenderError(PermanentError):
    """A user-authored template failed to compile or render (syntax, sandbox violation)."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.RENDER_ERROR, detail)


class DeliveryRejected(PermanentError):
    """The SMTP server refused the message for good (5xx)."""


class DeliveryDeferred(TransientError):
    """The SMTP server or the network asked us to come back later (4xx, timeouts, resets)."""


class DeliveryUnknown(DispatcherError):
    """The message may or may not have been accepted: it keeps its credit and is never resent."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"unknown: {detail}")
        self.reason = Reason.AMBIGUOUS_DELIVERY
        self.detail = detail


class QueueUnavailable(TransientError):
    """The broker did not take the task; the send is stored and a repeat of the request
    enqueues it again."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.QUEUE_UNAVAILABLE, detail)


class SendBusy(TransientError):
    """Another worker holds the send's lease; look again once the lease has run out."""

    def __init__(self, send_id: str, retry_after: float) -> None:
        super().__init__(
            Reason.SEND_BUSY,
            f"send {send_id} is being delivered by another worker",
            retry_after=retry_after,
        )


class NotAttempted(TransientError):
    """The relay was not asked at all (sending is halted, or the shared rate limit says wait):
    no SMTP attempt is counted, and the item is tried again after ``retry_after`` seconds."""

    def __init__(self, reason: str, detail: str, retry_after: float) -> None:
        super().__init__(reason, detail, retry_after=retry_after)
        self.retry_after: float = retry_after


class Yielded(NotAttempted):
    """Work stopped at a safe point before it was done (its task's time is up, or its worker
    was told to stop): nothing failed, and what is left goes on in a new task at once, on
    whichever worker is free (no backoff)."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.CHUNK_YIELD, detail, 0.0)


class WebhookRefused(DispatcherError, PermissionError):
    """A relay's webhook request whose signature or credentials do not check (answered 401,
    nothing recorded), or that names a relay this deployment has no key for (404)."""

    def __init__(self, provider: str, problem: str, *, configured: bool = True) -> None:
        super().__init__(f"{provider} webhook: {problem}")
        self.provider = provider
        self.problem = problem
        self.configured = configured
