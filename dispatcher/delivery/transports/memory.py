"""An in-memory transport for fast tests of the service layer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from dispatcher.delivery.message import Envelope
from dispatcher.delivery.transports.base import Delivery, Outcome, stopped
from dispatcher.errors import DeliveryDeferred, DeliveryRejected, DeliveryUnknown

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

    async def close(self) -> None:
        return None

    async def send_many(
        self,
        items: Sequence[tuple[Envelope, bytes]],
        deadline: float | None = None,
        on_start: Callable[[Sequence[int]], None] | None = None,
        stop: Callable[[Outcome], bool] | None = None,
    ) -> list[Outcome]:
        out: list[Outcome] = []
        halted = False
        for i, (envelope, message) in enumerate(items):
            if halted:
                out.append(stopped("not started after an earlier answer"))
                continue
            if on_start is not None:
                on_start([i])
            try:
                out.append(await self.send(envelope, message))
            except (DeliveryDeferred, DeliveryRejected, DeliveryUnknown) as exc:
                out.append(exc)
            halted = stop is not None and stop(out[-1])
        return out
