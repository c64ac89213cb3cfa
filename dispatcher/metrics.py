"""The dispatcher's Prometheus metrics: each is defined here once and observed where its event
happens (a terminal outcome in the lifecycle, a credit in the quota ledger, an SMTP reply in
the transport, ...).

Every process records into prometheus_client's registry. With ``PROMETHEUS_MULTIPROC_DIR`` set
in a process's environment before it starts (prometheus_client reads it at import), the
processes of one host (the API, each worker and each prefork child) write their samples to
files there, and :func:`exposition` serves the sum of them all: Celery's prefork pools and
several workers on one host are counted whole. The gauges that describe shared state (queue
depths, leases, campaigns running) are not here: they are read when scraped (see
:mod:`dispatcher.monitoring`), from Redis, the broker and indexed SQL, never a table scan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

#: Seconds: from well under a millisecond (a Redis script) to a long SMTP conversation.
_SHORT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Seconds: from a send accepted and sent at once to one retried for an hour.
_LONG = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 14400)

SENDS = Counter(
    "dispatcher_sends",
    "Sends that reached their terminal outcome (sent, failed, unknown), by kind and reason.",
    ["kind", "outcome", "reason"],
)
SYSTEM_EMAILS = Counter(
    "dispatcher_system_emails",
    "Notices and receipts that reached their terminal outcome.",
    ["outcome"],
)
CREDITS_RESERVED = Counter(
    "dispatcher_credits_reserved", "Credits taken from agents' grants (replays not counted)."
)
CREDITS_REFUNDED = Counter("dispatcher_credits_refunded", "Credits given back to agents' grants.")
CAMPAIGN_RESTED = Counter(
    "dispatcher_campaign_rested_seconds",
    "Seconds campaign connections rested between messages because SmartPlan steps waited "
    "(delivery/priority.py), all connections together.",
)
RESERVATIONS_DENIED = Counter(
    "dispatcher_reservations_denied", "Reservations refused because the grant had too few credits."
)
SMTP_REPLIES = Counter(
    "dispatcher_smtp_replies",
    "Outcomes of SMTP conversations: 2xx accepted, 4xx deferred, 5xx refused, lost (the "
    "connection broke).",
    ["reply"],
)
SEND_LATENCY = Histogram(
    "dispatcher_send_latency_seconds",
    "From a send's acceptance to its terminal outcome, by kind.",
    ["kind"],
    buckets=_LONG,
)
SMTP_SECONDS = Histogram(
    "dispatcher_smtp_conversation_seconds",
    "One message's SMTP conversation, MAIL to the reply after DATA.",
    buckets=_SHORT,
)
RENDER_SECONDS = Histogram(
    "dispatcher_render_seconds", "One render of an agent's template, all parts.", buckets=_SHORT
)
RESERVE_SECONDS = Histogram(
    "dispatcher_reserve_seconds",
    "One credit reservation in Redis (the Lua script; for reservations sent together in one "
    "round trip, each one's share of it).",
    buckets=_SHORT,
)
RATE_LIMIT_WAITS = Counter(
    "dispatcher_rate_limit_waits", "Times a message waited for the relay's shared rate limit."
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "dispatcher_rate_limit_wait_seconds", "Seconds messages waited for the relay's rate limit."
)
SMARTPLAN_BATCH_STEPS = Histogram(
    "dispatcher_smartplan_batch_steps",
    "SmartPlan steps delivered as one batch, by how they came together: submitted together "
    "(a batch task) or taken at the same moment by a worker's threads (single sends).",
    ["source"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
SUBMIT_GROUP_SENDS = Histogram(
    "dispatcher_submit_group_sends",
    "Single SmartPlan sends stored and enqueued as one group, having been submitted at the "
    "same moment by a process's threads (the API's requests).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
QUEUE_WAIT = Histogram(
    "dispatcher_queue_wait_seconds",
    "From a task's publication to a worker starting it, by queue (once for each step a "
    "SmartPlan batch carries).",
    ["queue"],
    buckets=_LONG,
)


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    """Observe the block's wall time in ``histogram``, whether it returns or raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


def multiprocess_dir() -> str | None:
    """Where this host's processes share their samples (``PROMETHEUS_MULTIPROC_DIR``)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry() -> CollectorRegistry:
    """The registry to serve: this host's processes sharing the multiprocess directory, or
    this process's own."""
    folder = multiprocess_dir()
    if folder is None:
        return REGISTRY
    shared = CollectorRegistry()
    multiprocess.MultiProcessCollector(shared, path=folder)  # type: ignore[no-untyped-call]
    return shared


def exposition() -> bytes:
    """The Prometheus text of every process of this host that shares the multiprocess
    directory, or of this process alone when there is none."""
    return generate_latest(registry())
