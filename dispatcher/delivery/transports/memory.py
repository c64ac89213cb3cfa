"""An in-memory transport for fast tests of the service layer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from dispatcher.delivery.message import Envelope
from dispatcher.delivery.transports.base import DataMarks, Delivery, Outcome, Pace, Stop
from dispatcher.errors import DeliveryDeferred, DeliveryRejected, DeliveryUnknown, NotAttempted

Behaviour = Callable[[Envelope, bytes], Delivery]


class MemoryTransport:
    """Keeps every accepted message; ``behaviour`` may raise delivery errors instead."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.outbox: list[tuple[Envelope, bytes]] = []
        self.behaviour = behaviour
        self._lock = threading.Lock()

    async def send(self, envelope: Envelope, message: bytes) -> Delivery:
        delivery = (
            self.behaviour(envelope, message)
            if self.behaviour
            else Delivery(250, "2.0.0 OK: queued in memory")
        )
        with self._lock:
            self.outbox.append((envelope, message))
        return delivery

    def bulk(self) -> MemoryTransport:
        return self

    async def shutdown(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send_many(
        self,
        items: Sequence[tuple[Envelope, bytes]],
        deadline: float | None = None,
        marks: DataMarks | None = None,
        stop: Stop | None = None,
        pace: Pace | None = None,
    ) -> list[Outcome]:
        """Each item in turn; with no conversation to go through, ``marks`` is told of each
        item just before it is handed over and again with its outcome (see
        :class:`~dispatcher.delivery.transports.base.DataMarks`)."""
        out: list[Outcome] = []
        held: NotAttempted | None = None
        for i, (envelope, message) in enumerate(items):
            if held is None and pace is not None:
                await pace()
            if held is None and marks is not None:
                try:
                    await marks.before_data(i)
                except NotAttempted as exc:
                    held = exc
            if held is not None:
                out.append(held)
                continue
            outcome: Outcome
            try:
                outcome = await self.send(envelope, message)
            except (DeliveryDeferred, DeliveryRejected, DeliveryUnknown) as exc:
                outcome = exc
            if marks is not None:
                marks.after_data(i, outcome)
            out.append(outcome)
            if stop is not None:
                held = stop(outcome)
        return out
