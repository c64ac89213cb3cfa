"""The Celery implementation of the core's TaskQueue port."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from dispatcher.errors import QueueUnavailable
from workers.names import (
    CAMPAIGN,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    SMARTPLAN,
    SYSTEM,
)


class CeleryTaskQueue:
    """Publishes sends as tasks on their queue; the broker keeps them until a worker acks."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue_send(self, send_id: str) -> None:
        self._send(SEND_SMARTPLAN_TASK, send_id, SMARTPLAN)

    def enqueue_sends(self, send_ids: Sequence[str]) -> None:
        # One producer (one broker connection and channel) for them all, rather than one
        # taken from the pool and given back per task.
        try:
            with self.app.producer_or_acquire() as producer:
                for send_id in send_ids:
                    self.app.send_task(
                        SEND_SMARTPLAN_TASK, args=[send_id], queue=SMARTPLAN, producer=producer
                    )
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def enqueue_system_email(self, email_id: str) -> None:
        self._send(SEND_SYSTEM_EMAIL_TASK, email_id, SYSTEM)

    def enqueue_campaign_chunk(self, campaign_id: str, chunk: int) -> None:
        self._send(SEND_CAMPAIGN_CHUNK_TASK, f"{campaign_id}:{chunk}", CAMPAIGN)

    def _send(self, task: str, item_id: str, queue: str) -> None:
        try:
            self.app.send_task(task, args=[item_id], queue=queue)
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc
