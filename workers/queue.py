"""The Celery implementation of the core's TaskQueue port."""

from __future__ import annotations

from celery import Celery

from workers.app import SEND_SMARTPLAN_TASK, SMARTPLAN


class CeleryTaskQueue:
    """Publishes sends as tasks on their queue; the broker keeps them until a worker acks."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue_send(self, send_id: str) -> None:
        self.app.send_task(SEND_SMARTPLAN_TASK, args=[send_id], queue=SMARTPLAN)
