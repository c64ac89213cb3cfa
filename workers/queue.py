"""The Celery implementation of the core's TaskQueue port."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

from amqp.exceptions import AMQPError, NotFound
from celery import Celery
from kombu.exceptions import ChannelError, KombuError
from redis.exceptions import RedisError

from dispatcher.db import redact
from dispatcher.errors import QueueUnavailable
from dispatcher.ports import QueueState
from workers.names import (
    CAMPAIGN,
    PUBLISHED_AT,
    QUEUES,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    SMARTPLAN,
    SYSTEM,
)


class CeleryTaskQueue:
    """Publishes sends as tasks on their queue; the broker keeps them until a worker acks.

    Also the core's :class:`~dispatcher.ports.BrokerView`: what the broker holds per queue.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue_send(self, send_id: str) -> None:
        self._send(SEND_SMARTPLAN_TASK, send_id, SMARTPLAN)

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        # One producer (one broker connection and channel) for them all, rather than one
        # taken from the pool and given back per task.
        try:
            with self.app.producer_or_acquire() as producer:
                headers = _headers()
                for send_id in send_ids:
                    self.app.send_task(
                        SEND_SMARTPLAN_TASK,
                        args=[send_id],
                        queue=SMARTPLAN,
                        producer=producer,
                        headers=headers,
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

    def queues(self) -> list[QueueState]:
        """Each pool's queue: messages waiting and, on RabbitMQ, its consumers (a passive
        declare, which creates nothing: a queue no worker has declared yet holds nothing)."""
        try:
            with self.app.connection_for_read() as connection:
                return [_state(connection, name) for name in QUEUES]
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _headers() -> dict[str, float]:
    """Headers of a task we publish: when, by the wall clock (a worker and a scrape read how
    long it waited)."""
    return {PUBLISHED_AT: time.time()}


def _state(connection: Any, name: str) -> QueueState:
    amqp = connection.transport.driver_type == "amqp"
    channel = connection.channel()
    try:
        _, messages, consumers = channel.queue_declare(queue=name, passive=True)
        oldest = None if amqp else _oldest_on_redis(channel, name)
    except (ChannelError, NotFound):
        return QueueState(name, 0, 0 if amqp else None)
    finally:
        # A failed passive declare has closed an AMQP channel already.
        with contextlib.suppress(OSError, KombuError, AMQPError):
            channel.close()
    return QueueState(name, int(messages), consumers if amqp else None, oldest)


def _oldest_on_redis(channel: Any, name: str) -> float | None:
    """Seconds the next message of the queue has waited: kombu's Redis transport pushes on the
    left and takes from the right, so that message is the list's last; None when the queue is
    empty or its message is not one of ours (beat's carry no publication time)."""
    raw = channel.client.lindex(name, -1)
    if raw is None:
        return None
    try:
        published = json.loads(raw)["headers"].get(PUBLISHED_AT)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(0.0, time.time() - float(published)) if published is not None else None
