"""The Celery implementation of the core's TaskQueue port (and of its BrokerView and
WorkersView: what ops read of the broker and the workers)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

from amqp.exceptions import AMQPError, NotFound
from celery import Celery
from kombu.exceptions import ChannelError, KombuError
from redis import Redis
from redis.exceptions import RedisError

from dispatcher.db import redact
from dispatcher.errors import QueueUnavailable
from dispatcher.ports import QueueState, WorkerState
from dispatcher.settings import REDIS_SCHEMES
from workers.names import (
    CAMPAIGN,
    PUBLISHED_AT,
    QUEUES,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_BATCH_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    SMARTPLAN,
    SYSTEM,
)

#: Seconds the workers are given to answer each remote-control question.
INSPECT_TIMEOUT = 1.0


class CeleryTaskQueue:
    """Publishes sends as tasks on their queue; the broker keeps them until a worker acks.

    Also the core's :class:`~dispatcher.ports.BrokerView`: what the broker holds per queue.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        broker = str(app.conf.broker_url)
        #: The broker's Redis, read directly for queue states (None on RabbitMQ).
        self._redis: Redis | None = (
            Redis.from_url(broker, socket_timeout=5, socket_connect_timeout=5)
            if broker.startswith(REDIS_SCHEMES)
            else None
        )

    def enqueue_send(self, send_id: str) -> None:
        self._send(SEND_SMARTPLAN_TASK, send_id, SMARTPLAN)

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        """Steps submitted together go as batches of ``SMARTPLAN_BATCH_SIZE`` to one task each
        (delivered side by side), over one producer (one broker connection and channel)
        rather than one taken from the pool and given back per task."""
        size = int(self.app.conf.get("smartplan_batch_size") or 1)
        if size == 1:
            self.publish_sends([(send_id, 0.0) for send_id in send_ids])
            return
        try:
            with self.app.producer_or_acquire() as producer:
                headers = _headers()
                for start in range(0, len(send_ids), size):
                    self.app.send_task(
                        SEND_SMARTPLAN_BATCH_TASK,
                        args=[list(send_ids[start : start + size])],
                        queue=SMARTPLAN,
                        producer=producer,
                        headers=headers,
                    )
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def publish_sends(self, sends: Sequence[tuple[str, float]]) -> None:
        """Each send ``(id, countdown seconds)`` as its own task, delivered after its
        countdown, over one producer; raises :class:`QueueUnavailable` when the broker fails
        (a task published twice is harmless)."""
        try:
            with self.app.producer_or_acquire() as producer:
                headers = _headers()
                for send_id, countdown in sends:
                    self.app.send_task(
                        SEND_SMARTPLAN_TASK,
                        args=[send_id],
                        queue=SMARTPLAN,
                        producer=producer,
                        headers=headers,
                        countdown=countdown or None,
                    )
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def enqueue_system_email(self, email_id: str) -> None:
        self._send(SEND_SYSTEM_EMAIL_TASK, email_id, SYSTEM)

    def enqueue_campaign_chunk(self, campaign_id: str, chunk: int) -> None:
        self._send(SEND_CAMPAIGN_CHUNK_TASK, f"{campaign_id}:{chunk}", CAMPAIGN)

    def _send(self, task: str, item_id: str, queue: str) -> None:
        try:
            self.app.send_task(task, args=[item_id], queue=queue, headers=_headers())
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    @property
    def location(self) -> str:
        return redact(str(self.app.conf.broker_url))

    def workers(self) -> list[WorkerState]:
        """The worker nodes that answer, with their queues, concurrency and running tasks
        (Celery's remote control over the broker). The first question waits out
        :data:`INSPECT_TIMEOUT` for every node to answer; the next two stop as soon as the
        nodes found have. :class:`QueueUnavailable` when the broker does not answer."""
        try:
            return self._ask_workers()
        except (OSError, KombuError, RedisError, AMQPError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _ask_workers(self) -> list[WorkerState]:
        found: dict[str, dict[str, Any]] = {}
        answers = self.app.control.inspect(timeout=INSPECT_TIMEOUT).active_queues() or {}
        for node, queues in answers.items():
            names = tuple(q["name"] for q in queues if q.get("name") in QUEUES)
            found[node] = {"queues": names, "concurrency": None, "busy": 0}
        if not found:
            return []
        inspect = self.app.control.inspect(timeout=INSPECT_TIMEOUT, limit=len(found))
        blank: dict[str, Any] = {"queues": (), "concurrency": None, "busy": 0}
        for node, stats in (inspect.stats() or {}).items():
            found.setdefault(node, dict(blank))["concurrency"] = stats.get("pool", {}).get(
                "max-concurrency"
            )
        for node, running in (inspect.active() or {}).items():
            found.setdefault(node, dict(blank))["busy"] = len(running)
        return [WorkerState(node, **found[node]) for node in sorted(found)]

    def queues(self) -> list[QueueState]:
        """Each pool's queue: messages waiting, how long the next has waited (Redis) and its
        consumers (RabbitMQ). On Redis, one pipelined round trip over a kept client; on
        RabbitMQ, a passive declare per queue over a pooled connection (which creates
        nothing: a queue no worker has declared yet holds nothing)."""
        try:
            if self._redis is not None:
                return _redis_states(self._redis)
            with self.app.pool.acquire(block=True) as connection:
                return [_amqp_state(connection, name) for name in QUEUES]
        except (OSError, KombuError, RedisError, AMQPError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _headers() -> dict[str, float]:
    """Headers of a task we publish: when, by the wall clock (a worker and a scrape read how
    long it waited)."""
    return {PUBLISHED_AT: time.time()}


def _amqp_state(connection: Any, name: str) -> QueueState:
    channel = connection.channel()
    try:
        _, messages, consumers = channel.queue_declare(queue=name, passive=True)
    except (ChannelError, NotFound):
        return QueueState(name, 0, 0)
    finally:
        # A failed passive declare has closed the channel already.
        with contextlib.suppress(OSError, KombuError, AMQPError):
            channel.close()
    return QueueState(name, int(messages), int(consumers))


def _redis_states(client: Redis) -> list[QueueState]:
    """kombu's Redis transport keeps a queue as a list of its name (and one per priority
    step, for messages sent with a priority, which ours are not): it pushes on the left and
    takes from the right, so the next message is the list's last."""
    pipe = client.pipeline(transaction=False)
    for name in QUEUES:
        pipe.llen(name)
        pipe.lindex(name, -1)
    replies = pipe.execute()
    return [
        QueueState(name, int(replies[2 * i]), None, _waited(replies[2 * i + 1]))
        for i, name in enumerate(QUEUES)
    ]


def _waited(raw: bytes | None) -> float | None:
    """Seconds since a queued message was published; None when there is none, or it is not
    one of ours (beat's carry no publication time)."""
    if raw is None:
        return None
    try:
        published = json.loads(raw)["headers"].get(PUBLISHED_AT)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(0.0, time.time() - float(published)) if published is not None else None
