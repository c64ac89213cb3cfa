"""The Celery implementation of the core's TaskQueue port."""

from __future__ import annotations

from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from dispatcher.errors import QueueUnavailable
from workers.app import SEND_SMARTPLAN_TASK, SMARTPLAN


class CeleryTaskQueue:
    """Publishes sends as tasks on their queue; the broker keeps them until a worker acks."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue_send(self, send_id: str) -> None:
        try:
            self.app.send_task(SEND_SMARTPLAN_TASK, args=[send_id], queue=SMARTPLAN)
        except (OSError, KombuError, RedisError) as exc:
            raise QueueUnavailable(f"{type(exc).__name__}: {exc}") from exc
