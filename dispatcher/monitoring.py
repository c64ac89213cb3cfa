"""What ops read of the running system at one moment: queues, work in flight, the relay.

One place for the figures that ``/metrics`` serves as gauges and ``dispatcher status`` prints.
Each comes from the broker, Redis or an indexed SQL query: nothing here reads a whole table,
so a scrape costs the same with a million sends stored as with ten.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from dispatcher.errors import QueueUnavailable
from dispatcher.models import Campaign, CampaignStatus, Send, SendKind, SendStatus
from dispatcher.ports import BrokerView, QueueState
from dispatcher.runtime import Runtime


@dataclass(frozen=True)
class Snapshot:
    """The shared state of the system as read at one moment."""

    #: The broker's URL without its password ('' when none was given).
    broker: str
    #: The broker's queues; empty when it did not answer (see ``broker_error``).
    queues: list[QueueState]
    broker_error: str | None
    #: SmartPlan and campaign sends held by a worker now (status ``sending``).
    in_flight: dict[str, int]
    campaigns_running: int
    #: Why sending is halted and for how many more seconds, or None.
    relay_halt: tuple[str, int] | None
    outcome_stream_length: int


def snapshot(rt: Runtime, broker: BrokerView | None) -> Snapshot:
    """Read the queues (when there is a broker), the work in flight and the relay."""
    queues: list[QueueState] = []
    error = None
    if broker is not None:
        try:
            queues = broker.queues()
        except QueueUnavailable as exc:
            error = exc.detail
    with rt.reads() as session:
        # By the (kind, status, lease) index: one range per kind.
        in_flight = {
            kind.value: session.scalar(
                select(func.count())
                .select_from(Send)
                .where(Send.kind == kind, Send.status == SendStatus.SENDING)
            )
            or 0
            for kind in (SendKind.SMARTPLAN, SendKind.CAMPAIGN)
        }
        running = session.scalar(
            select(func.count())
            .select_from(Campaign)
            .where(Campaign.status == CampaignStatus.RUNNING)
        )
    return Snapshot(
        broker=broker.location if broker is not None else "",
        queues=queues,
        broker_error=error,
        in_flight=in_flight,
        campaigns_running=running or 0,
        relay_halt=rt.relay.halted(),
        outcome_stream_length=int(rt.redis.xlen(rt.settings.outcome_stream)),
    )


def finished_recently(rt: Runtime, minutes: int = 1) -> dict[tuple[str, str], int]:
    """Sends that reached their outcome in the last ``minutes``, by kind and status (read by
    the (outcome published, finished at) index, one range per value of its first column)."""
    since = rt.clock.now() - timedelta(minutes=minutes)
    with rt.reads() as session:
        rows = session.execute(
            select(Send.kind, Send.status, func.count())
            .where(
                Send.outcome_published.in_((False, True)),
                Send.finished_at >= since,
                # Usage imported from outside (the demo's earlier sends) was not sent here.
                Send.kind != SendKind.IMPORTED,
            )
            .group_by(Send.kind, Send.status)
        ).all()
    return {(kind.value, status.value): n for kind, status, n in rows}


class SnapshotCollector(Collector):
    """The snapshot as Prometheus gauges, read at every scrape."""

    def __init__(self, rt: Runtime, broker: BrokerView | None) -> None:
        self._rt = rt
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        s = snapshot(self._rt, self._broker)
        depth = GaugeMetricFamily(
            "dispatcher_queue_messages", "Tasks waiting in each queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "dispatcher_queue_oldest_seconds",
            "How long the next task of each queue has waited (0 when the queue is empty; on "
            "a Redis broker only).",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "dispatcher_queue_consumers",
            "Workers consuming from each queue (on RabbitMQ only).",
            labels=["queue"],
        )
        for q in s.queues:
            depth.add_metric([q.name], q.messages)
            if q.oldest_seconds is not None or q.messages == 0:
                oldest.add_metric([q.name], q.oldest_seconds or 0.0)
            if q.consumers is not None:
                consumers.add_metric([q.name], q.consumers)
        yield from (depth, oldest, consumers)
        yield GaugeMetricFamily(
            "dispatcher_broker_up",
            "1 when the broker answered this scrape.",
            value=1 if s.broker_error is None and self._broker is not None else 0,
        )
        flight = GaugeMetricFamily(
            "dispatcher_sends_in_flight",
            "Sends a worker holds now (leased, status sending), by kind.",
            labels=["kind"],
        )
        for kind, n in s.in_flight.items():
            flight.add_metric([kind], n)
        yield flight
        yield GaugeMetricFamily(
            "dispatcher_campaigns_running", "Campaigns sending now.", value=s.campaigns_running
        )
        yield GaugeMetricFamily(
            "dispatcher_relay_halted",
            "1 while sending is halted because the relay refused our credentials.",
            value=0 if s.relay_halt is None else 1,
        )
        yield GaugeMetricFamily(
            "dispatcher_outcome_stream_length",
            "Entries on the SmartPlan step-outcome stream.",
            value=s.outcome_stream_length,
        )
