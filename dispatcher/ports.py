"""Interfaces the core needs from the outside world, implemented elsewhere (e.g. by workers/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class TaskQueue(Protocol):
    """Hands stored work to the workers. Called only after the row is committed."""

    def enqueue_send(self, send_id: str) -> None: ...

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        """Every send of ``send_ids``, in order, over one connection to the broker; should it
        fail part way, the caller enqueues them all again (a task enqueued twice is harmless)."""
        ...

    def enqueue_system_email(self, email_id: str) -> None: ...

    def enqueue_campaign_chunk(self, campaign_id: str, chunk: int) -> None: ...


class StopFlag(Protocol):
    """Whether this process was told to stop (SIGTERM): long work (a campaign chunk) hands
    back what is left at its next safe point. ``threading.Event`` is one; workers/ sets one
    that every process of a worker reads."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class QueueState:
    """One broker queue as the broker reports it."""

    name: str
    #: Messages ready for a worker (not those a worker has taken and not yet acknowledged).
    messages: int
    #: Workers consuming from it, where the broker says (RabbitMQ does, Redis does not).
    consumers: int | None
    #: Seconds the next message has waited, where the broker lets it be read without taking
    #: it (Redis; RabbitMQ does not: its own metrics have it).
    oldest_seconds: float | None = None


class BrokerView(Protocol):
    """What ops read of the broker: its queues. Raises :class:`QueueUnavailable` when the
    broker does not answer."""

    @property
    def location(self) -> str:
        """The broker's URL without its password."""
        ...

    def queues(self) -> list[QueueState]: ...


@dataclass(frozen=True)
class WorkerState:
    """One worker node as it answered: the queues it consumes, its pool's concurrency and
    the tasks it runs now."""

    node: str
    queues: tuple[str, ...]
    concurrency: int | None
    busy: int


@runtime_checkable
class WorkersView(Protocol):
    """What ops read of the workers: the nodes that answer, asked over the broker."""

    def workers(self) -> list[WorkerState]: ...


class InlineQueue:
    """Runs nothing: records what would be enqueued (tests drive delivery themselves)."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.system_emails: list[str] = []
        self.campaign_chunks: list[tuple[str, int]] = []

    def enqueue_send(self, send_id: str) -> None:
        self.enqueued.append(send_id)

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        self.enqueued.extend(send_ids)

    def enqueue_system_email(self, email_id: str) -> None:
        self.system_emails.append(email_id)

    def enqueue_campaign_chunk(self, campaign_id: str, chunk: int) -> None:
        self.campaign_chunks.append((campaign_id, chunk))


class OutboxOnly:
    """Enqueues nothing: the work stays in its table for the beat's outbox sweep to enqueue.

    For processes that cannot reach the broker's client library (the CLI).
    """

    def enqueue_send(self, send_id: str) -> None:
        raise DeferredToOutbox(send_id)

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        raise DeferredToOutbox(", ".join(send_ids))

    def enqueue_system_email(self, email_id: str) -> None:
        raise DeferredToOutbox(email_id)

    def enqueue_campaign_chunk(self, campaign_id: str, chunk: int) -> None:
        raise DeferredToOutbox(campaign_id)


class DeferredToOutbox(Exception):
    """Raised by :class:`OutboxOnly`: the row stays un-enqueued for the outbox sweep."""


@dataclass(frozen=True)
class Charge:
    """What a payment gateway is asked to charge."""

    user_id: str
    amount_cents: int
    description: str
    reference: str  # idempotency reference: the same reference never charges twice


class PaymentGateway(Protocol):
    """Charges the card on file; returns the gateway's charge id."""

    def charge(self, charge: Charge) -> str: ...


class CardOnFileGateway:
    """The default gateway: records the charge against the card on file (we process no cards);
    the order row is the record."""

    def charge(self, charge: Charge) -> str:
        return f"card-on-file:{charge.reference}"
