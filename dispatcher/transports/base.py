"""The transport interface every member of the family implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dispatcher.message import Envelope


@dataclass(frozen=True)
class Delivery:
    """A message the server accepted, with its reply."""

    code: int
    reply: str


class Transport(Protocol):
    """Sends one message.

    Raises :class:`~dispatcher.errors.DeliveryDeferred` (retry later),
    :class:`~dispatcher.errors.DeliveryRejected` (permanent) or
    :class:`~dispatcher.errors.DeliveryUnknown` (may have been accepted: never resend).
    """

    async def send(self, envelope: Envelope, message: bytes) -> Delivery: ...
