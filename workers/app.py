"""The Celery app, built from settings: at-least-once delivery, no duplicates, JSON only.

``celery -A workers.app worker -Q smartplan`` finds ``app`` here; it is built on first access
from the environment, so importing this module connects to nothing.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_shutdown
from kombu.entity import Queue

from dispatcher.ports import OutboxOnly
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from workers import shutdown, tasks
from workers.names import (
    CAMPAIGN,
    QUEUES,
    RENEW_DUE_TASK,
    SEND_CAMPAIGN_CHUNK_TASK,
    SEND_SMARTPLAN_TASK,
    SEND_SYSTEM_EMAIL_TASK,
    SMARTPLAN,
    SWEEP_OUTBOX_TASK,
    SYSTEM,
)
from workers.queue import CeleryTaskQueue


def create_app(settings: Settings, runtime: Runtime | None = None) -> Celery:
    """A Celery app for ``settings``; ``runtime`` lets tests share collaborators with it."""
    app = Celery("dispatcher", set_as_current=False)
    app.conf.update(
        broker_url=settings.redis_url,
        broker_connection_retry_on_startup=True,
        # At least once: ack after the task ran, requeue if the worker process dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A task's message becomes visible again only after every time limit has passed.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Workers look for the messages of dead workers every interval x throttle seconds
            # (10 x 10 by default): without these a task comes back some 100 s after its worker
            # died, however short the visibility timeout.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
        },
        task_time_limit=settings.task_time_limit,
        # After a campaign chunk's own deadline (half the limit), so a chunk yields between
        # messages first: a soft limit raised mid-batch leaves its messages in DATA unknown.
        task_soft_time_limit=max(settings.task_time_limit - 30, settings.task_time_limit * 3 // 4),
        # Outcomes live in SQL and on the step-outcome stream, never in a result backend.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue=SMARTPLAN,
        task_routes={
            SEND_SMARTPLAN_TASK: {"queue": SMARTPLAN},
            SEND_SYSTEM_EMAIL_TASK: {"queue": SYSTEM},
            SEND_CAMPAIGN_CHUNK_TASK: {"queue": CAMPAIGN},
            RENEW_DUE_TASK: {"queue": SYSTEM},
            SWEEP_OUTBOX_TASK: {"queue": SYSTEM},
        },
        # Exactly one beat process schedules these (Procfile `beat`).
        beat_schedule={
            "renew-due": {"task": RENEW_DUE_TASK, "schedule": settings.renewal_sweep_seconds},
            "sweep-outbox": {"task": SWEEP_OUTBOX_TASK, "schedule": 60.0},
        },
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_track_started=False,
        broker_pool_limit=10,
    )
    rt = runtime or Runtime(settings)
    if isinstance(rt.queue, OutboxOnly):
        # Follow-up work of the use cases (notices, receipts) goes to this app's broker.
        rt.queue = CeleryTaskQueue(app)
    tasks.register(app, rt)
    shutdown.install(app, rt)  # SIGTERM: long work hands back at its next safe point

    def close(sender: Any, **_: Any) -> None:
        # After the last task: QUIT the SMTP connections this process kept, stop its event
        # loop, release the database and Redis pools.
        if getattr(sender, "app", None) is app:
            rt.close()

    worker_shutdown.connect(close, weak=False)
    return app


_default: Celery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A workers.app` reads `app`: build it from the environment on first access.
    global _default
    if name == "app":
        if _default is None:
            _default = create_app(Settings.from_env())
        return _default
    raise AttributeError(name)
