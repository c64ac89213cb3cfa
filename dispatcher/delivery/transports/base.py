"""The transport interface every member of the family implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dispatcher.delivery.message import Envelope
from dispatcher.errors import DeliveryDeferred, DeliveryRejected, DeliveryUnknown, NotAttempted


@dataclass(frozen=True)
class Delivery:
    """A message the server accepted, with its reply, and the recipients it refused at RCPT
    while accepting others (address -> (code, reply))."""

    code: int
    reply: str
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class Transport(Protocol):
    """Sends one message.

    Raises :class:`~dispatcher.errors.DeliveryDeferred` (retry later),
    :class:`~dispatcher.errors.DeliveryRejected` (permanent) or
    :class:`~dispatcher.errors.DeliveryUnknown` (may have been accepted: never resend).
    """

    async def send(self, envelope: Envelope, message: bytes) -> Delivery: ...

    async def shutdown(self) -> None:
        """Close what :meth:`send` keeps open between messages (pooled connections)."""
        ...

    def bulk(self) -> BulkSender:
        """A sender for many messages in a row, reusing connections where it can."""
        ...


class DataMarks(Protocol):
    """Told, message by message, when a batch's item reaches DATA: the one point of the
    conversation after which the server may have the message.

    ``before_data(item)`` is awaited once the item's recipient was accepted at RCPT, immediately
    before the DATA command, and never for an item whose conversation stopped earlier (it is a
    coroutine, so that the other connections go on while a mark is written, and marks of
    several connections can share one round trip). When it raises :class:`NotAttempted` the
    message is not sent (the pending MAIL and RCPT are reset or
    the connection dropped) and it and the rest of the batch come back as that NotAttempted.
    ``after_data(item, outcome)`` follows as soon as DATA ended, with what it ended in (a
    :class:`Delivery`, a refusal, a deferral, or :class:`DeliveryUnknown` when the connection was
    lost meanwhile); it must not raise. Members without an SMTP conversation (memory) call both
    around each item they attempt.
    """

    async def before_data(self, item: int) -> None: ...

    def after_data(self, item: int, outcome: Outcome) -> None: ...


class BulkSender(Protocol):
    """Sends batches of messages; one outcome per item, in order: a :class:`Delivery` or the
    delivery error, returned, not raised. Items not started by ``deadline`` (a
    ``time.monotonic()`` reading) come back as :class:`~dispatcher.errors.Yielded`. ``marks`` is
    told of each item that reaches DATA (see :class:`DataMarks`). ``stop(outcome)`` is asked
    after each item's outcome: once it answers a :class:`NotAttempted` (a policy refusal, the
    worker stopping), no further item starts (conversations already under way on other
    connections finish) and the rest come back as that answer. ``pace()`` is awaited before
    each item starts (a campaign yielding to SmartPlan steps); the deadline is checked after
    it."""

    async def send_many(
        self,
        items: Sequence[tuple[Envelope, bytes]],
        deadline: float | None = None,
        marks: DataMarks | None = None,
        stop: Stop | None = None,
        pace: Pace | None = None,
    ) -> list[Outcome]: ...

    async def close(self) -> None: ...


#: What :meth:`BulkSender.send_many` answers for one item.
Outcome = Delivery | DeliveryDeferred | DeliveryRejected | DeliveryUnknown | NotAttempted

#: Asked after each outcome of a batch: what the items not started yet answer, or None to go on.
Stop = Callable[[Outcome], NotAttempted | None]

#: Awaited before each item of a batch starts: it may wait, never refuse.
Pace = Callable[[], Awaitable[None]]
